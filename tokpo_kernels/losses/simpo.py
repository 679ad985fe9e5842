"""SimPO: reference-free, length-normalised preference optimisation (docs/methods.md §5).

Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(NeurIPS 2024, arXiv 2405.14734). One ``linear_vocab_stats`` pass of the policy; no reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import check_number, check_pair_rows, check_sequence_batch
from tokpo_kernels.losses._common import masked_mean, preference_metrics, split_pairs
from tokpo_kernels.losses._options import HeadOptions, loss_function


@loss_function("SimPOLoss", exclude=("ref_bias",))
def simpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    *,
    beta: float = 2.0, gamma: float = 0.5,
    head: HeadOptions,
) -> LossOutput:
    """SimPO loss from the lm-head inputs, without materialising logits.

    Rows of ``hidden (2B, T, D)`` / ``targets (2B, T)`` are stacked ``[chosen; rejected]`` (as
    :func:`tokpo_kernels.dpo_loss`); hidden position ``t`` predicts ``targets[t]`` (the caller
    shifts); labels equal to ``ignore_index`` are masked (``m_t = 0``). Per row, the length-normalised
    log-likelihood and the loss::

        L̄_b  = (1/n_b) Σ_t m_t ℓ_t[y_t],     n_b = Σ_t m_t      (0 for a row without response tokens)
        loss = mean_b −log σ(β (L̄_c − L̄_r) − γ)

    ``−log σ`` is ``F.logsigmoid`` (stable for any margin). The implicit reward is ``β L̄`` (no
    reference model, hence no ``ref_*`` options); ``γ`` is the target reward margin. This is
    ``−log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)`` of the paper, TRL's ``CPOTrainer`` with
    ``loss_type="simpo"`` (``cpo_alpha=0``) and Liger's ``LigerFusedLinearSimPOLoss`` (without label
    smoothing). Defaults ``β = 2.0``, ``γ = 0.5`` are TRL's SimPO settings (the paper tunes
    ``β ∈ [2, 10]`` and ``γ/β``).

    Args:
        hidden, weight: policy hidden states ``(2B, T, D)`` and lm-head weight ``(V, D)``.
        targets: ``(2B, T)`` label ids, ``ignore_index`` on non-response positions.
        beta: reward scale ``β > 0``.
        gamma: target reward margin ``γ`` (a finite number; ``0`` removes the margin).

    Returns:
        ``LossOutput(loss, metrics)``; ``loss`` a 0-d fp32 tensor. Metrics are DPO's per-pair ``(B,)``
        detached tensors with SimPO's reward: ``rewards/chosen = β L̄_c``, ``rewards/rejected = β L̄_r``,
        ``rewards/accuracies = [rewards/chosen > rewards/rejected]``, ``rewards/margins`` (their
        difference, before ``γ``), ``logps/chosen = L̄_c``, ``logps/rejected = L̄_r`` (length-normalised,
        as the loss uses them and TRL logs them for SimPO).
    """
    rows, _ = check_sequence_batch("hidden", hidden, targets)
    check_pair_rows("hidden", rows)
    beta = check_number("beta", beta, gt=0.0)
    gamma = check_number("gamma", gamma)

    stats = head.stats(hidden, weight, targets)
    avg_logp = masked_mean(stats.logp, stats.mask, -1)  # L̄_b
    l_c, l_r = split_pairs(avg_logp, "hidden")
    loss = -F.logsigmoid(beta * (l_c - l_r) - gamma).mean()
    return LossOutput(loss, preference_metrics(beta * l_c, beta * l_r, l_c, l_r))
