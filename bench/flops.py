"""The performance model: the FLOPs of every benchmarked operation, one function each.

Matmul FLOPs of one training step over N valid (non-ignored) tokens, hidden size D, vocabulary V
(one N×D by D×V product = 2NDV):

* forward: the policy statistics 2NDV, plus 2NDV when a reference model's hidden states must be
  streamed through its lm-head (its log-sum-exp is needed even for a log-prob at one id);
* backward: recompute the policy logits 2NDV (plus the reference's 2NDV when a full-vocabulary KL
  has a gradient, for ``q``), then ``∂h`` 2NDV and ``∂W`` 2NDV.

So 8NDV without a streamed reference (cross-entropy; DPO/TLPO/PPO with precomputed reference
log-probs), 10NDV with a streamed reference but no full-vocabulary KL (DPO from the reference's
hidden states, as Liger's chunked DPO computes it), 12NDV with a full-vocabulary KL (TDPO, TI-DPO,
``vocab_stats_kl``). The usual "8NDV for CE/DPO/TLPO-style losses" is the first case; each
operation file says which case it is and why.

The same model is used for every implementation of an operation, so TFLOP/s reads as "model
FLOPs per second", i.e. inverse time: an implementation that skips work (Cut Cross-Entropy's
gradient filtering) or repeats it (the naive impl keeps logits and does less; Liger's chunked
losses compute gradients in the forward) gets no credit or debit for it.
"""

from __future__ import annotations

from typing import Dict


def step_flops(tokens: int, dim: int, vocab: int, *, reference: bool = False, kl: bool = False) -> Dict[str, float]:
    """``{"fwd": .., "fwd_bwd": ..}`` for ``tokens`` valid tokens (see the module docstring)."""
    if kl and not reference:
        raise ValueError("a full-vocabulary KL needs a streamed reference")
    ndv = float(tokens) * dim * vocab
    fwd = 2 * ndv * (2 if reference else 1)
    bwd = 2 * ndv * (2 if kl else 1) + 4 * ndv
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}


def add(*parts: Dict[str, float]) -> Dict[str, float]:
    """Sum of several step models (e.g. TI-DPO's pairs plus its anchor rows)."""
    return {k: sum(p[k] for p in parts) for k in ("fwd", "fwd_bwd")}
