"""Non-tensor options of one ``linear_vocab_stats`` call, carried through autograd as one value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class StatsParams:
    """Options shared by every implementation.

    Attributes:
        ignore_index: target id that marks "no target" (never a matmul row when all ids of a token are it).
        temperature: logits are divided by it (after ``softcap``); a runtime value, never a compile-time one.
        softcap: ``z = softcap · tanh(r / softcap)`` when set (Gemma style).
        kl: compute ``KL(ref || policy)`` per token.
        entropy: compute the policy entropy per token.
        filter_eps: ``None`` (exact), ``"auto"`` or a float: the Triton backward skips vocabulary
            tiles whose probabilities are all below it and that hold no target (opt-in speed-up,
            an approximation; the other implementations are always exact).
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    kl: bool = False
    entropy: bool = False
    filter_eps: Optional[Union[float, str]] = None


def resolve_filter_eps(filter_eps: Optional[Union[float, str]], dtype: torch.dtype) -> Optional[float]:
    """``"auto"``: the input dtype's resolution (``torch.finfo(dtype).eps``: 2**-7 for bf16)."""
    if filter_eps == "auto":
        return float(torch.finfo(dtype).eps)
    return None if filter_eps is None else float(filter_eps)
