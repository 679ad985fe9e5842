"""Apple's Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``, PyPI ``cut-cross-entropy``),
for cross-entropy only, CUDA only (Triton kernels).

Two rows:

* ``cce``: the library's default, ``filter_eps="high"``: backward tiles whose softmax gradient is
  below the dtype's resolution (eps/32) are skipped, so ∂h and ∂W are approximations;
* ``cce_exact``: ``filter_eps=None``, no filtering, the exact gradient (the "exact mode" issue 5's
  targets compare against).

Both compute the mean cross-entropy over targets != -100 (``shift=False``: the labels are already
shifted). The package is optional; without it the rows read "not installed: cut_cross_entropy".
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from bench.inputs import IGNORE_INDEX
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device, filter_eps: Optional[str]) -> Callable[[], Tuple[Any, ...]]:
    from cut_cross_entropy import linear_cross_entropy

    h, w, y = batch["hidden"], batch["weight"], batch["targets"]
    return lambda: (linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean", shift=False,
                                         filter_eps=filter_eps),)


for _name, _eps, _what in (("cce", "high", "default filter_eps='high' (gradient filtering)"),
                           ("cce_exact", None, "filter_eps=None (exact gradient)")):
    register_peer(
        "linear_cross_entropy", _name, lambda b, d, e=_eps: _forward(b, d, e), requires=("cut_cross_entropy",),
        devices=("cuda",), device_note="Triton kernels",
        note=f"cut_cross_entropy.linear_cross_entropy, {_what}",
    )
