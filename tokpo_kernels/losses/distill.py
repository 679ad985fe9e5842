"""Token-level knowledge distillation from a teacher's lm-head (docs/methods.md §5).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015), per token: the
forward KL from the teacher's softened distribution to the student's, scaled by ``T²``, plus an
optional cross-entropy on the labels. The teacher is the reference of ``linear_vocab_stats``
(``kl=True``), so neither logit matrix is materialised and the teacher gets no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import check_float_tensor, check_number
from tokpo_kernels.losses._common import detached_metrics, masked_count, masked_sum
from tokpo_kernels.losses._options import HeadOptions, loss_function


def _check_teacher(
    hidden: torch.Tensor, weight: torch.Tensor, t_hidden: object, t_weight: object, t_bias: object
) -> None:
    """The teacher's ``(..., D_t)`` hidden states, ``(V, D_t)`` head and ``(V,)`` bias, named as the
    caller knows them (``linear_vocab_stats`` would call them ``ref_*``)."""
    t_hidden = check_float_tensor("teacher_hidden", t_hidden)
    t_weight = check_float_tensor("teacher_weight", t_weight)
    if tuple(t_hidden.shape[:-1]) != tuple(hidden.shape[:-1]) or t_hidden.dim() != hidden.dim():
        raise ValueError(f"teacher_hidden: expected shape {tuple(hidden.shape[:-1])} + (D_teacher,) like hidden "
                         f"{tuple(hidden.shape)}, got {tuple(t_hidden.shape)}")
    if t_weight.dim() != 2 or t_weight.shape[1] != t_hidden.shape[-1] or t_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher_weight: expected shape ({weight.shape[0]}, {t_hidden.shape[-1]}) (the student's V, "
                         f"teacher_hidden's D), got {tuple(t_weight.shape)}")
    if t_bias is not None:
        t_bias = check_float_tensor("teacher_bias", t_bias)
        if tuple(t_bias.shape) != (weight.shape[0],):
            raise ValueError(f"teacher_bias: expected shape ({weight.shape[0]},) (the student's V), "
                             f"got {tuple(t_bias.shape)}")


# The KL is accumulated in fp32 and shrinks like 1/T² as both distributions flatten, so its
# rounding (≈ 1e-7 absolute) is amplified by T²: measured relative error of the loss 1.6e-4 at
# T = 100, 1 % at T = 1e3, wrong by orders of magnitude at 1e5. Distillation uses T of 1–20.
MAX_TEMPERATURE = 100.0


@loss_function("DistillLoss", exclude=("ref_bias",))
def distill_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    *,
    temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
    teacher_bias: Optional[torch.Tensor] = None,
    head: HeadOptions,
) -> LossOutput:
    """Distillation loss: ``T²``-scaled forward KL to the teacher plus optional label cross-entropy.

    With ``z = h Wᵀ + b`` (student) and ``z' = h' W'ᵀ + b'`` (teacher, its own hidden size), ``m_t``
    the non-``ignore_index`` labels and ``N = Σ_t m_t``::

        p_t = softmax(z_t / T),   q_t = softmax(z'_t / T)
        loss = kl_weight · T² · (1/N) Σ_t m_t KL(q_t ‖ p_t)
             + ce_weight · (1/N) Σ_t m_t (lse(z_t) − z_t[y_t])             (student at T = 1)

    ``T²`` keeps the soft-target gradient's scale independent of ``T`` (Hinton et al.). ``N = 0``
    gives 0. Only the student (``hidden``, ``weight``, ``bias``) receives gradient. The teacher may
    have another hidden size than the student; it must share the vocabulary (``V`` rows). A
    ``softcap`` applies to both, before the temperature. The statistics come from one
    ``linear_vocab_stats`` pass (teacher as the reference, ``kl=True``); the cross-entropy reuses
    its log-probs when ``T = 1`` and takes a second, student-only pass at ``T = 1`` otherwise (only
    when ``ce_weight > 0``). ``kl_weight = 1, ce_weight = w_h`` equals Liger's
    ``LigerFusedLinearJSDLoss(beta=0, weight_soft_loss=T², weight_hard_loss=w_h, temperature=T)``.

    Args:
        hidden, weight: the student's ``(..., D)`` hidden states and ``(V, D)`` lm-head weight.
        targets: ``(...)`` label ids; ``ignore_index`` marks positions that take no part.
        teacher_hidden, teacher_weight: the teacher's ``(..., D_teacher)`` hidden states and
            ``(V, D_teacher)`` lm-head weight; never receive gradient.
        temperature: the distillation temperature ``0 < T <= 100``; divides the logits of student
            and teacher in the KL term, as the shared ``temperature`` option of every loss does.
            (Larger ``T`` is refused: the fp32 KL's rounding grows like ``T²`` in the loss.)
        kl_weight: weight ``>= 0`` of the ``T²``-scaled KL term.
        ce_weight: weight ``>= 0`` of the student's cross-entropy at ``T = 1`` (0: not computed).
        teacher_bias: optional ``(V,)`` bias of the teacher's lm-head.

    Returns:
        ``LossOutput(loss, metrics)``; detached scalar metrics: ``"kl"`` — ``(1/N) Σ m KL(q ‖ p)`` at
        ``T`` (without ``T²`` and weight); ``"ce"`` — the student's mean cross-entropy at ``T = 1``
        (only when ``ce_weight > 0``); ``"num_tokens"`` — ``N`` (float).
    """
    hidden = check_float_tensor("hidden", hidden)
    weight = check_float_tensor("weight", weight)
    _check_teacher(hidden, weight, teacher_hidden, teacher_weight, teacher_bias)
    temperature = check_number("temperature", temperature, gt=0.0, le=MAX_TEMPERATURE)
    kl_weight = check_number("kl_weight", kl_weight, ge=0.0)
    ce_weight = check_number("ce_weight", ce_weight, ge=0.0)

    stats = head.stats(hidden, weight, targets, teacher_hidden, teacher_weight, ref_bias=teacher_bias, kl=True)
    mask = stats.mask
    count = masked_count(mask, None, stats.kl.dtype)
    denom = count.clamp_min(1.0)
    kl = masked_sum(stats.kl, mask, None) / denom
    loss = (kl_weight * temperature * temperature) * kl
    items = [("kl", kl)]
    if ce_weight > 0:
        student = stats if temperature == 1.0 else head._replace(temperature=1.0).stats(hidden, weight, targets)
        ce = -masked_sum(student.logp, mask, None) / denom
        loss = loss + ce_weight * ce
        items.append(("ce", ce))
    items.append(("num_tokens", count))
    return LossOutput(loss=loss, metrics=detached_metrics(items))
