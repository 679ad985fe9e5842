"""PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (PyTorch >= 2.13), for cross-entropy.

Two rows, because the function has two paths with very different costs:

* ``torch_lce``: the default call, ``options=None``: the reference path, ``linear`` then
  ``cross_entropy`` on the full (N, V) logits (what an SFT script gets without opting in);
* ``torch_lce_chunked``: ``options=torch.nn.LinearCrossEntropyOptions()``, the opt-in chunked
  path with PyTorch's "auto" chunking and accumulation policy for the device and dtype (batch
  chunks; gradients computed in the forward).

Both compute the mean cross-entropy over targets != -100, the same quantity as
``tk.linear_cross_entropy`` with its defaults (tests/test_loss_cross_entropy.py compares them).
A PyTorch without the function is reported "unavailable" by the probe, not dropped.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device, chunked: bool) -> Callable[[], Tuple[Any, ...]]:
    options: Optional[Any] = torch.nn.LinearCrossEntropyOptions() if chunked else None
    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    D = h.shape[-1]
    return lambda: (F.linear_cross_entropy(h.reshape(-1, D), w, y.reshape(-1), ignore_index=IGNORE_INDEX,
                                           reduction="mean", options=options),)


register_peer(
    "linear_cross_entropy", "torch_lce", lambda b, d: _forward(b, d, chunked=False), requires=("torch",),
    note="torch.nn.functional.linear_cross_entropy, default call (options=None: full logits)",
)
register_peer(
    "linear_cross_entropy", "torch_lce_chunked", lambda b, d: _forward(b, d, chunked=True), requires=("torch",),
    note="torch.nn.functional.linear_cross_entropy with options=LinearCrossEntropyOptions() (chunked, auto policy)",
)
