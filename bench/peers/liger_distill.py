"""Liger-Kernel's chunked distillation loss, for ``distill_loss``.

What it computes: ``LigerFusedLinearJSDLoss(beta=0, weight_soft_loss=T², weight_hard_loss=0.5,
temperature=T)`` called as ``(student_input=h, student_weight=W, teacher_input=h_ref,
teacher_weight=W_ref, true_labels=y)``. Per 1024-token chunk it materialises both logit blocks; its
soft loss divides both by ``T`` and, for ``beta == 0``, sums ``KL(teacher ‖ student)`` over the
vocabulary and the valid tokens; its hard loss is the student's cross-entropy at ``T = 1``; both
are divided by the number of valid labels. Liger does not scale the soft loss by ``T²``, so the
weight carries it: the total is exactly ``distill_loss(T, kl_weight=1, ce_weight=0.5)``
(bench/ops/distill_loss.py; tests/test_loss_distill.py checks values and gradients, also with
teacher and student of different hidden sizes). Gradients are computed in the forward.
``compiled`` as Liger's default on CUDA, off on CPU (see liger_dpo.py).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, register_peer
from bench.ops.distill_loss import CE_WEIGHT, KL_WEIGHT, TEMPERATURE


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=CE_WEIGHT, weight_soft_loss=KL_WEIGHT * TEMPERATURE ** 2,
                                   beta=0.0, ignore_index=IGNORE_INDEX, temperature=TEMPERATURE,
                                   compiled=device.type == "cuda")
    d, d_teacher = batch["hidden"].shape[-1], batch["ref_hidden"].shape[-1]
    args = (batch["hidden"].reshape(-1, d), batch["weight"], batch["ref_hidden"].reshape(-1, d_teacher),
            batch["ref_weight"], batch["targets"].reshape(-1))
    return lambda: (loss(*args),)


register_peer(
    "distill_loss", "liger_distill", _forward, requires=("liger_kernel",),
    note="liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, weight_soft_loss=T^2, weight_hard_loss=0.5, "
         "temperature=2): T^2 KL(teacher || student) + 0.5 CE at T=1, per valid token; chunk_size=1024; "
         "compiled on CUDA only",
)
