"""DPO and its IPO / hinge variants (docs/methods.md §5) on top of ``linear_vocab_stats``.

Conventions follow TRL's ``DPOTrainer`` and Liger-Kernel's ``LigerFusedLinearDPOLoss``: sequence
log-probs are sums over response tokens (averages for IPO, as TRL length-normalises IPO), the loss is
the mean over pairs, rewards are ``β (log π − log π_ref)`` per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import (
    REFERENCE_LOGP,
    REFERENCE_MODEL,
    check_choice,
    check_float_tensor,
    check_number,
    check_pair_rows,
    check_sequence_batch,
    resolve_reference,
)
from tokpo_kernels.losses._common import masked_count, masked_sum, preference_metrics, split_pairs
from tokpo_kernels.losses._options import HeadOptions, loss_function

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@loss_function("DPOLoss")
def dpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
    ref_logp: Optional[torch.Tensor] = None, average_log_prob: Optional[bool] = None, reference_free: bool = False,
    head: HeadOptions,
) -> LossOutput:
    """DPO (Rafailov et al., 2023) with TRL's ``sigmoid`` / ``ipo`` / ``hinge`` loss types.

    Rows of ``hidden (2B, T, D)`` / ``targets (2B, T)`` are stacked ``[chosen; rejected]``; hidden
    position ``t`` predicts ``targets[t]``; labels equal to ``ignore_index`` are masked. Per row::

        M_b = Σ_t m_t (ℓ_t[y_t] − ℓ_ref,t[y_t])     (divided by n_b = Σ_t m_t when averaging)
        x_b = M_c − M_r
        sigmoid: −(1 − ε) log σ(β x) − ε log σ(−β x)      (ε = label_smoothing, cDPO, Mitchell 2023;
                                                          TRL before 1.0 applied it the same way)
        ipo:     (x − 1/(2β))²                            (IPO eq. 17, β plays τ; TRL)
        hinge:   max(0, 1 − β x)                          (SLiC; TRL)
        loss = mean_b

    Averaging: ``average_log_prob=None`` means TRL's choice: summed log-probs for ``sigmoid`` and
    ``hinge``, per-token averages (policy and reference alike) for ``ipo``. A row with no response
    token averages to 0 (TRL/Liger would give NaN). ``sigmoid`` with the defaults equals Liger's
    ``LigerFusedLinearDPOLoss(use_ref_model=True, average_log_prob=False)``; Liger's own ``sigmoid``
    ignores ``label_smoothing``. Defaults (``β = 0.1``, ``sigmoid``) are TRL's.

    The reference is exactly one of: ``ref_hidden`` + ``ref_weight`` (the reference model's hidden
    states and lm-head; no grad), precomputed ``ref_logp`` (detached) shaped like ``targets``
    (per-token log-probs; entries at ignored labels are not read) or ``(2B,)`` (per-sequence values,
    already summed or averaged to match ``average_log_prob``), or ``reference_free=True`` (reference
    log-probs taken as 0, TRL's ``reference_free``).

    Args:
        beta: > 0. loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
        label_smoothing: in ``[0, 0.5)``; only ``"sigmoid"`` uses it (a non-zero value with another
            loss type is an error rather than silently ignored).

    Returns:
        ``LossOutput(loss, metrics)``; per-pair ``(B,)`` detached metrics: ``rewards/chosen = β(M_c)``,
        ``rewards/rejected = β(M_r)``, ``rewards/accuracies = [rewards/chosen > rewards/rejected]``,
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (policy ``Σ m ℓ[y]``, averaged when
        ``average_log_prob``).
    """
    rows, _ = check_sequence_batch("hidden", hidden, targets)
    check_pair_rows("hidden", rows)
    beta = check_number("beta", beta, gt=0.0)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    label_smoothing = check_number("label_smoothing", label_smoothing, ge=0.0, lt=0.5)
    if loss_type != "sigmoid" and label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing: only loss_type='sigmoid' uses it; expected 0.0 with loss_type={loss_type!r}, "
            f"got {label_smoothing}"
        )
    if average_log_prob is None:
        average_log_prob = loss_type == "ipo"
    elif not isinstance(average_log_prob, bool):
        raise TypeError(f"average_log_prob: expected a bool or None, got {type(average_log_prob).__name__}")
    mode = resolve_reference("dpo_loss", ref_hidden, ref_weight, ref_logp, reference_free=bool(reference_free),
                             required="the DPO log-ratio")
    if mode == REFERENCE_LOGP:
        check_float_tensor("ref_logp", ref_logp)
        if tuple(ref_logp.shape) not in (tuple(targets.shape), (rows,)):
            raise ValueError(
                f"ref_logp: expected per-token shape {tuple(targets.shape)} (like targets) or per-sequence "
                f"shape ({rows},), got {tuple(ref_logp.shape)}"
            )

    if mode == REFERENCE_MODEL:
        stats = head.stats(hidden, weight, targets, ref_hidden, ref_weight)
    else:  # a ref_bias without a reference model is not read (as before the options were shared)
        stats = head._replace(ref_bias=None).stats(hidden, weight, targets)
    mask = stats.mask
    logps = masked_sum(stats.logp, mask)
    count = masked_count(mask, -1, logps.dtype).clamp_min(1.0)
    if average_log_prob:
        logps = logps / count
    if mode == REFERENCE_MODEL:
        ref = masked_sum(stats.ref_logp, mask)
        ref = ref / count if average_log_prob else ref
    elif mode == REFERENCE_LOGP:
        r = ref_logp.detach().to(device=logps.device, dtype=logps.dtype)
        if r.dim() == 2:
            r = masked_sum(r, mask)
            r = r / count if average_log_prob else r
        ref = r
    else:
        ref = torch.zeros_like(logps)

    ratio = logps - ref
    r_c, r_r = split_pairs(ratio, "hidden")
    x = r_c - r_r
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * x)
        if label_smoothing > 0:
            losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * x)
    elif loss_type == "ipo":
        losses = (x - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * x)
    loss = losses.mean()

    l_c, l_r = split_pairs(logps, "hidden")
    return LossOutput(loss, preference_metrics(beta * r_c, beta * r_r, l_c, l_r))
