"""Tensor helpers shared by the losses: pair-batch splitting, masked reductions, detached metrics.

Plain tensor arithmetic without host synchronisation (``.item()``, data-dependent Python branches),
so a loss built from these helpers stays sync-free. Argument checks live in ``tokpo_kernels._validation``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from tokpo_kernels._validation import check_pair_rows

# ---------------------------------------------------------------------------------------------
# Tensor helpers (sync-free)
# ---------------------------------------------------------------------------------------------


def split_pairs(x: torch.Tensor, name: str = "input") -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[chosen; rejected]`` stack along dim 0 into ``(chosen, rejected)`` views."""
    b = check_pair_rows(name, int(x.shape[0]))
    return x[:b], x[b:]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = -1) -> torch.Tensor:
    """``Σ mask·x`` over ``dim`` (all dims when ``None``); masked entries never leak NaN/inf."""
    y = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return y.sum() if dim is None else y.sum(dim)


def masked_count(mask: torch.Tensor, dim: Optional[int] = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Number of true entries over ``dim`` as a float tensor."""
    m = mask.to(dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = -1) -> torch.Tensor:
    """``Σ mask·x / max(Σ mask, 1)``: an empty span gives 0, not NaN."""
    return masked_sum(x, mask, dim) / masked_count(mask, dim, x.dtype).clamp_min(1.0)


def pack_left(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Move the masked entries of each row to the front, keeping their order.

    ``values`` and ``mask`` are ``(R, T)``; returns ``(packed (R, T), packed_mask (R, T))`` where
    ``packed[r, j]`` is the ``j``-th valid entry of row ``r`` and entries past the row's count are
    zero. Uses a stable sort, so no host sync; differentiable w.r.t. ``values`` (a gather).
    """
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    packed_mask = mask.gather(-1, order)
    packed = values.gather(-1, order)
    packed = torch.where(packed_mask, packed, torch.zeros((), dtype=packed.dtype, device=packed.device))
    return packed, packed_mask


def pad_last(x: torch.Tensor, length: int, value: Any = 0) -> torch.Tensor:
    """Right-pad the last dim of ``x`` to ``length`` (a no-op when already that long)."""
    extra = length - int(x.shape[-1])
    if extra <= 0:
        return x
    fill = x.new_full((*x.shape[:-1], extra), value)
    return torch.cat([x, fill], dim=-1)


def detached_metrics(items: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Metrics dict with every tensor detached."""
    return {k: v.detach() for k, v in items}


def preference_metrics(
    rewards_c: torch.Tensor,
    rewards_r: torch.Tensor,
    logps_c: torch.Tensor,
    logps_r: torch.Tensor,
    *extra: Tuple[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """The per-pair ``(B,)`` metrics of a preference loss (TRL's names), detached: ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies = [chosen > rejected]``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``, then ``extra`` ``(name, value)`` items."""
    return detached_metrics([
        ("rewards/chosen", rewards_c),
        ("rewards/rejected", rewards_r),
        ("rewards/accuracies", (rewards_c > rewards_r).to(rewards_c.dtype)),
        ("rewards/margins", rewards_c - rewards_r),
        ("logps/chosen", logps_c),
        ("logps/rejected", logps_r),
        *extra,
    ])
