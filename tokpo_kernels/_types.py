"""Result containers of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

import torch


@dataclass
class VocabStats:
    """Per-token statistics of the lm-head distribution (all fp32; masked entries are 0).

    Attributes:
        logp: ``log p(target)``, shaped like ``targets``; 0 where the target is ``ignore_index``.
        lse: log-sum-exp of the (transformed) policy logits, token-shaped.
        ref_logp: like ``logp`` under the reference model, detached; ``None`` without a reference.
        kl: forward ``KL(ref || policy)`` per token; ``None`` unless ``kl=True``.
        entropy: policy entropy per token; ``None`` unless ``entropy=True``.
        mask: bool, token-shaped: the token has at least one non-ignored target.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    mask: torch.Tensor


@dataclass
class LossOutput:
    """A loss and its detached metrics (named as in METHODS.md)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


class RawStats(NamedTuple):
    """What an implementation's forward pass returns, on flattened tokens (N rows).

    Rows whose targets are all ignored may hold anything (they are masked by the caller).
    ``tgt_logit``/``ref_tgt_logit`` are the transformed logits ``z`` at the target ids, (N, J).
    """

    tgt_logit: torch.Tensor
    lse: torch.Tensor
    ref_tgt_logit: Optional[torch.Tensor]
    ref_lse: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]


class StatGrads(NamedTuple):
    """Per-token cotangents handed to an implementation's backward (METHODS.md §1).

    ``g_lse`` already folds in ``−Σ_j g_tgt[:, j]`` (``logp = z_y − lse``); every entry of an
    ignored row or target is zero. ``g_kl``/``g_entropy`` are ``None`` when no gradient flows into
    them, which lets an implementation skip the reference recompute entirely.
    """

    g_lse: torch.Tensor
    g_tgt: torch.Tensor
    g_kl: Optional[torch.Tensor]
    g_entropy: Optional[torch.Tensor]
