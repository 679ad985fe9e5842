"""The numerics policy, PyTorch side (the Triton twin is ``kernels/_tl_numerics.py``).

Logit transform, applied to the raw projection ``r = h Wᵀ (+ b)`` before anything else and
identically to policy and reference::

    z = softcap · tanh(r / softcap) / temperature      (softcap=None: z = r / temperature)

Softcap comes first because it is part of the model (Gemma-2/3 final-logit soft-capping) while
temperature is the trainer's sampling temperature (TRL divides the model's logits by it). All
statistics are accumulated in fp32; the reference side never receives gradient.
"""

from __future__ import annotations

from typing import Optional

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and returned in: fp32 for fp32/bf16/fp16 inputs; fp64
    inputs keep fp64 (oracle precision)."""
    return torch.promote_types(dtype, torch.float32)


def max_shift(m: torch.Tensor) -> torch.Tensor:
    """The shift for a row maximum ``m``: ``m`` itself, or 0 where ``m = −inf`` (a row with no finite
    logit, e.g. a fully masked vocabulary shard), so that ``z − shift`` never forms ``−inf − (−inf)``
    and the row keeps ``Σ exp = 0``, ``lse = −inf``."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def transform_logits(raw: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """``z`` from raw logits ``r`` (any float dtype; returns the same dtype)."""
    z = raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def transform_grad_(dz: torch.Tensor, raw: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """In place: turn ``∂L/∂z`` into ``∂L/∂r``.

    ``∂z/∂r = (1 − tanh²(r / softcap)) / temperature``.
    """
    if softcap is not None:
        t = torch.tanh(raw / softcap)
        dz.mul_(1.0 - t * t)
    if temperature != 1.0:
        dz.div_(temperature)
    return dz
