"""``tk.tdpo_loss``: TDPO2 (token-level DPO with the per-token forward KL), reference defaults.

Rows stack ``[chosen; rejected]``. Per row ``M_b = Σ_t m_t (ℓ_t[y_t] − ℓ_ref,t[y_t])`` and
``K_b = Σ_t m_t KL(q_t ‖ p_t)``; ``Δ = (M_c − M_r) − α (K_r − sg(K_c))``,
``loss = mean_b −log σ(β Δ)`` with ``β = 0.1``, ``α = 0.5`` (docs/methods.md §2). The peer
``tdpo_reference_code`` computes the same loss the way the TDPO reference code does, from full
policy and reference logits (bench/peers/tdpo_reference_code.py).

FLOPs (bench/flops.py): streamed reference and a full-vocabulary KL with a gradient, forward 4NDV,
forward+backward 12NDV.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation

BETA, ALPHA, VARIANT = 0.1, 0.5, "tdpo2"  # the reference configuration's β, α; the README's recommended variant


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.tdpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"],
                       beta=BETA, alpha=ALPHA, variant=VARIANT, ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "tdpo_loss",
    "TDPO2 loss, beta 0.1, alpha 0.5, per-token forward KL over the full vocabulary (12NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab, reference=True, kl=True),
    make_inputs=functools.partial(head_batch, reference=True), call=call,
)
