"""How wide the vocabulary chunks of the Triton strategies are, from a memory budget.

Pure Python (no Triton, no device): the launchers, the cost model (``python -m bench --model``)
and the tests all size chunks with ``chunk_plan``, so a prediction and a run use the same widths.

Both Triton strategies process the vocabulary in chunks (``docs/architecture.md``):

* the backward of both writes ``∂z`` for a window of columns (``N × window`` in the input dtype),
  sub-chunk by sub-chunk; each sub-chunk's ``∂W`` rows are finished by one GEMM (fp32 output,
  ``sub × D``); once the window is full, one GEMM adds ``∂z · W_window`` into the fp32 ``∂h``
  accumulator;
* the *chunked* strategy also holds a sub-chunk's fp32 logits (``N × sub``, twice when the
  reference's are recomputed), and in its forward the fp32 logit chunk(s) (``N × forward``);
* the *streaming* forward keeps no chunk at all (its logit tiles live in registers).

The floor every exact backward of this design holds is ``floor_bytes``: the ``∂W`` rows in the
weight's dtype, the fp32 ``∂h`` accumulator (the sum over vocabulary chunks must be exact in fp32)
and the returned ``∂h`` in the hidden dtype. The chunk buffers (and any compacted copy of the
hidden states) are sized to stay within ``budget × floor_bytes`` (default 10 %) plus the room of the
returned ``∂h``, which is allocated only after the chunk loop: the peak extra memory of a step is
at most ``(1 + budget) × floor_bytes`` plus O(N) statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# Default chunk budget: the chunk buffers may take this fraction of the floor (issue of the design:
# peak extra memory within 1.1 × the gradient buffers).
DEFAULT_BUDGET = 0.10
# Chunk widths are multiples of this: a 128-column multiple keeps every chunk a whole number of
# the kernels' vocabulary tiles (BLOCK_V ≤ 128 on CUDA) and its rows 16-byte aligned for cuBLAS
# and TMA whatever the dtype.
COLUMN_QUANTUM = 128
BUDGET_ENV = "TOKPO_CHUNK_BUDGET"
# Forces the forward chunk and the backward sub-chunk to a width, and the ∂h window to twice it
# (tests use it to cross several chunks at tiny vocabularies under the interpreter).
COLUMNS_ENV = "TOKPO_CHUNK_COLUMNS"

STRATEGIES = ("streaming", "chunked")


def floor_bytes(n_rows: int, vocab: int, hidden: int, weight_bytes: int, hidden_bytes: int) -> int:
    """Bytes of the gradient buffers of an exact chunked backward: ``∂W`` (weight dtype), the fp32
    ``∂h`` accumulator and the returned ``∂h`` (hidden dtype)."""
    return vocab * hidden * weight_bytes + n_rows * hidden * (4 + hidden_bytes)


@dataclass(frozen=True)
class ChunkPlan:
    """Column counts of one call (all multiples of ``COLUMN_QUANTUM`` unless the vocabulary is
    smaller, or forced by ``$TOKPO_CHUNK_COLUMNS``).

    ``forward``: columns per fp32 logit chunk of the chunked forward. ``sub``: columns per backward
    sub-chunk: one logit recompute (chunked), one ``∂z`` launch and one ``∂W`` GEMM each.
    ``window``: columns per ``∂h`` GEMM, a multiple of ``sub``: the ``∂z`` of a whole window is kept
    so that the fp32 ``∂h`` accumulator is read and written once per window, not once per sub-chunk
    (at the Llama-3-8B shape that accumulator is 268 MB: per narrow chunk its traffic would cost more
    than the GEMM that adds into it).
    """

    forward: int
    sub: int
    window: int


def allowance_bytes(
    n_rows: int, vocab: int, hidden: int, *, in_bytes: int, weight_bytes: int, budget: float,
    row_copies: int = 0,
) -> float:
    """Bytes the chunk buffers may take: ``budget × floor_bytes`` plus the returned ``∂h`` (allocated
    only after the chunk loop has freed its buffers, so its room is free during the loop), minus the
    compacted copies of hidden-state matrices (``row_copies`` of ``n × hidden``) the call holds."""
    floor = floor_bytes(n_rows, vocab, hidden, weight_bytes, in_bytes)
    return budget * floor + n_rows * hidden * in_bytes - row_copies * n_rows * hidden * in_bytes


def _quantised(cols: float, vocab: int, quantum: int = COLUMN_QUANTUM) -> int:
    """``cols`` rounded down to a multiple of ``quantum``, at least one quantum (a narrower GEMM
    wastes the GPU; that floor may exceed the budget when ``N`` is far larger than ``V``), at most
    the vocabulary."""
    q = int(max(cols, 0) // quantum) * quantum
    return max(1, min(max(q, quantum), vocab))


def chunk_plan(
    strategy: str, n_rows: int, vocab: int, hidden: int, *, in_bytes: int, weight_bytes: Optional[int] = None,
    has_ref: bool = False, kl_grad: Optional[bool] = None, budget: Optional[float] = None, row_copies: int = 0,
) -> ChunkPlan:
    """The chunk widths of one call (``ChunkPlan``), from the allowance of ``allowance_bytes``.

    Forward (chunked strategy): the fp32 logit chunk(s) take the whole allowance (``n × 4`` bytes
    per column, twice with a reference head ``has_ref``).
    Backward: the sub-chunk buffers (chunked: the fp32 logits of the policy, and of the reference
    when a KL gradient flows, ``kl_grad``; both strategies: the fp32 ``∂W`` rows of one GEMM,
    ``hidden × 4`` per column) get at most a third of the allowance and at most what leaves room
    for a window of ``_WINDOW_SUBS`` sub-chunks; the rest goes to the ``∂z`` window (``n × in_bytes``
    per column, plus ``n × 4 / 16`` for the per-row-block ``∂b`` partials, counted as ``n``), whose
    width sets the ``∂h`` traffic.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    forced = _forced_columns(vocab)
    if forced is not None:
        # Forced (tests): the ∂h window spans two sub-chunks, so the window logic is exercised too.
        return ChunkPlan(forced, forced, min(2 * forced, max(vocab, 1)))
    n = max(n_rows, 1)
    wb = in_bytes if weight_bytes is None else weight_bytes
    allowed = allowance_bytes(n, vocab, hidden, in_bytes=in_bytes, weight_bytes=wb,
                              budget=resolve_budget(budget), row_copies=row_copies)
    forward = _quantised(allowed / (n * 4 * (2 if has_ref else 1)), vocab)
    q = has_ref if kl_grad is None else kl_grad
    sub_cost = (n * 4 * (2 if q else 1) if strategy == "chunked" else 0) + hidden * 4
    window_cost = n * in_bytes + n
    sub = _quantised(min(allowed / 3 / sub_cost, allowed / (sub_cost + _WINDOW_SUBS * window_cost)), vocab)
    window = _quantised((allowed - sub * sub_cost) / window_cost, vocab, quantum=sub)
    return ChunkPlan(forward, sub, max(window, sub))


# The ∂z window aims at ≥ 4 sub-chunks (fewer when rounding to whole sub-chunks loses one): the
# ∂h traffic falls as 1/window, and a sub-chunk narrower than a quarter of it still feeds GEMMs of
# ≥ 512 columns at the Llama-3-8B shape.
_WINDOW_SUBS = 4


def _forced_columns(vocab: int) -> Optional[int]:
    forced = os.environ.get(COLUMNS_ENV, "").strip()
    if not forced:
        return None
    try:
        cols = int(forced)
    except ValueError:
        raise ValueError(f"{COLUMNS_ENV}: expected a positive integer, got {forced!r}") from None
    if cols < 1:
        raise ValueError(f"{COLUMNS_ENV}: expected a positive integer, got {forced!r}")
    return min(cols, max(vocab, 1))


def resolve_budget(budget: Optional[float] = None) -> float:
    """The chunk budget: ``budget`` when given, else ``$TOKPO_CHUNK_BUDGET``, else 10 %."""
    if budget is None:
        env = os.environ.get(BUDGET_ENV, "").strip()
        if not env:
            return DEFAULT_BUDGET
        try:
            budget = float(env)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV}: expected a positive number, got {env!r}") from None
        if not budget > 0:
            raise ValueError(f"{BUDGET_ENV}: expected a positive number, got {env!r}")
    return float(budget)
