"""Liger-Kernel's fused linear cross-entropy (``LigerFusedLinearCrossEntropyLoss``), CUDA only.

Mean cross-entropy over targets != -100 with Liger's defaults (no smoothing, no z-loss,
``accum_dtype=None``: ∂W accumulated in the weight's dtype): the same quantity as
``tk.linear_cross_entropy``. Its cross-entropy is a Triton kernel with gradients computed in the
forward, so on CPU the row reads "unavailable: needs CUDA".
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    D = batch["hidden"].shape[-1]
    args = (batch["weight"], batch["hidden"].reshape(-1, D), batch["targets"].reshape(-1))
    return lambda: (loss(*args),)


register_peer(
    "linear_cross_entropy", "liger_flce", _forward, requires=("liger_kernel",), devices=("cuda",),
    device_note="Triton kernels",
    note="liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss (defaults: mean, accum_dtype=None)",
)
