"""The autograd Function behind ``linear_vocab_stats`` and the choice of implementation.

Recompute-versus-store: forward saves only its inputs and O(N) per-token statistics (``lse``,
``ref_lse``, entropy); backward recomputes the logit tiles. Storing ``dz`` or computing gradients in
forward (as some fused CE losses do) would be wrong here, because the per-token cotangents of a
preference or KL loss are only known after the loss is formed from these statistics.

Gradient bookkeeping done here (so implementations only see METHODS.md §1 scalars): ``logp_j =
z_{y_j} − lse`` gives ``g_j = ∂L/∂logp_j`` at the target logit and ``−Σ_j g_j`` on ``lse``.
``ref_logp`` is non-differentiable; ``kl`` is clamped at 0 in forward (rounding only; documented)
and its gradient is the unclamped one.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from tokpo_kernels._types import RawStats, StatGrads
from tokpo_kernels.ops.params import StatsParams
from tokpo_kernels.reference.naive import naive_vocab_stats
from tokpo_kernels.torch_impl.chunked import chunked_backward, chunked_forward

Outputs = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def _backend(impl: str):
    if impl == "torch":
        return chunked_forward, chunked_backward
    if impl == "triton":
        # Imported lazily: building the Triton kernels' Python objects is only needed when used.
        from tokpo_kernels.kernels.launch import triton_backward, triton_forward

        return triton_forward, triton_backward
    raise ValueError(f"no fused backend for impl={impl!r}")


def _float_out(x: torch.Tensor) -> torch.Tensor:
    """fp32 results for fp32/bf16/fp16 inputs; fp64 inputs keep fp64 (oracle precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _VocabStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, params, impl):
        fwd, _ = _backend(impl)
        tvalid = targets != params.ignore_index
        row_valid = tvalid.any(-1)
        raw: RawStats = fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, tvalid, row_valid, params)
        zero = raw.lse.new_zeros(())
        rv = row_valid
        lse = torch.where(rv, raw.lse, zero)
        logp = torch.where(tvalid, raw.tgt_logit - lse[:, None], zero)
        outs = [logp, lse]
        ref_logp = kl = ent = None
        if raw.ref_lse is not None:
            ref_lse = torch.where(rv, raw.ref_lse, zero)
            ref_logp = torch.where(tvalid, raw.ref_tgt_logit - ref_lse[:, None], zero)
        else:
            ref_lse = None
        if raw.kl is not None:
            kl = torch.where(rv, raw.kl, zero)
        if raw.entropy is not None:
            ent = torch.where(rv, raw.entropy, zero)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, ref_lse, ent)
        ctx.params = params
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        empty = logp.new_empty(0)
        if ref_logp is not None:
            ctx.mark_non_differentiable(ref_logp)
        # autograd.Function outputs must be tensors: absent statistics travel as empty tensors.
        return logp, lse, (kl if kl is not None else empty), (ent if ent is not None else empty), (
            ref_logp if ref_logp is not None else empty
        )

    @staticmethod
    def backward(ctx: Any, g_logp, g_lse, g_kl, g_ent, _g_ref):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, lse, ref_lse, ent = ctx.saved_tensors
        params: StatsParams = ctx.params
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not any(needs) or (g_logp is None and g_lse is None and g_kl is None and g_ent is None):
            return (None,) * 9
        tvalid = targets != params.ignore_index
        row_valid = tvalid.any(-1)
        n, j = targets.shape
        zero = lse.new_zeros(())
        g_tgt = torch.where(tvalid, g_logp, zero) if g_logp is not None else lse.new_zeros(n, j)
        g_lse_total = torch.where(row_valid, g_lse, zero) if g_lse is not None else lse.new_zeros(n)
        g_lse_total = g_lse_total - g_tgt.sum(-1)
        if g_kl is not None and g_kl.numel() == 0:
            g_kl = None
        if g_ent is not None and g_ent.numel() == 0:
            g_ent = None
        if g_kl is not None:
            g_kl = torch.where(row_valid, g_kl, zero)
        if g_ent is not None:
            g_ent = torch.where(row_valid, g_ent, zero)
        grads = StatGrads(g_lse_total.contiguous(), g_tgt.contiguous(), g_kl, g_ent)
        _, bwd = _backend(ctx.impl)
        dh, dw, db = bwd(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, tvalid, row_valid,
            lse, ref_lse, ent, grads, params, needs,
        )
        return dh, dw, db, None, None, None, None, None, None


def vocab_stats_2d(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    params: StatsParams,
    impl: str,
) -> Outputs:
    """Statistics of flattened, validated inputs: ``hidden (N, D)``, ``targets (N, J)``.

    Returns ``(logp (N, J), lse (N,), ref_logp, kl, entropy)``; absent ones are ``None``.
    """
    if impl == "naive":
        logp, lse, ref_logp, kl, ent = naive_vocab_stats(
            hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias, params
        )
        return _float_out(logp), _float_out(lse), _opt(ref_logp), _opt(kl), _opt(ent)
    # The reference model never receives gradient.
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    logp, lse, kl, ent, ref_logp = _VocabStatsFunction.apply(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, targets, params, impl
    )
    return (
        _float_out(logp),
        _float_out(lse),
        _float_out(ref_logp) if ref_hidden is not None else None,
        _float_out(kl) if params.kl else None,
        _float_out(ent) if params.entropy else None,
    )


def _opt(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else _float_out(x)
