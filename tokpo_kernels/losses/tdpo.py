"""TDPO: token-level DPO with a per-token forward KL (Zeng et al., ICML 2024, arXiv 2404.11999).

docs/methods.md §2. A few lines of PyTorch on ``linear_vocab_stats`` (log-probs at the labels under
policy and reference, and ``KL(ref ‖ policy)`` per token); no kernel of its own.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch
import torch.nn.functional as F

from tokpo_kernels._types import LossOutput, VocabStats
from tokpo_kernels._validation import (
    check_choice,
    check_number,
    check_pair_rows,
    check_reference_pair,
    check_sequence_batch,
)
from tokpo_kernels.losses._common import masked_sum, preference_metrics, split_pairs
from tokpo_kernels.losses._options import HeadOptions, loss_function

TDPO_VARIANTS = ("tdpo1", "tdpo2")


class PairSums(NamedTuple):
    """Per-pair ``(B,)`` sums over each row's response tokens, for the chosen and rejected rows."""

    margin_c: torch.Tensor  # M = Σ_t m_t margin_t
    margin_r: torch.Tensor
    kl_c: torch.Tensor  # K = Σ_t m_t KL(q_t ‖ p_t)
    kl_r: torch.Tensor
    logps_c: torch.Tensor  # Σ_t m_t ℓ_t[y_t]
    logps_r: torch.Tensor


def pair_sums(stats: VocabStats, margin: torch.Tensor) -> PairSums:
    """``M``, ``K`` and the policy log-likelihood of each row (``margin``: the per-token log-ratio
    the loss uses, TI-DPO's weighted), split into ``[chosen; rejected]``."""
    mask = stats.mask
    m_c, m_r = split_pairs(masked_sum(margin, mask), "hidden")
    k_c, k_r = split_pairs(masked_sum(stats.kl, mask), "hidden")
    l_c, l_r = split_pairs(masked_sum(stats.logp, mask), "hidden")
    return PairSums(m_c, m_r, k_c, k_r, l_c, l_r)


def tdpo_metrics(beta: float, s: PairSums) -> Dict[str, torch.Tensor]:
    """The TDPO reference code's metrics, one value per pair (shape ``(B,)``), detached.

    ``rewards/* = β(M + K)`` (the reward includes the KL, as in the reference code),
    ``rewards/accuracies = [rewards/chosen > rewards/rejected]``, ``rewards/margins`` their difference,
    ``kl/* = K``, ``kl/margin = K_c − K_r``, ``logps/* = Σ m ℓ[y]``.
    """
    kl = (("kl/chosen", s.kl_c), ("kl/rejected", s.kl_r), ("kl/margin", s.kl_c - s.kl_r))
    return preference_metrics(beta * (s.margin_c + s.kl_c), beta * (s.margin_r + s.kl_r), s.logps_c, s.logps_r, *kl)


@loss_function("TDPOLoss")
def tdpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
    *,
    beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2",
    head: HeadOptions,
    token_stats: bool = False,  # after the shared options: keywords are only ever appended
) -> LossOutput:
    """TDPO1 / TDPO2 loss from the lm-head inputs, without materialising logits.

    Rows of ``hidden (2B, T, D)`` / ``targets (2B, T)`` are stacked ``[chosen; rejected]``; hidden
    position ``t`` predicts ``targets[t]`` (the caller shifts); labels equal to ``ignore_index``
    (prompt, padding) are masked (``m_t = 0``). Per row, summed over response tokens::

        M_b = Σ_t m_t (ℓ_t[y_t] − ℓ_ref,t[y_t])        K_b = Σ_t m_t KL(q_t ‖ p_t)
        TDPO1: Δ = (M_c − M_r) − (K_r − K_c)
        TDPO2: Δ = (M_c − M_r) − α (K_r − sg(K_c))      (only the chosen KL is detached)
        loss = mean_b −log σ(β Δ_b)

    ``−log σ`` is evaluated with ``F.logsigmoid`` (stable for any Δ) and the KL by the streaming
    formula of docs/methods.md §1, so a reference probability that underflows gives a finite loss (the
    reference code's ``log(softmax)`` gives NaN there). With reference == policy, ``Δ = 0`` and the
    loss is exactly ``log 2``.

    Defaults ``β = 0.1``, ``α = 0.5`` are the TDPO reference configuration's. ``variant="tdpo2"`` is
    the README's recommended variant (the shipped config runs ``"tdpo1"``; pass it explicitly).

    Args:
        hidden, weight: policy hidden states ``(2B, T, D)`` and lm-head weight ``(V, D)``.
        targets: ``(2B, T)`` label ids, ``ignore_index`` on non-response positions.
        ref_hidden, ref_weight: the frozen reference's ``(2B, T, D_ref)`` and ``(V, D_ref)``; no grad.
        beta: inverse temperature of the preference (> 0).
        alpha: weight of the KL margin in TDPO2 (>= 0; unused by TDPO1).
        variant: ``"tdpo1"`` or ``"tdpo2"``.
        token_stats: also return the statistics pass as ``LossOutput.stats`` with the policy's
            per-token entropy, max logit and mean logit (computed in the same pass; for logging).

    Returns:
        ``LossOutput(loss, metrics)``; ``loss`` a 0-d fp32 tensor. Metrics are per-pair ``(B,)``
        detached tensors (the reference code logs them per pair and averages at logging time; take
        ``.mean()`` for TRL-style scalars): ``rewards/chosen = β(M_c + K_c)``,
        ``rewards/rejected = β(M_r + K_r)``, ``rewards/accuracies``, ``rewards/margins``,
        ``kl/chosen``, ``kl/rejected``, ``kl/margin = K_c − K_r``, ``logps/chosen``,
        ``logps/rejected`` (``Σ m ℓ[y]``).
    """
    rows, _ = check_sequence_batch("hidden", hidden, targets)
    check_pair_rows("hidden", rows)
    beta = check_number("beta", beta, gt=0.0)
    alpha = check_number("alpha", alpha, ge=0.0)
    check_choice("variant", variant, TDPO_VARIANTS)
    check_reference_pair(ref_hidden, ref_weight, required_by="tdpo_loss")

    stats = head.stats(hidden, weight, targets, ref_hidden, ref_weight, kl=True, token_stats=bool(token_stats))
    s = pair_sums(stats, stats.logp - stats.ref_logp)
    if variant == "tdpo1":
        delta = (s.margin_c - s.margin_r) - (s.kl_r - s.kl_c)
    else:
        delta = (s.margin_c - s.margin_r) - alpha * (s.kl_r - s.kl_c.detach())
    loss = -F.logsigmoid(beta * delta).mean()
    return LossOutput(loss, tdpo_metrics(beta, s), stats=stats if token_stats else None)
