"""How wide a vocabulary chunk the Triton strategies work on, from a memory budget.

Pure Python (no Triton, no device): the launchers, the cost model (``python -m bench --model``)
and the tests all size chunks with these functions, so a prediction and a run use the same widths.

Both Triton strategies process the vocabulary in chunks of ``C`` columns (``docs/architecture.md``):

* the backward of both writes ``∂z`` for a chunk (``N × C`` in the input dtype) and finishes the
  chunk's ``∂W`` rows with one GEMM (fp32 output, ``C × D``), then adds ``∂z · W_c`` into the fp32
  ``∂h`` accumulator;
* the *chunked* strategy also holds the chunk's fp32 logits (``N × C``, twice with a reference), in
  its forward (then reduced by the row-statistics kernel) and in its backward (recomputed by a GEMM);
* the *streaming* forward keeps no chunk at all (its logit tiles live in registers).

The floor every exact backward of this design holds is ``floor_bytes``: the ``∂W`` rows in the
weight's dtype, the fp32 ``∂h`` accumulator (the sum over vocabulary chunks must be exact in fp32)
and the returned ``∂h`` in the hidden dtype. The chunk buffers are sized to stay within
``budget × floor_bytes`` (default 10 %), so the peak extra memory of a step is at most
``(1 + budget) × floor_bytes`` plus O(N) statistics.
"""

from __future__ import annotations

import os
from typing import Optional

# Default chunk budget: the chunk buffers may take this fraction of the floor (issue of the design:
# peak extra memory within 1.1 × the gradient buffers).
DEFAULT_BUDGET = 0.10
# Chunk widths are multiples of this: a 128-column multiple keeps every chunk a whole number of
# the kernels' vocabulary tiles (BLOCK_V ≤ 128 on CUDA) and its rows 16-byte aligned for cuBLAS
# and TMA whatever the dtype.
COLUMN_QUANTUM = 128
BUDGET_ENV = "TOKPO_CHUNK_BUDGET"
# Forces the width (tests use it to cross several chunks at tiny vocabularies under the interpreter).
COLUMNS_ENV = "TOKPO_CHUNK_COLUMNS"

STRATEGIES = ("streaming", "chunked")


def floor_bytes(n_rows: int, vocab: int, hidden: int, weight_bytes: int, hidden_bytes: int) -> int:
    """Bytes of the gradient buffers of an exact chunked backward: ``∂W`` (weight dtype), the fp32
    ``∂h`` accumulator and the returned ``∂h`` (hidden dtype)."""
    return vocab * hidden * weight_bytes + n_rows * hidden * (4 + hidden_bytes)


def bytes_per_column(strategy: str, n_rows: int, hidden: int, in_bytes: int, has_ref: bool) -> int:
    """Chunk-buffer bytes per vocabulary column at the peak of a step of ``strategy``.

    Backward (the larger of the two passes): ``∂z`` (``n × in_bytes``), the fp32 ``∂W`` chunk of
    the GEMM (``hidden × 4``), a per-row-block fp32 partial of ``∂b`` (bounded by ``n × 4 / 16``,
    counted as ``n``), and for *chunked* the fp32 logits (``n × 4``, twice with a reference).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    per = n_rows * in_bytes + hidden * 4 + n_rows
    if strategy == "chunked":
        per += n_rows * 4 * (2 if has_ref else 1)
    return per


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


def chunk_columns(
    strategy: str, n_rows: int, vocab: int, hidden: int, *, in_bytes: int, weight_bytes: Optional[int] = None,
    has_ref: bool = False, budget: Optional[float] = None,
) -> int:
    """The chunk width ``C`` for ``n_rows`` valid rows of a ``vocab × hidden`` head.

    ``C = ⌊budget · floor_bytes / bytes_per_column⌋`` rounded down to a multiple of 128, at least
    128 (a narrower GEMM wastes the GPU; that floor may exceed the budget when ``N`` is far larger
    than ``V``) and at most the vocabulary. ``$TOKPO_CHUNK_COLUMNS`` forces a width.
    """
    forced = os.environ.get(COLUMNS_ENV, "").strip()
    if forced:
        try:
            cols = int(forced)
        except ValueError:
            raise ValueError(f"{COLUMNS_ENV}: expected a positive integer, got {forced!r}") from None
        if cols < 1:
            raise ValueError(f"{COLUMNS_ENV}: expected a positive integer, got {forced!r}")
        return min(cols, max(vocab, 1))
    frac = resolve_budget(budget)
    wb = in_bytes if weight_bytes is None else weight_bytes
    allowed = frac * floor_bytes(n_rows, vocab, hidden, wb, in_bytes)
    per = bytes_per_column(strategy, max(n_rows, 1), hidden, in_bytes, has_ref)
    cols = int(allowed // per) // COLUMN_QUANTUM * COLUMN_QUANTUM
    return max(1, min(max(cols, COLUMN_QUANTUM), vocab))
