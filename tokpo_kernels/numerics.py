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

from tokpo_kernels._types import StatGrads


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


def universal_dz_(
    logp: torch.Tensor, grads: StatGrads, safe_ids: torch.Tensor,
    entropy: Optional[torch.Tensor] = None, ref_logq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place: turn a (rows, V) tile of policy log-probabilities ``ℓ`` into ``∂L/∂z``, the
    universal gradient of ``docs/methods.md`` §1::

        ∂L/∂z = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H) + g_Σ

    ``grads`` holds the rows' cotangents (``g_Σ`` is ``g_logit_sum``: ``Σ_v z_v`` has gradient 1 on
    every logit); ``safe_ids`` (rows, J) the target columns (any column where ``g_j = 0``);
    ``entropy`` the rows' ``H`` when ``g_H`` flows; ``ref_logq`` the reference's log-probability
    tile when ``g_kl`` flows, consumed (overwritten). The Triton twin is ``_tl_numerics.dz_tile``.
    """
    g_p = grads.g_lse if grads.g_kl is None else grads.g_lse + grads.g_kl
    dz = logp
    if grads.g_entropy is not None:
        p = torch.exp(dz)
        dz.add_(entropy[:, None]).mul_(-grads.g_entropy[:, None]).add_(g_p[:, None]).mul_(p)
        # A masked logit (ℓ = −inf, p = 0) contributes nothing, not 0·inf = NaN.
        dz.masked_fill_(p == 0, 0.0)
        del p
    else:
        dz.exp_().mul_(g_p[:, None])
    if grads.g_kl is not None:
        dz.sub_(ref_logq.exp_().mul_(grads.g_kl[:, None]))
    if grads.g_logit_sum is not None:
        dz.add_(grads.g_logit_sum[:, None])
    return dz.scatter_add_(1, safe_ids, grads.g_tgt.to(dz.dtype))
