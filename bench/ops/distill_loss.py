"""``tk.distill_loss``: token-level distillation at temperature 2 with a label cross-entropy.

    loss = T² · (1/N) Σ_{t valid} KL(q_t ‖ p_t) + 0.5 · (1/N) Σ_{t valid} CE_t,   T = 2

with ``p = softmax(h Wᵀ / T)`` the student, ``q = softmax(h_ref W_refᵀ / T)`` the teacher (here the
benchmark's reference model, so the teacher has the student's hidden size; the loss itself allows
any) and ``CE`` the student's cross-entropy at ``T = 1`` (docs/methods.md §5). The peer
``liger_distill`` computes exactly this with Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0)``
(bench/peers/liger_distill.py; tests/test_loss_distill.py checks values and gradients agree).

FLOPs (bench/flops.py): a streamed teacher with a full-vocabulary KL (forward 4NDV, forward+backward
12NDV) plus, as ``T ≠ 1``, a second student pass for the cross-entropy (2NDV, 8NDV).
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import add, step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation

TEMPERATURE, KL_WEIGHT, CE_WEIGHT = 2.0, 1.0, 0.5


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.distill_loss(batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"],
                          temperature=TEMPERATURE, kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT,
                          ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "distill_loss",
    "distillation: T^2 KL(teacher || student) at T = 2 plus 0.5 CE at T = 1, teacher from hidden states "
    "(20NDV fwd+bwd)",
    flops=lambda s: add(step_flops(s.valid_tokens, s.dim, s.vocab, reference=True, kl=True),
                        step_flops(s.valid_tokens, s.dim, s.vocab)),
    make_inputs=functools.partial(head_batch, reference=True), call=call,
)
