"""``impl="naive"``: materialise the full (N, V) logits and let autograd do the rest.

This is how the papers' reference code computes the statistics (up to its ``log(softmax)``, which
is replaced by ``log_softmax`` so the oracle itself is NaN-free). It is deliberately plain: the
matmul runs in the input dtype (as a model's lm-head does), the logits are upcast to at least fp32,
and with float64 inputs everything stays float64, which makes it the oracle of the test suite.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from tokpo_kernels.numerics import accum_dtype, transform_logits
from tokpo_kernels.ops.params import StatsParams


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], params: StatsParams) -> torch.Tensor:
    raw = F.linear(h, w, b)
    raw = raw.to(accum_dtype(raw.dtype))
    return transform_logits(raw, params.temperature, params.softcap)


def naive_vocab_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    params: StatsParams,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Statistics of flattened tokens: ``hidden (N, D)``, ``targets (N, J)``.

    Returns ``(logp (N, J), lse (N,), ref_logp, kl, entropy)``, zero on ignored rows/targets,
    differentiable through ordinary autograd.
    """
    tvalid = targets != params.ignore_index
    row_valid = tvalid.any(-1)
    safe = torch.where(tvalid, targets, torch.zeros_like(targets))

    z = _logits(hidden, weight, bias, params)
    logp_all = torch.log_softmax(z, dim=-1)
    zero = z.new_zeros(())
    lse = torch.where(row_valid, torch.logsumexp(z, dim=-1), zero)
    logp = torch.where(tvalid, logp_all.gather(-1, safe), zero)

    entropy = None
    if params.entropy:
        entropy = torch.where(row_valid, -(logp_all.exp() * logp_all).sum(-1), zero)

    ref_logp = kl = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logp_all = torch.log_softmax(_logits(ref_hidden, ref_weight, ref_bias, params), dim=-1)
            ref_logp = torch.where(tvalid, ref_logp_all.gather(-1, safe), zero)
        if params.kl:
            kl_all = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)
            # Clamp rounding negatives (KL >= 0 by definition) but keep the unclamped gradient,
            # as the fused implementations do.
            kl_all = kl_all + (kl_all.clamp_min(0.0) - kl_all).detach()
            kl = torch.where(row_valid, kl_all, zero)
    return logp, lse, ref_logp, kl, entropy
