"""The differentiable op behind ``linear_vocab_stats``: two ``torch.library`` custom ops and their autograd.

``tokpo_kernels::vocab_stats_forward`` and ``tokpo_kernels::vocab_stats_backward`` run the backend
named by ``impl`` (looked up in ``tokpo_kernels.backends``) and, when a process group is named, the
vocabulary-parallel collectives. Registered as custom ops with fake (meta) implementations, they
are opaque, shape-known nodes for ``torch.compile``: a compiled training step traces through the
losses without a graph break, and the backends keep their data-dependent compaction.

Recompute-versus-store: forward saves only its inputs and O(N) per-token statistics (``lse``,
``ref_lse``, entropy); backward recomputes the logit tiles. Storing ``dz`` or computing gradients in
forward (as some fused CE losses do) would be wrong here, because the per-token cotangents of a
preference or KL loss are only known after the loss is formed from these statistics.

Target ids reach the ops as ``ids`` (the id inside this device's vocabulary rows, ``-1`` when the id
is ignored or, vocabulary-parallel, owned by another rank) plus the global validity mask
``target_valid`` (the id is not ``ignore_index``). A backend sees ``TargetRows(ids, owned =
ids >= 0, row_valid = target_valid.any(-1))``.

Gradient bookkeeping done here (so backends only see the per-row scalars of ``docs/methods.md`` §1):
``logp_j = z_{y_j} − lse`` gives ``g_j = ∂L/∂logp_j`` at the target logit (applied by the rank
owning the id) and ``−Σ_j g_j`` on ``lse`` (applied by every rank: ``lse`` spans the whole
vocabulary). ``ref_logp`` and ``max_logit`` are non-differentiable; ``kl`` is clamped at 0 in forward
(rounding only; documented) and its gradient is the unclamped one. Double backward is not supported
(the backward op has no autograd formula; PyTorch says so if one is attempted).

``torch.func``: the autograd that ``register_autograd`` installs is an ``autograd.Function`` that
torch generates without a ``setup_context`` (``torch/_library/autograd.py``, torch 2.13), and
functorch's ``grad``/``vjp`` refuse such a Function. So while a functorch transform is active (and
only then: eager autograd and ``torch.compile`` keep the plain custom op), the forward op is called
through ``_FunctorchVocabStats``, an ``autograd.Function`` with the same ``_setup_context`` and
``_backward``; functorch runs its forward one level down, where the custom op sees plain tensors.
``torch.vmap`` and forward-mode AD are refused before any kernel (``refuse_unsupported_transforms``):
the ops have no batching rule (none is needed: the public function takes any leading token shape)
and no forward derivative. ``jacrev`` works: it vmaps only the backward, which
``_FunctorchVocabStatsBackward`` runs once per cotangent. Meta tensors reach the fake
implementations (registered by ``register_fake`` as the ops' Meta kernels): nothing runs.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from tokpo_kernels._types import (
    BackwardInputs,
    GradNeeds,
    HeadTensors,
    ImplParams,
    RawStats,
    SavedStats,
    StatGrads,
    TargetRows,
    resolve_filter_eps,
)
from tokpo_kernels.backends import Backend, backend_entry, get_backend
from tokpo_kernels.distributed.vocab_parallel import (
    VocabShard,
    all_reduce_hidden_grad,
    combine_across_ranks,
    localize_targets,
)
from tokpo_kernels.numerics import accum_dtype

# (logp, lse, ref_logp, kl, entropy, max_logit, logit_sum) of flattened rows; absent ones are None.
Outputs = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
                Optional[Tensor]]


def _backend(impl: str) -> Backend:
    """The backend object behind ``impl`` (a seam the tests spy on)."""
    return get_backend(impl)


def _absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A 0-element placeholder for an output that was not asked for (custom-op outputs are tensors).

    Sliced from its own 1-element allocation: plain 0-element tensors all have data pointer 0,
    which autograd's custom-op aliasing check reads as several outputs sharing memory.
    """
    return like.new_empty(1, dtype=dtype or like.dtype)[:0]


def _present(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or x.numel() == 0 else x


def _targets(ids: Tensor, target_valid: Tensor) -> TargetRows:
    return TargetRows(ids=ids, owned=ids >= 0, row_valid=target_valid.any(-1))


@torch.library.custom_op("tokpo_kernels::vocab_stats_forward", mutates_args=())
def vocab_stats_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    ids: Tensor, target_valid: Tensor,
    temperature: float, softcap: Optional[float], kl: bool, entropy: bool, max_logit: bool, logit_sum: bool,
    filter_eps: Optional[float], impl: str, group_name: str, chunk_budget: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logp, lse, ref_logp, ref_lse, kl, entropy, max_logit, logit_sum, row_order)`` of flattened
    rows; absent ones have 0 elements. ``logit_sum`` is over the global vocabulary (the caller
    divides by ``V``). ``row_order`` (int64, not differentiable) is the backend's row permutation,
    saved for the backward so that ignored rows are compacted once per step.

    ``filter_eps`` is unused here; it is an input so that the backward finds it among the inputs.
    """
    params = ImplParams(temperature, softcap, kl, entropy, max_logit, logit_sum, chunk_budget=chunk_budget)
    targets = _targets(ids, target_valid)
    head = HeadTensors(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    raw: RawStats = _backend(impl).forward(head, targets, params)
    if group_name:
        raw = combine_across_ranks(raw, targets.owned, targets.row_valid, group_name)
    acc = accum_dtype(hidden.dtype)
    zero = torch.zeros((), dtype=acc, device=hidden.device)

    def per_row(x: Optional[Tensor]) -> Tensor:
        return torch.where(targets.row_valid, x.to(acc), zero) if x is not None else _absent(hidden, acc)

    lse = per_row(raw.lse)
    logp = torch.where(target_valid, raw.tgt_logit.to(acc) - lse[:, None], zero)
    ref_logp, ref_lse = _absent(hidden, acc), _absent(hidden, acc)
    if raw.ref_lse is not None:
        ref_lse = per_row(raw.ref_lse)
        ref_logp = torch.where(target_valid, raw.ref_tgt_logit.to(acc) - ref_lse[:, None], zero)
    row_order = raw.row_order if raw.row_order is not None else _absent(ids)
    return (
        logp, lse, ref_logp, ref_lse,
        per_row(raw.kl), per_row(raw.entropy), per_row(raw.max_logit), per_row(raw.logit_sum), row_order,
    )


@vocab_stats_forward.register_fake
def _forward_fake(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid,
                  temperature, softcap, kl, entropy, max_logit, logit_sum, filter_eps, impl, group_name,
                  chunk_budget=None):
    n, j = ids.shape
    acc = accum_dtype(hidden.dtype)

    def new(*shape: int, when: bool = True) -> Tensor:
        return hidden.new_empty(shape, dtype=acc) if when else _absent(hidden, acc)

    has_ref = ref_hidden is not None
    return (
        new(n, j), new(n), new(n, j, when=has_ref), new(n, when=has_ref),
        new(n, when=kl), new(n, when=entropy), new(n, when=max_logit), new(n, when=logit_sum),
        # The backends that compact rows return their (N,) permutation; the others none.
        ids.new_empty(n) if backend_entry(impl).returns_row_order else _absent(ids),
    )


@torch.library.custom_op("tokpo_kernels::vocab_stats_backward", mutates_args=())
def vocab_stats_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    ids: Tensor, target_valid: Tensor, lse: Tensor, ref_lse: Optional[Tensor], entropy: Optional[Tensor],
    g_lse: Tensor, g_tgt: Tensor, g_kl: Optional[Tensor], g_entropy: Optional[Tensor], g_logit_sum: Optional[Tensor],
    temperature: float, softcap: Optional[float], filter_eps: Optional[float],
    impl: str, group_name: str, need_dh: bool, need_dw: bool, need_db: bool,
    row_order: Optional[Tensor] = None, chunk_budget: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(∂hidden, ∂weight, ∂bias)`` in the inputs' dtypes; a gradient not asked for has 0 elements."""
    params = ImplParams(temperature=temperature, softcap=softcap, filter_eps=filter_eps, chunk_budget=chunk_budget)
    dh, dw, db = _backend(impl).backward(BackwardInputs(
        HeadTensors(hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
        _targets(ids, target_valid),
        SavedStats(lse, ref_lse, entropy, _present(row_order)),
        StatGrads(g_lse, g_tgt, g_kl, g_entropy, g_logit_sum),
        params,
        GradNeeds(need_dh, need_dw, need_db),
    ))
    if group_name and dh is not None:
        # Backends return accumulation-precision (fp32/fp64) gradients: sum those, cast once.
        dh = all_reduce_hidden_grad(dh, group_name)
    return (
        dh.to(hidden.dtype) if dh is not None else _absent(hidden),
        dw.to(weight.dtype) if dw is not None else _absent(weight),
        db.to(bias.dtype) if db is not None else _absent(weight),
    )


@vocab_stats_backward.register_fake
def _backward_fake(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid, lse, ref_lse, entropy,
                   g_lse, g_tgt, g_kl, g_entropy, g_logit_sum, temperature, softcap, filter_eps, impl, group_name,
                   need_dh, need_dw, need_db, row_order=None, chunk_budget=None):
    # Contiguous like the real outputs (empty_like would copy a transposed input's strides).
    return (
        hidden.new_empty(hidden.shape) if need_dh else _absent(hidden),
        weight.new_empty(weight.shape) if need_dw else _absent(weight),
        bias.new_empty(bias.shape) if need_db else _absent(weight),
    )


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid,
     temperature, softcap, _kl, _entropy, _max_logit, _logit_sum, filter_eps, impl, group_name, chunk_budget) = inputs
    _, lse, _, ref_lse, _, ent, _, _, row_order = output
    ctx.save_for_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid, lse, ref_lse, ent, row_order
    )
    ctx.options = (temperature, softcap, filter_eps, impl, group_name, chunk_budget)
    # Unused statistics then arrive as None, which lets the backward skip e.g. the reference recompute.
    ctx.set_materialize_grads(False)


def _row_cotangent(g: Optional[Tensor], row_valid: Tensor) -> Optional[Tensor]:
    """A per-row cotangent that flows (``None`` otherwise), zero on rows without targets."""
    g = _present(g)
    return None if g is None else torch.where(row_valid, g, g.new_zeros(()))


def _backward(ctx: Any, g_logp, g_lse, _g_ref_logp, _g_ref_lse, g_kl, g_ent, _g_max_logit, g_logit_sum, _g_row_order):
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid, lse, ref_lse, ent,
     row_order) = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    none = (None,) * len(ctx.needs_input_grad)  # one gradient slot per input of vocab_stats_forward
    row_valid = target_valid.any(-1)
    g_kl, g_ent, g_sum = (_row_cotangent(g, row_valid) for g in (g_kl, g_ent, g_logit_sum))
    flows = g_logp is not None or g_lse is not None or g_kl is not None or g_ent is not None or g_sum is not None
    if not (need_dh or need_dw or need_db) or not flows:
        return none
    n, j = ids.shape
    zero = lse.new_zeros(())
    g_logp = torch.where(target_valid, g_logp, zero) if g_logp is not None else lse.new_zeros(n, j)
    g_lse_total = torch.where(row_valid, g_lse, zero) if g_lse is not None else lse.new_zeros(n)
    g_lse_total = (g_lse_total - g_logp.sum(-1)).contiguous()
    g_tgt = torch.where(ids >= 0, g_logp, zero).contiguous()
    temperature, softcap, filter_eps, impl, group_name, chunk_budget = ctx.options
    backward_op = _FunctorchVocabStatsBackward.apply if _functorch_active() else vocab_stats_backward
    dh, dw, db = backward_op(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid,
        lse, _present(ref_lse), _present(ent), g_lse_total, g_tgt, g_kl, g_ent, g_sum,
        temperature, softcap, filter_eps, impl, group_name, need_dh, need_dw, need_db,
        _present(row_order), chunk_budget,
    )
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + none[3:]


vocab_stats_forward.register_autograd(_backward, setup_context=_setup_context)


class _FunctorchVocabStats(torch.autograd.Function):
    """``vocab_stats_forward`` with its autograd, in the form functorch's ``grad``/``vjp`` accept
    (a ``setup_context``; see the module docstring). Used only while a functorch transform runs."""

    @staticmethod
    def forward(*args: Any) -> Tuple[Tensor, ...]:
        return vocab_stats_forward(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        return _backward(ctx, *grads)


class _FunctorchVocabStatsBackward(torch.autograd.Function):
    """``vocab_stats_backward`` as functorch accepts it (the op's own generated autograd is refused
    there too). Its derivative is not implemented: a second-order transform (``grad`` of ``grad``,
    ``hessian``) raises when it needs one, as double backward does under eager autograd, instead
    of silently differentiating a constant. ``jacrev`` vmaps the backward: the generated rule runs
    the op once per cotangent (torch's batched fallback)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args: Any) -> Tuple[Tensor, ...]:
        return vocab_stats_backward(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        raise RuntimeError(
            "second-order derivatives through linear_vocab_stats are not supported (torch.func.grad of "
            "torch.func.grad, hessian, double backward): its backward has no derivative of its own"
        )


def _functorch_active() -> bool:
    # is_compiling() first: Dynamo then never sees the C query, and a compiled graph keeps the op.
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def refuse_unsupported_transforms() -> None:
    """``ValueError`` under ``torch.vmap`` and forward-mode AD (see the module docstring)."""
    if not _functorch_active():
        return
    kinds = {level.key() for level in torch._C._functorch.get_interpreter_stack() or ()}
    transform = torch._C._functorch.TransformType
    if transform.Jvp in kinds:
        raise ValueError(
            "linear_vocab_stats and the losses do not support forward-mode AD (torch.func.jvp, jacfwd, "
            "hessian): their custom ops have a backward only; use torch.func.vjp, grad or jacrev"
        )
    if transform.Vmap in kinds:
        raise ValueError(
            "linear_vocab_stats and the losses do not support torch.vmap (their custom ops have no "
            "batching rule); they take any leading token shape: pass the batched tensors directly"
        )


def vocab_stats_2d(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor],
    params: ImplParams,
    impl: str,
    shard: Optional[VocabShard] = None,
    *,
    ignore_index: int = -100,
) -> Outputs:
    """Statistics of flattened, validated inputs: ``hidden (N, D)``, ``targets (N, J)`` (int64).

    ``params.logit_sum`` asks for ``mean_logit``; ``params.filter_eps`` is resolved here.
    With ``shard`` the weights hold this rank's rows of a vocabulary split over ``shard``'s group.
    Returns ``(logp (N, J), lse (N,), ref_logp, kl, entropy, max_logit, mean_logit)``; absent ones
    are ``None``.
    """
    # The reference model never receives gradient.
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    target_valid = targets != ignore_index
    if shard is None:
        ids = torch.where(target_valid, targets, torch.full_like(targets, -1))
    else:
        ids = localize_targets(targets, target_valid, shard)
    forward = _FunctorchVocabStats.apply if _functorch_active() else vocab_stats_forward
    logp, lse, ref_logp, _ref_lse, kl, ent, max_logit, logit_sum, _row_order = forward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, target_valid,
        params.temperature, params.softcap, params.kl, params.entropy, params.max_logit, params.logit_sum,
        resolve_filter_eps(params.filter_eps, hidden.dtype),
        impl, "" if shard is None else shard.group_name, params.chunk_budget,
    )
    vocab: Union[int, Tensor] = weight.shape[0] if shard is None else shard.total
    return (
        logp,
        lse,
        ref_logp.detach() if ref_hidden is not None else None,
        kl if params.kl else None,
        ent if params.entropy else None,
        max_logit.detach() if params.max_logit else None,
        logit_sum / vocab if params.logit_sum else None,
    )
