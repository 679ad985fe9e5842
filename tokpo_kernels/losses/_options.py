"""The options every loss passes through to ``linear_vocab_stats``, declared and documented once.

A loss is written with its own parameters and one keyword-only marker parameter ``head``; the
:func:`loss_function` decorator turns it into the public function:

* the public signature (``__signature__``, what ``inspect.signature`` and ``help()`` show) has the
  shared options of :class:`HeadOptions` in place of ``head``, as keyword-only parameters with the
  defaults declared here, so every loss spells them the same way;
* the docstring gets one ``Args`` line per shared option (from :data:`OPTION_DOCS`, or a loss's
  own wording for one of them through ``docs=``), inserted at the end of its ``Args`` section;
* a call collects the shared keywords into a :class:`HeadOptions` and calls the loss with
  ``head=``; any other keyword goes to the loss itself, so an unknown one raises ``TypeError``
  as for a plain function. The wrapper is a dict loop over literal names: no ``inspect`` at call
  time, and ``torch.compile(fullgraph=True)`` traces through it;
* the loss is registered (:mod:`tokpo_kernels.losses._registry`) with the name of its
  ``nn.Module`` class, which :mod:`tokpo_kernels.modules` generates.

A loss that must place a shared option elsewhere in its signature (keyword order is a contract)
declares it itself with the same default; the value then reaches both that parameter and
``head``. ``exclude=`` drops options a loss has no use for (``ref_bias`` without a reference).
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from tokpo_kernels._types import LossOutput, VocabStats
from tokpo_kernels.functional import linear_vocab_stats
from tokpo_kernels.losses._registry import LossSpec, register_loss


class HeadOptions(NamedTuple):
    """The shared keyword options of every loss, as given by the caller (defaults below)."""

    bias: Optional[torch.Tensor] = None
    ref_bias: Optional[torch.Tensor] = None
    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    impl: str = "auto"
    filter_eps: Optional[Union[float, str]] = None
    process_group: Optional[dist.ProcessGroup] = None
    validate: str = "async"
    chunk_budget: Optional[float] = None

    def stats(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
        ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
        *, ref_bias: Optional[torch.Tensor] = None, kl: bool = False, entropy: bool = False,
        token_stats: bool = False,
    ) -> VocabStats:
        """``linear_vocab_stats`` of the given tensors with these options (an explicit ``ref_bias``
        replaces ``self.ref_bias``: e.g. a distillation teacher's own bias). ``token_stats`` also asks
        for the entropy, the max logit and the mean logit in the same pass (a loss's ``token_stats=``)."""
        return linear_vocab_stats(
            hidden, weight, targets, bias=self.bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
            ref_bias=self.ref_bias if ref_bias is None else ref_bias, kl=kl, entropy=entropy or token_stats,
            max_logit=token_stats, mean_logit=token_stats,
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap, impl=self.impl,
            filter_eps=self.filter_eps, process_group=self.process_group, validate=self.validate,
            chunk_budget=self.chunk_budget,
        )


OPTION_NAMES: Tuple[str, ...] = HeadOptions._fields

# One line of ``Args`` text per option; the details live in ``linear_vocab_stats``'s docstring and
# docs/methods.md §1.
OPTION_DOCS: Dict[str, str] = {
    "bias": "optional ``(V,)`` bias of the policy's lm-head.",
    "ref_bias": "optional ``(V,)`` bias of the reference's lm-head (only together with a reference model).",
    "ignore_index": "the label id of positions without a target (prompt, padding): masked, and skipped "
                    "before any matmul.",
    "temperature": "``> 0``; divides the (soft-capped) logits of policy and reference before the softmax.",
    "softcap": "``> 0`` or ``None``: Gemma-style logit soft-capping ``c·tanh(z / c)`` before the temperature.",
    "impl": "the backend: ``\"auto\"`` or one of ``tokpo_kernels.backends.backend_names()`` (the result "
            "does not depend on it beyond rounding).",
    "filter_eps": "``None`` (exact, the default), a float or ``\"auto\"``: the opt-in approximate Triton "
                  "backward of :func:`tokpo_kernels.linear_vocab_stats`.",
    "process_group": "vocabulary parallelism: the head's weights (and biases) hold this rank's rows; see "
                     ":func:`tokpo_kernels.linear_vocab_stats`.",
    "validate": "``\"async\"`` (default) or ``\"sync\"``: how a target id outside ``[0, V)`` is reported. On "
                "CPU always a ``ValueError``; on CUDA ``\"async\"`` is a device-side assert (no host sync; a "
                "later call fails and the CUDA context is lost) and ``\"sync\"`` a ``ValueError`` at the cost of "
                "one host sync; see :func:`tokpo_kernels.linear_vocab_stats`.",
    "chunk_budget": "``None`` (``$TOKPO_CHUNK_BUDGET`` or 0.10) or a fraction ``> 0``: the Triton strategies' "
                    "vocabulary-chunk memory relative to the gradient buffers; see "
                    ":func:`tokpo_kernels.linear_vocab_stats`.",
}

_KW = inspect.Parameter.KEYWORD_ONLY
_MARKER = "head"


def _option_parameters(names: Sequence[str]) -> List[inspect.Parameter]:
    defaults = HeadOptions._field_defaults
    # NamedTuple keeps the (postponed) annotations as ForwardRefs: show their text, as the losses' own do.
    hints = {n: getattr(a, "__forward_arg__", a) for n, a in HeadOptions.__annotations__.items()}
    return [inspect.Parameter(n, _KW, default=defaults[n], annotation=hints[n]) for n in names]


def _with_option_docs(doc: str, lines: Sequence[str]) -> str:
    """``doc`` with ``lines`` appended to its ``Args:`` section (indented like that section's entries)."""
    rows = doc.split("\n")
    args_at = next((i for i, r in enumerate(rows) if r.strip() == "Args:"), None)
    if args_at is None:
        raise ValueError("loss_function: the docstring needs an 'Args:' section for the shared options")
    indent = rows[args_at][: len(rows[args_at]) - len(rows[args_at].lstrip())]

    def is_section(row: str) -> bool:  # "Returns:" etc., at the indentation of "Args:"
        return row.strip().endswith(":") and row.startswith(indent) and not row.startswith(indent + " ")

    end = next((i for i in range(args_at + 1, len(rows)) if is_section(rows[i])), len(rows))
    while end > args_at + 1 and not rows[end - 1].strip():
        end -= 1
    entry = indent + "    "
    added = [textwrap.fill(line, 112, initial_indent=entry, subsequent_indent=entry + "    ") for line in lines]
    return "\n".join(rows[:end] + added + rows[end:])


def loss_function(
    module: str, *, exclude: Sequence[str] = (), docs: Optional[Mapping[str, str]] = None
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Make ``fn`` (with a keyword-only ``head: HeadOptions`` marker) a public loss; see the module doc.

    ``module`` is the class name of its generated ``nn.Module`` wrapper; ``exclude`` the shared
    options it does not take; ``docs`` its own ``Args`` wording for some shared options.
    """

    def decorate(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if _MARKER not in sig.parameters or sig.parameters[_MARKER].kind is not _KW:
            raise TypeError(f"{fn.__name__}: a loss_function needs a keyword-only '{_MARKER}' parameter")
        unknown = sorted(set(exclude) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"{fn.__name__}: exclude names {unknown}, expected names from {OPTION_NAMES}")
        own = {n for n in sig.parameters if n in OPTION_NAMES}  # shared options the loss places itself
        for n in own:
            if sig.parameters[n].default != HeadOptions._field_defaults[n]:
                raise ValueError(f"{fn.__name__}: its own '{n}' must default to {HeadOptions._field_defaults[n]!r}")
        inserted = tuple(n for n in OPTION_NAMES if n not in own and n not in exclude)
        shared = tuple(n for n in OPTION_NAMES if n not in exclude)
        at = [p.name for p in params].index(_MARKER)
        public_sig = sig.replace(parameters=params[:at] + _option_parameters(inserted) + params[at + 1:])
        wording = {**OPTION_DOCS, **(docs or {})}

        @functools.wraps(fn)
        def public(*args: Any, **kwargs: Any) -> LossOutput:
            # Literal names only (no inspect): cheap per call and traceable by torch.compile.
            given = {}
            for name in shared:
                if name in kwargs:
                    given[name] = kwargs[name] if name in own else kwargs.pop(name)
            return fn(*args, head=HeadOptions(**given), **kwargs)

        public.__signature__ = public_sig  # type: ignore[attr-defined]
        public.__doc__ = _with_option_docs(fn.__doc__ or "", [f"{n}: {wording[n]}" for n in inserted])
        options = tuple(p.name for p in public_sig.parameters.values() if p.kind is _KW)
        register_loss(LossSpec(name=fn.__name__, fn=public, module=module, options=options))
        return public

    return decorate
