"""The differentiable op behind ``linear_vocab_stats``: two ``torch.library`` custom ops and their autograd.

``tokpo_kernels::vocab_stats_forward`` and ``tokpo_kernels::vocab_stats_backward`` wrap the chosen
implementation (``"torch"`` chunked PyTorch or ``"triton"``) and, when a process group is named,
the vocabulary-parallel collectives. Registered as custom ops with fake (meta) implementations, they
are opaque, shape-known nodes for ``torch.compile``: a compiled training step traces through the
losses without a graph break, and the implementations keep their data-dependent compaction.

Recompute-versus-store: forward saves only its inputs and O(N) per-token statistics (``lse``,
``ref_lse``, entropy); backward recomputes the logit tiles. Storing ``dz`` or computing gradients in
forward (as some fused CE losses do) would be wrong here, because the per-token cotangents of a
preference or KL loss are only known after the loss is formed from these statistics.

Target ids reach the ops as ``ids`` (the id inside this device's vocabulary rows, ``-1`` when the id
is ignored or, vocabulary-parallel, owned by another rank) plus the global validity mask ``tvalid``.

Gradient bookkeeping done here (so implementations only see METHODS.md §1 scalars): ``logp_j =
z_{y_j} − lse`` gives ``g_j = ∂L/∂logp_j`` at the target logit (applied by the rank owning the id)
and ``−Σ_j g_j`` on ``lse`` (applied by every rank: ``lse`` spans the whole vocabulary).
``ref_logp`` is non-differentiable; ``kl`` is clamped at 0 in forward (rounding only; documented)
and its gradient is the unclamped one. Double backward is not supported (the backward op has no
autograd formula; PyTorch says so if one is attempted).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from tokpo_kernels._types import RawStats, StatGrads
from tokpo_kernels.distributed.vocab_parallel import (
    VocabShard,
    all_reduce_hidden_grad,
    combine_across_ranks,
    localize_targets,
)
from tokpo_kernels.numerics import accum_dtype
from tokpo_kernels.ops.params import StatsParams, resolve_filter_eps
from tokpo_kernels.reference.naive import naive_vocab_stats
from tokpo_kernels.torch_impl.chunked import chunked_backward, chunked_forward

Outputs = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _backend(impl: str):
    if impl == "torch":
        return chunked_forward, chunked_backward
    if impl == "triton":
        # Imported lazily: building the Triton kernels' Python objects is only needed when used.
        from tokpo_kernels.kernels.launch import triton_backward, triton_forward

        return triton_forward, triton_backward
    raise ValueError(f"no fused backend for impl={impl!r}")


def _absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A 0-element placeholder for an output that was not asked for (custom-op outputs are tensors).

    Sliced from its own 1-element allocation: plain 0-element tensors all have data pointer 0,
    which autograd's custom-op aliasing check reads as several outputs sharing memory.
    """
    return like.new_empty(1, dtype=dtype or like.dtype)[:0]


def _present(x: Tensor) -> Optional[Tensor]:
    return None if x.numel() == 0 else x


@torch.library.custom_op("tokpo_kernels::vocab_stats_forward", mutates_args=())
def vocab_stats_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    ids: Tensor, tvalid: Tensor,
    temperature: float, softcap: Optional[float], kl: bool, entropy: bool, filter_eps: Optional[float],
    impl: str, group_name: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logp, lse, ref_logp, ref_lse, kl, entropy)`` of flattened rows; absent ones have 0 elements.

    ``filter_eps`` is unused here; it is an input so that the backward finds it among the inputs.
    """
    params = StatsParams(ignore_index=-1, temperature=temperature, softcap=softcap, kl=kl, entropy=entropy)
    fwd, _ = _backend(impl)
    owned = ids >= 0
    row_valid = tvalid.any(-1)
    raw: RawStats = fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, owned, row_valid, params)
    if group_name:
        raw = combine_across_ranks(raw, owned, row_valid, group_name)
    dt = accum_dtype(hidden.dtype)
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    lse = torch.where(row_valid, raw.lse.to(dt), zero)
    logp = torch.where(tvalid, raw.tgt_logit.to(dt) - lse[:, None], zero)
    ref_logp, ref_lse = _absent(hidden, dt), _absent(hidden, dt)
    if raw.ref_lse is not None:
        ref_lse = torch.where(row_valid, raw.ref_lse.to(dt), zero)
        ref_logp = torch.where(tvalid, raw.ref_tgt_logit.to(dt) - ref_lse[:, None], zero)
    kl_t = torch.where(row_valid, raw.kl.to(dt), zero) if raw.kl is not None else _absent(hidden, dt)
    ent = torch.where(row_valid, raw.entropy.to(dt), zero) if raw.entropy is not None else _absent(hidden, dt)
    return logp, lse, ref_logp, ref_lse, kl_t, ent


@vocab_stats_forward.register_fake
def _forward_fake(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid,
                  temperature, softcap, kl, entropy, filter_eps, impl, group_name):
    n, j = ids.shape
    dt = accum_dtype(hidden.dtype)
    new = lambda *shape: hidden.new_empty(shape, dtype=dt)  # noqa: E731
    gap = lambda: _absent(hidden, dt)  # noqa: E731
    has_ref = ref_hidden is not None
    return (
        new(n, j), new(n), new(n, j) if has_ref else gap(), new(n) if has_ref else gap(),
        new(n) if kl else gap(), new(n) if entropy else gap(),
    )


@torch.library.custom_op("tokpo_kernels::vocab_stats_backward", mutates_args=())
def vocab_stats_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    ids: Tensor, tvalid: Tensor, lse: Tensor, ref_lse: Optional[Tensor], entropy: Optional[Tensor],
    g_lse: Tensor, g_tgt: Tensor, g_kl: Optional[Tensor], g_entropy: Optional[Tensor],
    temperature: float, softcap: Optional[float], filter_eps: Optional[float],
    impl: str, group_name: str, need_dh: bool, need_dw: bool, need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(∂hidden, ∂weight, ∂bias)`` in the inputs' dtypes; a gradient not asked for has 0 elements."""
    params = StatsParams(ignore_index=-1, temperature=temperature, softcap=softcap, filter_eps=filter_eps)
    _, bwd = _backend(impl)
    grads = StatGrads(g_lse, g_tgt, g_kl, g_entropy)
    dh, dw, db = bwd(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, ids >= 0, tvalid.any(-1),
        lse, ref_lse, entropy, grads, params, (need_dh, need_dw, need_db),
    )
    if group_name and dh is not None:
        # Implementations return accumulation-precision (fp32/fp64) gradients: sum those, cast once.
        dh = all_reduce_hidden_grad(dh, group_name)
    return (
        dh.to(hidden.dtype) if dh is not None else _absent(hidden),
        dw.to(weight.dtype) if dw is not None else _absent(weight),
        db.to(bias.dtype) if db is not None else _absent(weight),
    )


@vocab_stats_backward.register_fake
def _backward_fake(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid, lse, ref_lse, entropy,
                   g_lse, g_tgt, g_kl, g_entropy, temperature, softcap, filter_eps, impl, group_name,
                   need_dh, need_dw, need_db):
    # Contiguous like the real outputs (empty_like would copy a transposed input's strides).
    return (
        hidden.new_empty(hidden.shape) if need_dh else _absent(hidden),
        weight.new_empty(weight.shape) if need_dw else _absent(weight),
        bias.new_empty(bias.shape) if need_db else _absent(weight),
    )


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid,
     temperature, softcap, _kl, _entropy, filter_eps, impl, group_name) = inputs
    _, lse, _, ref_lse, _, ent = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid, lse, ref_lse, ent)
    ctx.options = (temperature, softcap, filter_eps, impl, group_name)
    # Unused statistics then arrive as None, which lets the backward skip e.g. the reference recompute.
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, g_logp, g_lse, _g_ref_logp, _g_ref_lse, g_kl, g_ent):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid, lse, ref_lse, ent = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    g_kl = None if g_kl is None or g_kl.numel() == 0 else g_kl
    g_ent = None if g_ent is None or g_ent.numel() == 0 else g_ent
    none = (None,) * 15
    if not (need_dh or need_dw or need_db) or (g_logp is None and g_lse is None and g_kl is None and g_ent is None):
        return none
    n, j = ids.shape
    row_valid = tvalid.any(-1)
    zero = lse.new_zeros(())
    g_logp = torch.where(tvalid, g_logp, zero) if g_logp is not None else lse.new_zeros(n, j)
    g_lse_total = torch.where(row_valid, g_lse, zero) if g_lse is not None else lse.new_zeros(n)
    g_lse_total = (g_lse_total - g_logp.sum(-1)).contiguous()
    g_tgt = torch.where(ids >= 0, g_logp, zero).contiguous()
    if g_kl is not None:
        g_kl = torch.where(row_valid, g_kl, zero)
    if g_ent is not None:
        g_ent = torch.where(row_valid, g_ent, zero)
    temperature, softcap, filter_eps, impl, group_name = ctx.options
    dh, dw, db = vocab_stats_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid,
        lse, _present(ref_lse), _present(ent), g_lse_total, g_tgt, g_kl, g_ent,
        temperature, softcap, filter_eps, impl, group_name, need_dh, need_dw, need_db,
    )
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + none[3:]


vocab_stats_forward.register_autograd(_backward, setup_context=_setup_context)


def vocab_stats_2d(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor],
    params: StatsParams,
    impl: str,
    shard: Optional[VocabShard] = None,
) -> Outputs:
    """Statistics of flattened, validated inputs: ``hidden (N, D)``, ``targets (N, J)``.

    With ``shard`` the weights hold this rank's rows of a vocabulary split over ``shard``'s group.
    Returns ``(logp (N, J), lse (N,), ref_logp, kl, entropy)``; absent ones are ``None``.
    """
    if impl == "naive":
        logp, lse, ref_logp, kl, ent = naive_vocab_stats(
            hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, params
        )
        return _opt(logp), _opt(lse), _opt(ref_logp), _opt(kl), _opt(ent)
    # The reference model never receives gradient.
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    tvalid = targets != params.ignore_index
    if shard is None:
        ids = torch.where(tvalid, targets, torch.full_like(targets, -1))
    else:
        ids = localize_targets(targets, tvalid, shard)
    logp, lse, ref_logp, _ref_lse, kl, ent = vocab_stats_forward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, ids, tvalid,
        params.temperature, params.softcap, params.kl, params.entropy,
        resolve_filter_eps(params.filter_eps, hidden.dtype),
        impl, "" if shard is None else shard.group_name,
    )
    return (
        logp,
        lse,
        ref_logp.detach() if ref_hidden is not None else None,
        kl if params.kl else None,
        ent if params.entropy else None,
    )


def _opt(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.to(accum_dtype(x.dtype))
