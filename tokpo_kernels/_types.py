"""Value types shared by every layer: the public results, the options of one statistics call, and
the data that crosses the backend seam (``tokpo_kernels.backends``).

Nothing here imports another module of the package, so every layer may import it ("arrows only
point down"): the public API, the custom ops, the backends and the vocabulary-parallel merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Union

import torch

# ---------------------------------------------------------------------------------------------
# Public results
# ---------------------------------------------------------------------------------------------


@dataclass
class VocabStats:
    """Per-token statistics of the lm-head distribution; masked entries are 0.

    Statistics are in the accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.

    Attributes:
        logp: ``log p(target)``, shaped like ``targets``; 0 where the target is ``ignore_index``.
        lse: log-sum-exp of the (transformed) policy logits, token-shaped.
        ref_logp: like ``logp`` under the reference model, detached; ``None`` without a reference.
        kl: forward ``KL(ref || policy)`` per token; ``None`` unless ``kl=True``.
        entropy: policy entropy per token; ``None`` unless ``entropy=True``.
        mask: bool, token-shaped: the token has at least one non-ignored target.
        max_logit: row maximum of the transformed policy logits, detached (the target is the argmax
            when ``logp + lse`` reaches it, up to the rounding of ``lse``); ``None`` unless
            ``max_logit=True``.
        mean_logit: ``Σ_v z_v / V`` of the transformed policy logits, differentiable; ``None`` unless
            ``mean_logit=True``.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    ref_logp: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    mask: torch.Tensor
    max_logit: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None


@dataclass
class LossOutput:
    """A loss, its detached metrics (named as in ``docs/methods.md``) and, on request, its statistics.

    ``stats`` is the :class:`VocabStats` of the loss's own statistics pass over its main batch
    (with ``entropy``, ``max_logit`` and ``mean_logit`` filled in) when the loss was called with
    ``token_stats=True`` (TDPO, TI-DPO), else ``None``: per-token values for metrics such as TRL's
    ``entropy`` / ``logits/*`` / ``mean_token_accuracy`` without a second pass over the vocabulary.
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Optional[VocabStats] = None


# ---------------------------------------------------------------------------------------------
# Options of one statistics call
# ---------------------------------------------------------------------------------------------


class ImplParams(NamedTuple):
    """The non-tensor options of one statistics call, as a backend sees them.

    No ``ignore_index``: targets reach a backend as local ids, ``-1`` meaning "none on this
    device". ``logit_sum`` asks for ``Σ_v z_v`` over this device's vocabulary rows (the op divides
    by the global ``V`` to form ``mean_logit``). ``filter_eps`` is ``None``, ``"auto"`` or a float as
    the user gave it, and resolved to ``None`` or a float (``resolve_filter_eps``) before a backend
    sees it. ``chunk_budget``: the Triton strategies' chunk memory as a fraction of the gradient
    buffers (``kernels/chunking.py``; ``None``: ``$TOKPO_CHUNK_BUDGET`` or 10 %).
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    kl: bool = False
    entropy: bool = False
    max_logit: bool = False
    logit_sum: bool = False
    filter_eps: Optional[Union[float, str]] = None
    chunk_budget: Optional[float] = None

    @property
    def transformed(self) -> bool:
        """Whether ``z`` differs from the raw projection (a softcap or a temperature ≠ 1)."""
        return self.softcap is not None or self.temperature != 1.0


def resolve_filter_eps(filter_eps: Optional[Union[float, str]], dtype: torch.dtype) -> Optional[float]:
    """``"auto"``: the input dtype's resolution (``torch.finfo(dtype).eps``: 2**-7 for bf16)."""
    if filter_eps == "auto":
        return float(torch.finfo(dtype).eps)
    return None if filter_eps is None else float(filter_eps)


# ---------------------------------------------------------------------------------------------
# The backend seam
# ---------------------------------------------------------------------------------------------


class HeadTensors(NamedTuple):
    """The lm-head inputs of one call on flattened rows: policy ``(N, D)`` / ``(V, D)`` / ``(V,)`` and
    the reference ``(N, D_ref)`` / ``(V, D_ref)`` / ``(V,)`` (never differentiated). Every field is
    given explicitly (``None`` where absent), so a call site shows which head it passes. A bias has
    its weight's dtype or that dtype's accumulation dtype (``linear_vocab_stats`` casts a bias of any
    other dtype once), and a backend adds the latter to logits already in the accumulation dtype.
    Rows that are not ``row_valid`` may hold anything, NaN and inf included."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    ref_hidden: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    ref_bias: Optional[torch.Tensor]


class TargetRows(NamedTuple):
    """Which targets and rows a backend works on.

    ``ids`` (N, J): the target id inside this device's vocabulary rows, ``-1`` when the id is
    ignored or (vocabulary-parallel) owned by another rank. ``owned = ids >= 0``. ``row_valid`` (N,):
    the row has at least one non-ignored target anywhere (global), so its ``lse`` etc. are needed
    even on a rank that owns none of its ids.
    """

    ids: torch.Tensor
    owned: torch.Tensor
    row_valid: torch.Tensor

    def safe_ids(self) -> torch.Tensor:
        """``ids`` with every id that is not owned replaced by 0: a valid column for gathers and
        scatters whose values there are masked (``g_j = 0``, ``owned`` false)."""
        return torch.where(self.owned, self.ids, torch.zeros_like(self.ids))


class RawStats(NamedTuple):
    """What a backend's forward pass returns, on flattened tokens (N rows), in any float dtype.

    Rows that are not ``row_valid`` may hold anything (the caller masks them). ``tgt_logit`` /
    ``ref_tgt_logit`` are the transformed logits ``z`` at the owned target ids, (N, J) (anything
    where not owned). Optional statistics are ``None`` unless ``ImplParams`` asks for them.
    """

    tgt_logit: torch.Tensor
    lse: torch.Tensor
    ref_tgt_logit: Optional[torch.Tensor] = None
    ref_lse: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    max_logit: Optional[torch.Tensor] = None
    logit_sum: Optional[torch.Tensor] = None
    # (N,) int64, valid rows first: a backend that compacts the ignored rows returns its
    # permutation here and finds it again in ``SavedStats.row_order`` (compacted once per step).
    row_order: Optional[torch.Tensor] = None


class SavedStats(NamedTuple):
    """The global per-token statistics the forward saved for the backward (accumulation dtype),
    and the forward's row permutation when its backend returned one (``RawStats.row_order``)."""

    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    row_order: Optional[torch.Tensor] = None


class StatGrads(NamedTuple):
    """Per-token cotangents handed to a backend's backward (``docs/methods.md`` §1).

    ``g_lse`` already folds in ``−Σ_j g_tgt[:, j]`` (``logp = z_y − lse``); every entry of an
    ignored row or target is zero. ``g_kl`` / ``g_entropy`` / ``g_logit_sum`` are ``None`` when no
    gradient flows into them, which lets a backend skip e.g. the reference recompute entirely.
    """

    g_lse: torch.Tensor
    g_tgt: torch.Tensor
    g_kl: Optional[torch.Tensor] = None
    g_entropy: Optional[torch.Tensor] = None
    g_logit_sum: Optional[torch.Tensor] = None


class GradNeeds(NamedTuple):
    """Which input gradients the caller needs."""

    hidden: bool
    weight: bool
    bias: bool


class BackwardInputs(NamedTuple):
    """Everything a backend's backward reads: the forward's inputs, the saved global statistics,
    the per-row cotangents, the options and which gradients are needed."""

    head: HeadTensors
    targets: TargetRows
    saved: SavedStats
    grads: StatGrads
    params: ImplParams
    needs: GradNeeds


class HeadGrads(NamedTuple):
    """``(∂hidden, ∂weight, ∂bias)`` in the accumulation dtype, ``None`` where not needed. The
    caller all-reduces ``∂hidden`` over ranks (vocabulary-parallel) and casts once. ``∂weight`` may
    come in the weight's own dtype instead when the backend finishes each of its rows with one
    fp32-accumulated GEMM (the Triton strategies): no fp32 copy of the whole ``∂W`` then exists."""

    hidden: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
