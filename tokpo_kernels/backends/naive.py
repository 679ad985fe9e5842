"""``impl="naive"``: materialise the full (N, V) logits, forward and backward.

This is how the papers' reference code computes the statistics (up to its ``log(softmax)``, which
is replaced by ``log_softmax`` so that it is NaN-free). It is deliberately plain: the matmul runs
in the input dtype (as a model's lm-head does), the logits are upcast to at least fp32, and with
float64 inputs everything stays float64. Its backward forms the whole (N, V) logit gradient at
once. Memory is O(N·V): a baseline, not a training path.

Rows without a target (``targets.row_valid`` false) are zeroed before the matmul, not skipped: the
backend keeps the full (N, V) shape, and an ignored row may hold anything (NaN or inf padding) that
must reach no statistic and no gradient, as on the compacting backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, TargetRows
from tokpo_kernels.backends.registry import BackendEntry, register_backend
from tokpo_kernels.numerics import accum_dtype, transform_grad_, transform_logits, universal_dz_


def _raw(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Raw logits ``h Wᵀ + b`` in the accumulation dtype, ignored rows of ``h`` zeroed first.

    The matmul runs in the input dtype (the baseline's point); a bias of the weight's dtype joins it
    there, as in a model's lm-head, while a bias of another dtype (``linear_vocab_stats`` has cast it
    to the accumulation dtype) is added after the upcast.
    """
    h = h.masked_fill(~rows[:, None], 0)
    acc = accum_dtype(h.dtype)
    if b is None or b.dtype == w.dtype:
        return F.linear(h, w, b).to(acc)
    return F.linear(h, w).to(acc) + b.to(acc)


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], rows: torch.Tensor,
            params: ImplParams) -> torch.Tensor:
    return transform_logits(_raw(h, w, b, rows), params.temperature, params.softcap)


def _target_logits(z: torch.Tensor, targets: TargetRows) -> torch.Tensor:
    return z.gather(-1, targets.safe_ids())


def _kl(ref_logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (ref_logq.exp() * (ref_logq - logp)).sum(-1)


class NaiveBackend:
    """Full logits, plain formulas; the backward forms the whole (N, V) logit gradient at once."""

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        h, w, b, rh, rw, rb = head
        z = _logits(h, w, b, targets.row_valid, params)
        logp = torch.log_softmax(z, dim=-1)
        stats = dict(
            tgt_logit=_target_logits(z, targets),
            lse=torch.logsumexp(z, dim=-1),
            entropy=-(logp.exp() * logp).sum(-1) if params.entropy else None,
            max_logit=z.amax(-1) if params.max_logit else None,
            logit_sum=z.sum(-1) if params.logit_sum else None,
        )
        if rh is not None:
            zr = _logits(rh, rw, rb, targets.row_valid, params)
            stats.update(ref_tgt_logit=_target_logits(zr, targets), ref_lse=torch.logsumexp(zr, dim=-1))
            if params.kl:
                stats["kl"] = _kl(torch.log_softmax(zr, dim=-1), logp).clamp_min(0.0)
        return RawStats(**stats)

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        (h, w, b, rh, rw, rb), targets, saved, grads, params, needs = inputs
        acc = accum_dtype(h.dtype)
        raw = _raw(h, w, b, targets.row_valid)
        z = transform_logits(raw, params.temperature, params.softcap)
        logq = None
        if grads.g_kl is not None:
            logq = torch.log_softmax(_logits(rh, rw, rb, targets.row_valid, params), dim=-1)
        # The whole (N, V) gradient of the logits at once, by the universal gradient (a backward
        # custom op runs below autograd, so it cannot differentiate through the logits itself).
        dz = universal_dz_(torch.log_softmax(z, dim=-1), grads, targets.safe_ids(), saved.entropy, logq)
        transform_grad_(dz, raw, params.temperature, params.softcap)
        # The projection's gradients in the input dtype, as autograd through a bf16/fp16 lm-head
        # computes them (this backend is the low-precision baseline of the three-way test).
        # Ignored rows have dz = 0; their hidden states are zeroed too, since 0·NaN would still be NaN.
        dr = dz.to(h.dtype)
        h = h.masked_fill(~targets.row_valid[:, None], 0)
        return HeadGrads(
            (dr @ w).to(acc) if needs.hidden else None,
            (dr.t() @ h).to(acc) if needs.weight else None,
            dr.sum(0).to(acc) if needs.bias else None,
        )


register_backend(
    BackendEntry(
        name="naive",
        load=NaiveBackend,
        vocab_parallel=False,
        summary="full (N, V) logits: the baseline the fused backends are measured against",
    )
)
