"""Small helpers shared by every loss: argument checks, pair-batch splitting, masked reductions.

Everything here is shape/metadata logic or plain tensor arithmetic: no host synchronisation
(``.item()``, data-dependent Python branches), so a loss built from these helpers stays sync-free.
Errors are ``TypeError``/``ValueError`` that name what was expected and what was received.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from tokpo_kernels._validation import check_tensor  # one copy of the check; the losses import it from here too

# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def check_float_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` must be a floating-point tensor; returns it."""
    t = check_tensor(name, value)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def check_number(
    name: str,
    value: Any,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
) -> float:
    """``value`` must be a finite Python number within the given bounds; returns it as ``float``.

    Tensors are rejected on purpose: a hyperparameter held in a tensor would need a host sync to
    validate, and hyperparameters are runtime scalars in this library.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    v = float(value)
    bounds = []
    ok = math.isfinite(v)
    if gt is not None:
        bounds.append(f"> {gt:g}")
        ok = ok and v > gt
    if ge is not None:
        bounds.append(f">= {ge:g}")
        ok = ok and v >= ge
    if lt is not None:
        bounds.append(f"< {lt:g}")
        ok = ok and v < lt
    if le is not None:
        bounds.append(f"<= {le:g}")
        ok = ok and v <= le
    if not ok:
        what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices``; returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], hint: str = "") -> None:
    """``t.shape`` must equal ``expected``."""
    if tuple(t.shape) != tuple(expected):
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_all_or_none(named: Dict[str, Any]) -> bool:
    """Either every value is given or none is; returns True when all are given.

    Raises a ``ValueError`` listing which ones were given and which were missing otherwise.
    """
    given = [k for k, v in named.items() if v is not None]
    if given and len(given) != len(named):
        missing = [k for k in named if k not in given]
        raise ValueError(
            f"{', '.join(named)} must be given together: got {', '.join(given)} but not {', '.join(missing)}"
        )
    return bool(given)


def check_sequence_batch(
    name: str, hidden: Any, targets: Any, *, targets_name: str = "targets"
) -> Tuple[int, int]:
    """``hidden (R, T, D)`` and ``targets (R, T)`` integer ids; returns ``(R, T)``."""
    hidden = check_float_tensor(name, hidden)
    targets = check_tensor(targets_name, targets)
    if hidden.dim() != 3:
        raise ValueError(f"{name}: expected shape (rows, T, D), got {tuple(hidden.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{targets_name}: expected integer token ids (torch.long), got dtype {targets.dtype}")
    check_shape(targets_name, targets, tuple(hidden.shape[:2]), f"the (rows, T) of {name} {tuple(hidden.shape)}")
    return int(hidden.shape[0]), int(hidden.shape[1])


def check_pair_rows(name: str, rows: int) -> int:
    """A preference batch stacks ``[chosen; rejected]``: ``rows`` must be even and > 0. Returns B."""
    if rows <= 0 or rows % 2 != 0:
        raise ValueError(
            f"{name}: expected an even, non-zero number of rows 2B stacked [chosen; rejected], got {rows} rows"
        )
    return rows // 2


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
