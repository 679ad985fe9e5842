"""Liger-Kernel's chunked JSD distillation loss with ``beta=0``, for ``forward_kl``.

What it computes: ``LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1, beta=0)``
called as ``(student_input=h, student_weight=W, teacher_input=h_ref, teacher_weight=W_ref,
true_labels=y)``. Per 1024-token chunk it materialises both logit blocks, takes
``log_softmax`` of each and, for ``beta == 0``, ``F.kl_div(student_logp, teacher_logp,
log_target=True)`` summed over the vocabulary, i.e. ``Σ_v q_v (log q_v − log p_v)`` =
KL(teacher ‖ student) per token; tokens whose label is -100 are zeroed; the sum is divided by the
number of valid labels. With teacher = reference and student = policy that is

    (1/N) Σ_{t valid} KL(q_t ‖ p_t)

the forward KL(ref ‖ policy) of TDPO / TI-DPO (docs/methods.md §1), averaged: exactly the
``forward_kl`` operation (bench/test_peer_agreement.py checks value and gradients). The hard
(cross-entropy) term is off (``weight_hard_loss=0``: Liger then skips it); temperature 1.
Gradients are computed in the forward (``torch.func.grad_and_value`` per chunk).
``compiled`` as Liger's default on CUDA, off on CPU (see liger_dpo.py).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, ignore_index=IGNORE_INDEX,
                                   temperature=1.0, compiled=device.type == "cuda")
    D = batch["hidden"].shape[-1]
    args = (batch["hidden"].reshape(-1, D), batch["weight"], batch["ref_hidden"].reshape(-1, D), batch["ref_weight"],
            batch["targets"].reshape(-1))
    return lambda: (loss(*args),)


register_peer(
    "forward_kl", "liger_jsd", _forward, requires=("liger_kernel",),
    note="liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1): "
         "mean over valid tokens of KL(teacher=ref || student=policy); chunk_size=1024; compiled on CUDA only",
)
