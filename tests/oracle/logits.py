"""The one float64 logit transform of the test oracles (docs/methods.md §0–1).

    r = h Wᵀ + b,   z = softcap·tanh(r / softcap) / temperature     (softcap optional)

Every oracle builds its logits here and its log-probabilities with ``log_softmax64``, so the
transform the library is checked against is written once.
"""

from __future__ import annotations

from typing import Optional

import torch


def logits64(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             temperature: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """``z = softcap·tanh((h Wᵀ + b)/softcap) / temperature`` as float64 (full ``(..., V)`` logits).

    Inputs of any float dtype are upcast first, so the oracle sees exactly the values the library
    was given; autograd flows back to float64 leaves.
    """
    z = torch.matmul(hidden.double(), weight.double().t())
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logsumexp64(z: torch.Tensor) -> torch.Tensor:
    """``lse = m + log Σ_v exp(z_v − m)`` over the last dimension, written out (``m`` = row max,
    detached: it cancels in value and gradient)."""
    m = z.max(dim=-1, keepdim=True).values.detach()
    return m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    """``ℓ = z − lse(z)`` over the last dimension."""
    return z - logsumexp64(z)[..., None]
