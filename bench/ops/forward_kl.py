"""``forward_kl``: the mean per-token forward KL(ref ‖ policy) over the valid tokens, a scalar.

    loss = (1/N) Σ_{t valid} KL(q_t ‖ p_t),   p = softmax(h Wᵀ), q = softmax(h_ref W_refᵀ)

This is the full-vocabulary part of TDPO / TI-DPO (docs/methods.md §1-2) on its own, so that it can be
compared with the one peer that computes exactly it: Liger-Kernel's ``LigerFusedLinearJSDLoss``
with ``beta=0`` (bench/peers/liger_jsd.py). This library computes it as
``linear_vocab_stats(..., kl=True).kl`` masked and averaged; only ``kl`` carries a gradient.

FLOPs (bench/flops.py): a streamed reference with a full-vocabulary KL, forward 4NDV,
forward+backward 12NDV (the backward recomputes p and q).
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    s = tk.linear_vocab_stats(batch["hidden"], batch["weight"], batch["targets"], ref_hidden=batch["ref_hidden"],
                              ref_weight=batch["ref_weight"], kl=True, ignore_index=IGNORE_INDEX, impl=impl)
    n = s.mask.sum().clamp_min(1)
    return ((s.kl * s.mask).sum() / n,)


register_library_operation(
    "forward_kl",
    "mean over valid tokens of KL(ref || policy) from hidden states (the KL part of TDPO; 12NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab, reference=True, kl=True),
    make_inputs=functools.partial(head_batch, reference=True), call=call,
)
