"""Merging statistics computed over parts of the vocabulary: written once, used twice.

The Triton forward splits the vocabulary over programs (``kernels/forward_stats.py``) and vocabulary
parallelism splits it over ranks (``distributed/vocab_parallel.py``). Either way each part ``r``
yields *local* statistics of the softmax over its own columns — ``lse_r``, ``H_r``, ``KL_r`` (with
the reference's ``lse_q,r``), ``max_r`` and ``Σ_r z`` — and the global ones follow exactly. With
``w_r = e^{lse_r − lse}`` and ``v_r = e^{lse_q,r − lse_q}`` (each sums to 1 over parts)::

    lse = log Σ_r e^{lse_r}
    H   = Σ_r w_r (H_r + lse − lse_r)                       (H = lse − Σ p·z, split per part)
    KL  = Σ_r v_r (KL_r + lse_q,r − lse_r) − lse_q + lse    (KL = Σ q (z_q − z) − lse_q + lse)
    max = max_r max_r          Σ z = Σ_r Σ_r z

computed with shifts ``M = max_r lse_r`` and ``M_q = max_r lse_q,r`` so that no term overflows:
``S = Σ_r e^{lse_r − M}``, ``lse = M + log S``, ``H = Σ_r e^{lse_r−M}(H_r − (lse_r − M)) / S + log S``
and ``KL = Σ_r e^{lse_q,r−M_q}(KL_r + (lse_q,r − M_q) − (lse_r − M)) / S_q − log S_q + log S``.

A part with no finite logit for a row (an empty Triton split, a fully masked vocabulary shard) has
``lse_r = −inf`` and undefined ``H_r``/``KL_r``: it gets weight 0 and its terms are selected away,
never multiplied by 0. Target logits are summed over the parts that own the id (others give 0).

The two users differ only in how a reduction is done — along a leading axis of stacked partials, or
by an all-reduce across ranks — which is the ``Reducer`` they pass in. Each reducer call takes a
list of tensors so that an all-reduce can pack them into one collective.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence

import torch

from tokpo_kernels._types import RawStats
from tokpo_kernels.numerics import max_shift


class Reducer(Protocol):
    """Elementwise max / sum of each tensor over the parts."""

    def max(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]: ...

    def sum(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]: ...


class AxisReducer:
    """Parts stacked along dim 0 of every tensor (the Triton split partials)."""

    def max(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [x.amax(0) for x in xs]

    def sum(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [x.sum(0) for x in xs]


def merge_local_stats(local: RawStats, reducer: Reducer, owned: Optional[torch.Tensor] = None) -> RawStats:
    """Global statistics from every part's local ones (module docstring).

    ``local`` holds one part's statistics (or, with ``AxisReducer``, all parts stacked on dim 0).
    Target logits are merged only when ``owned`` (the mask of ids this part computed) is given;
    otherwise ``local.tgt_logit`` / ``ref_tgt_logit`` pass through unchanged. Rows whose every part
    is empty get ``lse = −inf`` and 0 for the other statistics.
    """
    has_ref = local.ref_lse is not None
    maxima = reducer.max(
        [local.lse] + ([local.ref_lse] if has_ref else []) + ([local.max_logit] if local.max_logit is not None else [])
    )
    big = maxima[0]
    shift = local.lse - max_shift(big)  # lse_r − M ≤ 0 (−inf for an empty part)
    w = torch.exp(shift)
    zero = w.new_zeros(())
    sums: List[torch.Tensor] = [w]
    if owned is not None:
        sums.append(torch.where(owned, local.tgt_logit, zero))
    ref_shift = wq = None
    if has_ref:
        ref_shift = local.ref_lse - max_shift(maxima[1])
        wq = torch.exp(ref_shift)
        sums.append(wq)
        if owned is not None:
            sums.append(torch.where(owned, local.ref_tgt_logit, zero))
    if local.entropy is not None:
        sums.append(torch.where(w > 0, w * (local.entropy - shift), zero))
    if local.kl is not None:
        sums.append(torch.where(wq > 0, wq * (local.kl + ref_shift - shift), zero))
    if local.logit_sum is not None:
        sums.append(local.logit_sum)
    merged = iter(reducer.sum(sums))

    # S ≥ 1 on a row with a finite logit (its largest part contributes e^0); the clamp only guards
    # rows with none, which keep lse = M = −inf.
    s = next(merged).clamp_min(1.0)
    log_s = s.log()
    lse = big + log_s
    tgt = next(merged) if owned is not None else local.tgt_logit
    ref_lse = ref_tgt = log_sq = sq = None
    if has_ref:
        sq = next(merged).clamp_min(1.0)
        log_sq = sq.log()
        ref_lse = maxima[1] + log_sq
        ref_tgt = next(merged) if owned is not None else local.ref_tgt_logit
    entropy = next(merged) / s + log_s if local.entropy is not None else None
    kl = None
    if local.kl is not None:
        # Rounding can leave a tiny negative where KL is 0 mathematically; KL >= 0 by definition.
        kl = (next(merged) / sq - log_sq + log_s).clamp_min(0.0)
    logit_sum = next(merged) if local.logit_sum is not None else None
    max_logit = maxima[-1] if local.max_logit is not None else None
    return RawStats(tgt, lse, ref_tgt, ref_lse, kl, entropy, max_logit, logit_sum)
