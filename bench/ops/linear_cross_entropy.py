"""``tk.linear_cross_entropy``: mean next-token cross-entropy over the valid tokens (SFT).

    loss = (1/N) Σ_{t valid} (lse_t − z_t[y_t])

with PyTorch's defaults (``reduction="mean"``, ``ignore_index=-100``, no smoothing, no z-loss),
which is exactly what ``torch.nn.functional.linear_cross_entropy``, Liger's
``LigerFusedLinearCrossEntropyLoss`` and Cut Cross-Entropy compute with theirs (bench/peers).

FLOPs (bench/flops.py): no reference, forward 2NDV, forward+backward 8NDV.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, head_batch, register_library_operation


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    return (tk.linear_cross_entropy(batch["hidden"], batch["weight"], batch["targets"], ignore_index=IGNORE_INDEX,
                                    impl=impl).loss,)


register_library_operation(
    "linear_cross_entropy",
    "mean cross-entropy over valid tokens from hidden states and lm-head (8NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab),
    make_inputs=functools.partial(head_batch, reference=False), call=call,
)
