"""Validation of user input at the public boundary: once, before any kernel, with errors that
state what was expected and what was received.

One module for every check: the tensor/number checks used by ``linear_vocab_stats`` and by the
losses, the losses' batch-layout checks, and the "which reference did the caller give" rule.
Nothing here reads a tensor's values except ``check_target_range`` and ``fail_if`` (see
``target_check_site`` for when), so a loss validated with these helpers stays free of host
synchronisation unless its caller asks for ``validate="sync"``.
"""

from __future__ import annotations

import math
import operator
import reprlib
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from tokpo_kernels.backends import backend_entry, resolve_impl


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_flags(**flags: object) -> None:
    """Every yes/no option must be a ``bool``: ``entropy="no"`` would otherwise read as true."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` must be a floating-point tensor; returns it."""
    t = check_tensor(name, value)
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32/bfloat16/float16/float64), got dtype {t.dtype}"
        )
    return t


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` can hold token ids: any integer dtype (not float, complex or bool)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_int(name: str, t: torch.Tensor) -> None:
    """``t`` must hold integer token ids (``is_integer_dtype``)."""
    if not is_integer_dtype(t.dtype):
        raise TypeError(f"{name}: expected integer token ids (any integer dtype, e.g. torch.long), got dtype {t.dtype}")


def check_same_device(named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first.device}, {name} is on {t.device}"
            )


def check_number(
    name: str,
    value: object,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
) -> float:
    """``value`` must be a finite Python number within the given bounds; returns it as ``float``.

    Tensors are rejected on purpose: a hyperparameter held in a tensor would need a host sync to
    validate, and hyperparameters are runtime scalars in this library.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # reprlib: a tensor or a long list passed by mistake is shown abridged.
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__} {reprlib.repr(value)}")
    v = float(value)
    bounds = ((">", gt, operator.gt), (">=", ge, operator.ge), ("<", lt, operator.lt), ("<=", le, operator.le))
    given = [(f"{sign} {bound:g}", holds(v, bound)) for sign, bound, holds in bounds if bound is not None]
    if not (math.isfinite(v) and all(ok for _, ok in given)):
        what = " and ".join(text for text, _ in given)
        raise ValueError(f"{name}: expected a finite number{' ' + what if what else ''}, got {value!r}")
    return v


# The values of ``validate=`` (see ``check_target_range``).
VALIDATE_MODES = ("async", "sync")


def _asserts_on_device(device: torch.device) -> bool:
    """Whether a data-dependent check on ``device`` asserts on the device instead of reading the result
    back (a seam: the tests patch it to exercise the CUDA path on CPU)."""
    return device.type == "cuda"


def target_check_site(device: torch.device, validate: str = "async") -> str:
    """Where the target-range check of tensors on ``device`` runs: ``"host"`` (read back, raise
    ``ValueError``), ``"device"`` (``torch._assert_async``, no host sync) or ``"skip"`` (meta tensors:
    there are no values to read).

    While ``torch.compile`` traces, always ``"device"``: a host read would break the graph.
    """
    if device.type == "meta":
        return "skip"
    if torch.compiler.is_compiling() or (_asserts_on_device(device) and validate == "async"):
        return "device"
    return "host"


def fail_if(bad: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when the 0-d bool tensor ``bad`` is true.

    Checked eagerly on CPU. On CUDA, and under ``torch.compile`` (where a data-dependent ``if``
    would break the graph), ``torch._assert_async`` raises instead, without a host sync; on meta
    tensors nothing is checked.
    """
    site = target_check_site(bad.device)
    if site == "device":
        torch._assert_async(~bad, message)
    elif site == "host" and bool(bad):
        raise ValueError(message)


def check_target_range(
    name: str, targets: torch.Tensor, vocab: Union[int, torch.Tensor], ignore_index: int, validate: str = "async"
) -> None:
    """Every id must lie in ``[0, vocab)`` or equal ``ignore_index``.

    Where the check runs is ``target_check_site``: on the host (CPU tensors, or ``validate="sync"``:
    one read-back of three numbers, a host synchronisation on CUDA) it raises ``ValueError`` naming
    the first bad id and their count; on the device (CUDA with ``validate="async"``, and whenever
    compiling) it is ``torch._assert_async``: a device-side assert reported at a later
    synchronisation, fatal to the CUDA context; on meta tensors it is skipped.
    ``vocab`` may be a 0-d tensor (the global size of a vocabulary split, known on the device only).
    """
    site = target_check_site(targets.device, validate)
    if site == "skip" or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if site == "device":
        # Formatting a tensor would read it back: name the bound only when it is a Python int.
        bound = vocab if isinstance(vocab, int) else "V"
        torch._assert_async(~bad.any(), f"{name}: target ids must be in [0, {bound}) or ignore_index={ignore_index}")
        return
    flat = bad.reshape(-1)
    # One read-back: the count of bad ids, the first of them and the bound.
    count, first, bound = torch.stack([
        flat.sum(), targets.reshape(-1)[flat.to(torch.uint8).argmax()].long(),
        torch.as_tensor(vocab, device=flat.device).long(),
    ]).tolist()
    if count:
        raise ValueError(
            f"{name}: expected ids in [0, {bound}) or ignore_index={ignore_index}, got {first} ({count} bad id(s))"
        )


def check_reference_pair(ref_hidden: object, ref_weight: object, *, required_by: Optional[str] = None) -> bool:
    """True when a reference model is given: its hidden states and lm-head weight come together.

    With ``required_by`` (the name of a loss that needs the full reference distribution) the pair
    must be given.
    """
    given = ref_hidden is not None or ref_weight is not None
    if (given and (ref_hidden is None or ref_weight is None)) or (required_by and not given):
        who = required_by or "a reference model"
        raise ValueError(
            f"{who} needs both ref_hidden and ref_weight, got "
            f"ref_hidden={'None' if ref_hidden is None else 'a tensor'}, "
            f"ref_weight={'None' if ref_weight is None else 'a tensor'}"
        )
    return given


def validate_vocab_stats_inputs(
    hidden: object,
    weight: object,
    targets: object,
    bias: object,
    ref_hidden: object,
    ref_weight: object,
    ref_bias: object,
    kl: bool,
    entropy: bool,
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    impl: str,
    filter_eps: object = None,
    *,
    vocab_parallel: bool = False,
    validate: object = "async",
) -> Tuple[Tuple[int, ...], bool, str]:
    """Checks the arguments of ``linear_vocab_stats``.

    ``vocab_parallel=True`` leaves the id-range check and the empty-shard check to the caller: a
    vocabulary-parallel call knows the global vocabulary size only after a collective, and a rank
    whose shard alone is empty must not raise before the others (they would wait in it until the
    group's timeout); ``vocab_shard`` raises on every rank instead.

    ``validate`` chooses where the id-range check runs (``check_target_range``).

    Returns ``(token_shape, several_targets_per_token, resolved_impl)``.
    """
    check_choice("validate", validate, VALIDATE_MODES)
    hidden = check_tensor("hidden", hidden)
    weight = check_tensor("weight", weight)
    targets = check_tensor("targets", targets)
    check_float_tensor("hidden", hidden)
    check_float_tensor("weight", weight)
    check_int("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (..., D), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, D), got {_shape(weight)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden and weight disagree on D: hidden has shape {_shape(hidden)} (D={hidden.shape[-1]}), "
            f"weight has shape {_shape(weight)} (D={dim})"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype: hidden is {hidden.dtype}, weight is {weight.dtype}")
    if vocab == 0 and not vocab_parallel:
        raise ValueError("weight: expected a non-empty vocabulary, got V=0")
    token_shape = _shape(hidden)[:-1]
    if _shape(targets) == token_shape:
        multi = False
    elif targets.dim() == len(token_shape) + 1 and _shape(targets)[:-1] == token_shape:
        multi = True
    else:
        raise ValueError(
            f"targets: expected shape {token_shape} or {token_shape} + (J,) to match hidden {_shape(hidden)}, "
            f"got {_shape(targets)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        # Compared with int64 ids on the device: a larger Python int cannot be converted.
        raise ValueError(f"ignore_index: expected an int64 value in [-2**63, 2**63), got {ignore_index}")
    if bias is not None:
        bias = check_tensor("bias", bias)
        if _shape(bias) != (vocab,):
            raise ValueError(f"bias: expected shape ({vocab},), got {_shape(bias)}")
        check_float_tensor("bias", bias)

    has_ref = check_reference_pair(ref_hidden, ref_weight)
    if has_ref:
        ref_hidden = check_tensor("ref_hidden", ref_hidden)
        ref_weight = check_tensor("ref_weight", ref_weight)
        check_float_tensor("ref_hidden", ref_hidden)
        check_float_tensor("ref_weight", ref_weight)
        if ref_weight.dim() != 2 or ref_weight.shape[0] != vocab:
            raise ValueError(
                f"ref_weight: expected shape ({vocab}, D_ref) to match weight's V, got {_shape(ref_weight)}"
            )
        if _shape(ref_hidden)[:-1] != token_shape or ref_hidden.dim() != hidden.dim():
            raise ValueError(
                f"ref_hidden: expected token shape {token_shape} like hidden {_shape(hidden)}, got {_shape(ref_hidden)}"
            )
        if ref_hidden.shape[-1] != ref_weight.shape[1]:
            raise ValueError(
                f"ref_hidden and ref_weight disagree on D: ref_hidden has D={ref_hidden.shape[-1]}, "
                f"ref_weight has shape {_shape(ref_weight)}"
            )
        if ref_hidden.dtype != ref_weight.dtype:
            raise TypeError(
                f"ref_hidden and ref_weight must share a dtype: got {ref_hidden.dtype} and {ref_weight.dtype}"
            )
        if ref_bias is not None:
            ref_bias = check_tensor("ref_bias", ref_bias)
            if _shape(ref_bias) != (vocab,):
                raise ValueError(f"ref_bias: expected shape ({vocab},), got {_shape(ref_bias)}")
            check_float_tensor("ref_bias", ref_bias)
    elif ref_bias is not None:
        raise ValueError("ref_bias was given without ref_hidden/ref_weight")
    if kl and not has_ref:
        raise ValueError("kl=True needs a reference: pass ref_hidden and ref_weight")

    check_same_device(
        [("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias),
         ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)]
    )
    check_number("temperature", temperature, gt=0.0)
    if softcap is not None:
        check_number("softcap", softcap, gt=0.0)
    if filter_eps is not None and filter_eps != "auto":
        if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not (
            0 <= filter_eps < 1 and math.isfinite(filter_eps)
        ):
            raise ValueError(f"filter_eps: expected None, 'auto' or a number in [0, 1), got {filter_eps!r}")
    resolved = resolve_impl(impl, hidden.device)
    supported = backend_entry(resolved).dtypes
    for name, t in (("hidden", hidden), ("ref_hidden", ref_hidden)):
        if t is not None and t.dtype not in supported:
            names = "/".join(str(d).replace("torch.", "") for d in sorted(supported, key=str))
            raise TypeError(
                f"impl={resolved!r} supports {names} inputs, got {name} of dtype {t.dtype}; "
                "use impl='torch' for float64"
            )
    if not vocab_parallel:
        check_target_range("targets", targets, vocab, ignore_index, validate)
    return token_shape, multi, resolved


# ---------------------------------------------------------------------------------------------
# Loss arguments: choices, shapes, batch layouts, references
# ---------------------------------------------------------------------------------------------


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices``; returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], hint: str = "") -> None:
    """``t.shape`` must equal ``expected``; ``hint`` says where the expectation comes from."""
    if _shape(t) != tuple(expected):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {_shape(t)}")


def check_all_or_none(named: Dict[str, object]) -> bool:
    """Either every value is given or none is; returns True when all are given."""
    given = [k for k, v in named.items() if v is not None]
    if given and len(given) != len(named):
        missing = [k for k in named if k not in given]
        raise ValueError(
            f"{', '.join(named)} must be given together: got {', '.join(given)} but not {', '.join(missing)}"
        )
    return bool(given)


def check_sequence_batch(
    name: str, hidden: object, targets: object, *, targets_name: str = "targets"
) -> Tuple[int, int]:
    """``hidden (R, T, D)`` floating point and ``targets (R, T)`` integer ids; returns ``(R, T)``."""
    hidden = check_float_tensor(name, hidden)
    targets = check_tensor(targets_name, targets)
    if hidden.dim() != 3:
        raise ValueError(f"{name}: expected shape (rows, T, D), got {_shape(hidden)}")
    check_int(targets_name, targets)
    check_shape(targets_name, targets, _shape(hidden)[:2], f"the (rows, T) of {name} {_shape(hidden)}")
    return int(hidden.shape[0]), int(hidden.shape[1])


def check_pair_rows(name: str, rows: int) -> int:
    """A preference batch stacks ``[chosen; rejected]``: ``rows`` must be even and > 0. Returns B."""
    if rows <= 0 or rows % 2 != 0:
        raise ValueError(
            f"{name}: expected an even, non-zero number of rows 2B stacked [chosen; rejected], got {rows} rows"
        )
    return rows // 2


# What ``resolve_reference`` returns.
REFERENCE_MODEL, REFERENCE_LOGP, REFERENCE_FREE, NO_REFERENCE = "model", "logp", "free", "none"


def resolve_reference(
    who: str,
    ref_hidden: object,
    ref_weight: object,
    ref_logp: object,
    *,
    reference_free: Optional[bool] = None,
    required: Optional[str] = None,
    hint: str = "",
) -> str:
    """Which reference the caller of a loss gave, at most one of:

    * ``"model"``: ``ref_hidden`` and ``ref_weight`` (the reference's log-probs come from the same
      ``linear_vocab_stats`` pass as the policy's);
    * ``"logp"``: precomputed ``ref_logp``;
    * ``"free"``: ``reference_free=True`` (only for losses that take that flag; ``None`` = not offered);
    * ``"none"``: nothing, allowed only when ``required`` is ``None``. Otherwise ``required`` says
      why one is needed (e.g. ``"beta=0.04 > 0"``) and the error names it, followed by ``hint``.
    """
    has_model = check_reference_pair(ref_hidden, ref_weight)
    options = [("ref_hidden/ref_weight", has_model), ("ref_logp", ref_logp is not None)]
    if reference_free is not None:
        options.append(("reference_free=True", bool(reference_free)))
    given = [name for name, present in options if present]
    if len(given) == 1 or (not given and required is None):
        return {"ref_hidden/ref_weight": REFERENCE_MODEL, "ref_logp": REFERENCE_LOGP,
                "reference_free=True": REFERENCE_FREE}[given[0]] if given else NO_REFERENCE
    choices = "ref_hidden and ref_weight, or a precomputed ref_logp" + (
        ", or reference_free=True" if reference_free is not None else "")
    why = f"{required} needs a reference; " if required and not given else ""
    rule = "pass one, not both" if given else "pass one"
    raise ValueError(f"{who}: {why}expected exactly one reference: {choices}; got {', '.join(given) or 'none'} "
                     f"({rule}){'; ' + hint if hint and not given else ''}")
