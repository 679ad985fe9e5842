"""Output allocation shared by the implementations.

With ``TOKPO_POISON_OUTPUTS=1`` (set by the test suite) every output buffer that a kernel is
supposed to overwrite is filled with NaN instead of left uninitialised, so a tile that a kernel
forgets to write shows up as NaN in the result rather than as plausible stale memory.
"""

from __future__ import annotations

import os

import torch


def _poison_enabled() -> bool:
    return os.environ.get("TOKPO_POISON_OUTPUTS", "0") not in ("", "0")


def empty_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that must be fully written by its producer (NaN when poisoned)."""
    if _poison_enabled() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
