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
and the returned ``∂h`` in the hidden dtype. The chunk buffers are sized to stay within
``budget × floor_bytes`` (default 10 %) plus the room of the returned ``∂h``, which is allocated
only after the chunk loop: the peak extra memory of a step is at most ``(1 + budget) × floor_bytes``
plus O(N) statistics, plus — only when some rows are ignored — the compacted copies of the hidden
states the GEMMs read (``allowance_bytes``).
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


def allowance_bytes(n_rows: int, vocab: int, hidden: int, *, in_bytes: int, weight_bytes: int, budget: float) -> float:
    """Bytes the chunk buffers may take: ``budget × floor_bytes`` plus the returned ``∂h`` (allocated
    only after the chunk loop has freed its buffers, so its room is free during the loop).

    Not counted: the compacted copies of the hidden states (``n × hidden`` per head) that the GEMMs
    read when some rows are ignored. They are not chunk buffers, and charging them here would shrink
    every chunk to its minimum at the Llama-3-8B shape (two copies take almost all of the allowance)
    and triple the step's time; they come on top of the budget, each about the size of ``∂h``."""
    floor = floor_bytes(n_rows, vocab, hidden, weight_bytes, in_bytes)
    return budget * floor + n_rows * hidden * in_bytes


def _quantised(cols: float, vocab: int, quantum: int = COLUMN_QUANTUM) -> int:
    """``cols`` rounded down to a multiple of ``quantum``, at least one quantum (a narrower GEMM
    wastes the GPU; that floor may exceed the budget when ``N`` is far larger than ``V``), at most
    the vocabulary."""
    q = int(max(cols, 0) // quantum) * quantum
    return max(1, min(max(q, quantum), vocab))


def chunk_plan(
    strategy: str, n_rows: int, vocab: int, hidden: int, *, in_bytes: int, weight_bytes: Optional[int] = None,
    has_ref: bool = False, kl_grad: Optional[bool] = None, has_bias: bool = False, budget: Optional[float] = None,
) -> ChunkPlan:
    """The chunk widths of one call (``ChunkPlan``), from the allowance of ``allowance_bytes``.

    Forward (chunked strategy): the fp32 logit chunk(s) take the whole allowance (``n × 4`` bytes
    per column, twice with a reference head ``has_ref``).
    Backward: the sub-chunk buffers (chunked: the fp32 logits of the policy, and of the reference
    when a KL gradient flows, ``kl_grad``; both strategies: the fp32 ``∂W`` rows of one GEMM,
    ``hidden × 4`` per column; with a bias ``has_bias`` the per-row-block ``∂b`` partials) get as
    much of the allowance as leaves a ``∂z`` window (``n × in_bytes`` per column) of at least
    ``MIN_WINDOW`` columns and at least one sub-chunk; the window gets the rest.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    forced = _forced_columns(vocab)
    if forced is not None:
        # Forced (tests): the ∂h window spans two sub-chunks, so the window logic is exercised too.
        return ChunkPlan(forced, forced, min(2 * forced, max(vocab, 1)))
    n = max(n_rows, 1)
    wb = in_bytes if weight_bytes is None else weight_bytes
    allowed = allowance_bytes(n, vocab, hidden, in_bytes=in_bytes, weight_bytes=wb, budget=resolve_budget(budget))
    forward = _quantised(allowed / (n * 4 * (2 if has_ref else 1)), vocab)
    q = has_ref if kl_grad is None else kl_grad
    # Per sub-chunk column: the fp32 logits (chunked), the fp32 ∂W GEMM output, and with a bias the
    # per-row-block fp32 ∂b partials (N / BLOCK_N rows of 4 bytes, BLOCK_N ≥ 16: counted as n / 4).
    sub_cost = (n * 4 * (2 if q else 1) if strategy == "chunked" else 0) + hidden * 4 + (n // 4 if has_bias else 0)
    window_cost = n * in_bytes
    # The widest sub-chunk whose buffers leave room for a window of max(sub, MIN_WINDOW) columns:
    # either sub = window ≥ MIN_WINDOW, or MIN_WINDOW / 2^k, the widest power-of-two fraction that
    # fits beside a MIN_WINDOW window (a whole number of 128-column steps that tiles the window:
    # no narrow leftover GEMM, and the window stays ≥ MIN_WINDOW). Then the widest window of whole
    # sub-chunks that fits beside it.
    wide = allowed / (sub_cost + window_cost)
    if wide >= MIN_WINDOW:
        sub = _quantised(wide, vocab)
    else:
        narrow = (allowed - MIN_WINDOW * window_cost) / sub_cost
        sub = MIN_WINDOW
        while sub > narrow and sub > COLUMN_QUANTUM:
            sub //= 2
        sub = min(sub, max(vocab, 1))
    window = _quantised((allowed - sub * sub_cost) / window_cost, vocab, quantum=sub)
    return ChunkPlan(forward, sub, max(window, sub))


# The ∂h GEMM adds dz_window · W_window (2·N·D·window FLOPs) into the fp32 accumulator, which it
# reads and writes (8·N·D bytes): its tensor time exceeds that traffic's HBM time once
# window > 4 · GEMM rate / HBM bandwidth ≈ 4 · 780e12 / 3.0e12 ≈ 1040 columns on an H100 (less on
# an H200). 2048 leaves a factor 2; the rest of the allowance goes to wider sub-chunks (fewer
# launches, larger recompute and ∂W GEMMs).
MIN_WINDOW = 2048


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


# The largest budget accepted (the keyword's bound too): 100 × the gradient buffers is already
# more than any GPU holds at the heads this library targets; a larger number is a typo.
MAX_BUDGET = 100.0


def resolve_budget(budget: Optional[float] = None) -> float:
    """The chunk budget: ``budget`` when given, else ``$TOKPO_CHUNK_BUDGET``, else 10 %."""
    if budget is None:
        env = os.environ.get(BUDGET_ENV, "").strip()
        if not env:
            return DEFAULT_BUDGET
        try:
            budget = float(env)
        except ValueError:
            budget = float("nan")
        if not 0 < budget <= MAX_BUDGET:  # also refuses nan and inf
            raise ValueError(f"{BUDGET_ENV}: expected a number > 0 and <= {MAX_BUDGET:g}, got {env!r}")
    return float(budget)


def check_environment() -> None:
    """Parse ``$TOKPO_CHUNK_BUDGET`` and ``$TOKPO_CHUNK_COLUMNS`` (``ValueError`` naming the variable
    and its value when malformed): the launchers call it before their first kernel, so a bad
    value is refused before any work, by every strategy, even when no chunk is ever sized."""
    resolve_budget(None)
    _forced_columns(1)
