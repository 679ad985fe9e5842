"""TDPO: token-level DPO with a per-token forward KL (Zeng et al., ICML 2024, arXiv 2404.11999).

METHODS.md §2. A few lines of PyTorch on ``linear_vocab_stats`` (log-probs at the labels under
policy and reference, and ``KL(ref ‖ policy)`` per token); no kernel of its own.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import check_reference_pair
from tokpo_kernels.functional import linear_vocab_stats
from tokpo_kernels.losses._common import (
    check_choice,
    check_number,
    check_pair_rows,
    check_sequence_batch,
    masked_sum,
    split_pairs,
)

TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_metrics(
    beta: float,
    margin_c: torch.Tensor,
    margin_r: torch.Tensor,
    kl_c: torch.Tensor,
    kl_r: torch.Tensor,
    logps_c: torch.Tensor,
    logps_r: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """The TDPO reference code's metrics, one value per pair (shape ``(B,)``), detached.

    ``rewards/* = β(M + K)`` (the reward includes the KL, as in the reference code),
    ``rewards/accuracies = [rewards/chosen > rewards/rejected]``, ``rewards/margins`` their difference,
    ``kl/* = K``, ``kl/margin = K_c − K_r``, ``logps/* = Σ m ℓ[y]``.
    """
    with torch.no_grad():
        r_c = beta * (margin_c + kl_c)
        r_r = beta * (margin_r + kl_r)
        return {
            "rewards/chosen": r_c.detach(),
            "rewards/rejected": r_r.detach(),
            "rewards/accuracies": (r_c > r_r).to(r_c.dtype),
            "rewards/margins": (r_c - r_r).detach(),
            "kl/chosen": kl_c.detach(),
            "kl/rejected": kl_r.detach(),
            "kl/margin": (kl_c - kl_r).detach(),
            "logps/chosen": logps_c.detach(),
            "logps/rejected": logps_r.detach(),
        }


def tdpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    impl: str = "auto",
    filter_eps: Optional[Union[float, str]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
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
    formula of METHODS.md §1, so a reference probability that underflows gives a finite loss (the
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
        bias, ref_bias, ignore_index, temperature, softcap, impl, filter_eps, process_group: passed to ``linear_vocab_stats``.

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

    stats = linear_vocab_stats(
        hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        kl=True, ignore_index=ignore_index, temperature=temperature, softcap=softcap, impl=impl,
        filter_eps=filter_eps, process_group=process_group,
    )
    mask = stats.mask
    margin = masked_sum(stats.logp - stats.ref_logp, mask)  # M_b
    kl = masked_sum(stats.kl, mask)  # K_b
    logps = masked_sum(stats.logp, mask)
    m_c, m_r = split_pairs(margin, "hidden")
    k_c, k_r = split_pairs(kl, "hidden")
    l_c, l_r = split_pairs(logps, "hidden")

    if variant == "tdpo1":
        delta = (m_c - m_r) - (k_r - k_c)
    else:
        delta = (m_c - m_r) - alpha * (k_r - k_c.detach())
    loss = -F.logsigmoid(beta * delta).mean()
    return LossOutput(loss, tdpo_metrics(beta, m_c, m_r, k_c, k_r, l_c, l_r))
