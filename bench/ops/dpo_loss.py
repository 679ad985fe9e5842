"""``tk.dpo_loss``: DPO (sigmoid, TRL's defaults) from policy and reference hidden states.

Rows stack ``[chosen; rejected]`` (2B rows). Per row ``M_b = Σ_t m_t (ℓ_t[y_t] − ℓ_ref,t[y_t])``
(summed log-ratios) and ``loss = mean_b −log σ(β (M_c − M_r))`` with ``β = 0.1``: exactly what
Liger-Kernel's ``LigerFusedLinearDPOLoss(use_ref_model=True, average_log_prob=False,
compute_nll_loss=False)`` computes (bench/peers/liger_dpo.py; tests/test_loss_dpo.py checks the
values and gradients agree).

FLOPs (bench/flops.py): the reference is given as hidden states, as Liger requires (it cannot take
precomputed reference log-probs), so its log-sum-exp is streamed: forward 4NDV, forward+backward
10NDV. (The usual "8NDV for DPO" holds with precomputed reference log-probs, ``ref_logp=``.)
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation

BETA = 0.1  # TRL's and Liger's default


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.dpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"],
                      beta=BETA, loss_type="sigmoid", ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "dpo_loss",
    "DPO sigmoid loss, beta 0.1, summed log-ratios, reference from hidden states (10NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab, reference=True),
    make_inputs=functools.partial(head_batch, reference=True), call=call,
)
