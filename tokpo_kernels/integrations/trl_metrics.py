"""The per-token metrics TRL's ``DPOTrainer`` logs, from the statistics pass of the fused loss.

``DPOTrainer`` (TRL 1.16) logs, besides its rewards and log-probs, three token-level metrics that its
fused lm-head computes per token: ``entropy`` (policy entropy, averaged over the completion tokens of
chosen and rejected), ``logits/chosen`` / ``logits/rejected`` (the mean over the vocabulary of the
transformed logits, averaged over the completion tokens of each side) and ``mean_token_accuracy``
(fraction of chosen completion tokens whose label is the policy's argmax). The TDPO / TI-DPO losses
called with ``token_stats=True`` return the same per-token quantities (``VocabStats.entropy``,
``mean_logit``, ``max_logit``) from their one statistics pass; this module reduces them the way
``DPOTrainer`` does: a sum and a count per metric, so that the trainer can gather both across
processes and divide (a token-weighted mean, not a mean of per-process means).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from tokpo_kernels._types import VocabStats

__all__ = ["ARGMAX_RTOL", "dpo_token_metric_sums", "is_argmax"]

# The label is the argmax when its logit z_y = logp + lse reaches the row maximum. logp + lse carries
# the rounding of lse (a few fp32 ulps of |lse|), so equality is tested with this relative tolerance:
# 1e-5 is ~80 fp32 ulps, far above that rounding and far below the gap between distinct logits of a
# trained model; a label within 1e-5·|z| of the maximum counts as top-1 (TRL's exact comparison would
# decide such a near-tie by the last bits of its own tile arithmetic).
ARGMAX_RTOL = 1e-5


def is_argmax(stats: VocabStats) -> torch.Tensor:
    """Bool, token-shaped: the label's logit is the row maximum (False where masked)."""
    if stats.max_logit is None:
        raise ValueError("is_argmax: the statistics have no max_logit (call the loss with token_stats=True)")
    label_logit = stats.logp + stats.lse
    scale = torch.maximum(label_logit.abs(), stats.max_logit.abs()).clamp_min(1.0)
    return stats.mask & (label_logit >= stats.max_logit - ARGMAX_RTOL * scale)


def dpo_token_metric_sums(stats: VocabStats) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (sum, count)}`` of ``DPOTrainer``'s token metrics over a ``[chosen; rejected]`` batch.

    ``stats`` is ``LossOutput.stats`` of a TDPO / TI-DPO loss called with ``token_stats=True`` (rows
    ``[chosen; rejected]``). Each metric is ``sum / count`` (0 when ``count`` is 0, as in TRL).
    """
    if stats.entropy is None or stats.mean_logit is None or stats.max_logit is None:
        raise ValueError("dpo_token_metric_sums: expected the statistics of a loss called with token_stats=True")
    mask = stats.mask
    rows = mask.shape[0]
    if rows % 2:
        raise ValueError(f"dpo_token_metric_sums: expected [chosen; rejected] rows (an even number), got {rows}")
    half = rows // 2
    m = mask.to(torch.float32)
    entropy = stats.entropy.detach().float()
    mean_logit = stats.mean_logit.detach().float()
    top1 = is_argmax(stats).to(torch.float32)
    return {
        "entropy": ((entropy * m).sum(), m.sum()),
        "logits/chosen": ((mean_logit[:half] * m[:half]).sum(), m[:half].sum()),
        "logits/rejected": ((mean_logit[half:] * m[half:]).sum(), m[half:].sum()),
        "mean_token_accuracy": (top1[:half].sum(), m[:half].sum()),
    }
