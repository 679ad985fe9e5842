"""``tk.simpo_loss``: SimPO (reference-free, length-normalised; TRL's SimPO defaults).

Rows stack ``[chosen; rejected]``. Per row ``L̄_b = (1/n_b) Σ_t m_t ℓ_t[y_t]`` (the mean label
log-prob of the response tokens) and ``loss = mean_b −log σ(β (L̄_c − L̄_r) − γ)`` with ``β = 2``,
``γ = 0.5`` (docs/methods.md §5). Liger-Kernel's ``LigerFusedLinearSimPOLoss(compute_nll_loss=False)``
computes the same quantity (tests/test_loss_simpo.py checks it); it is not registered as a peer here.

FLOPs (bench/flops.py): the policy alone, no reference: forward 2NDV, forward+backward 8NDV.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation

BETA, GAMMA = 2.0, 0.5  # TRL's SimPO settings, the library defaults


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.simpo_loss(batch["hidden"], batch["weight"], batch["targets"], beta=BETA, gamma=GAMMA,
                        ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "simpo_loss",
    "SimPO loss, beta 2, gamma 0.5, length-normalised log-probs, no reference (8NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab),
    make_inputs=functools.partial(head_batch, reference=False), call=call,
)
