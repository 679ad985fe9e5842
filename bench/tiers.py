"""Which cases each tier runs (shared by ``python -m bench`` and the pytest-benchmark suite), and the
acceptance checks the quick tier reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from bench.registry import Case, Shape, operations

# The table order of the operations that have one; an operation registered later (a new file in
# bench/ops/) follows them in registration order, with no edit here.
TABLE_ORDER = ("vocab_stats_kl", "vocab_stats", "forward_kl", "linear_cross_entropy", "dpo_loss", "tdpo_loss",
               "tidpo_loss", "tlpo_loss", "ppo_loss")


def _all_ops() -> Tuple[str, ...]:
    registered = [op.name for op in operations()]
    return tuple(n for n in TABLE_ORDER if n in registered) + tuple(n for n in registered if n not in TABLE_ORDER)


# Every registered operation, in table order.
OPS = _all_ops()
PREFERENCE_OPS = ("dpo_loss", "tdpo_loss", "tidpo_loss")  # rows stack [chosen; rejected]: an even count
TLPO_CANDIDATES = 16  # K of the TLPO reference configuration

# Issue 2's acceptance case: CPU fp32, 4 rows x 512 tokens whose first 64 are prompt (ignored), a 32k
# vocabulary and D = 256, with a reference and kl=True.
ACCEPTANCE = Case("vocab_stats_kl", Shape(rows=4, seq=512, dim=256, vocab=32000, ignored_prefix=64), "fp32")
# Issue 3's: tdpo_loss at 2 pairs (4 rows) x 512 tokens, 64 prompt tokens ignored, V = 32000, D = 256.
TDPO_ACCEPTANCE = Case("tdpo_loss", Shape(rows=4, seq=512, dim=256, vocab=32000, ignored_prefix=64), "fp32")


@dataclass(frozen=True)
class Check:
    """An acceptance criterion on one quick-tier case: ``impl`` against ``against``, forward+backward,
    peak extra memory at most ``max_memory_ratio`` and median time at most ``max_time_ratio`` of it."""

    source: str
    case: Case
    impl: str
    against: str
    max_memory_ratio: float
    max_time_ratio: float


CHECKS = (
    Check("issue 2", ACCEPTANCE, "torch", "naive", 1 / 8, 1.5),
    Check("issue 3", TDPO_ACCEPTANCE, "torch", "tdpo_reference_code", 1 / 8, 1.5),
)

# CPU tier: one small head (V = 32000 as a real tokenizer, D = 256), 2 pairs of short rows with a
# prompt prefix, N = 224 valid tokens (TLPO: G = 224 groups). Sized so that every operation with
# every CPU-runnable impl and peer (~24 rows) finishes in < 5 minutes on 2 cores: each (case, impl)
# costs two fresh processes of ~2 s start-up and input building on top of the measurement, which
# leaves room for one N per operation (time and memory versus N is the GPU tiers' plot; on CPU the
# quick tier's acceptance cases are the larger N).
CPU_DIM, CPU_VOCAB, CPU_SEQ, CPU_PREFIX = 256, 32000, 64, 8
CPU_ROWS = (4,)

# Real lm-heads: (hidden size D, vocabulary V) of the models named.
HEADS = {
    "llama-3-8b": (4096, 128256),
    "qwen-2.5-7b": (3584, 152064),
    "gemma-2-2b": (2304, 256000),
}
CORE_TOKENS = (4096, 16384, 65536)
GPU_SEQ = 2048  # tokens per row on GPU tiers (at most half of N, so preference batches have >= 2 rows)
SWEEP_VOCABS = (32000, 64000, 128256, 256000)
SWEEP_TOKENS = (1024, 4096, 16384, 65536, 131072)
SWEEP_DIM = 4096

TIERS = ("quick", "cpu", "core", "sweep")
GPU_ONLY = ("core", "sweep")


def tier_device(tier: str) -> str:
    """Default device of a tier. quick: the current device (CUDA when there is one, where the
    acceptance cases also run the Triton impl); cpu: CPU; core/sweep: CUDA (real heads in bf16)."""
    if tier == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def tier_reps(tier: str, device: str) -> int:
    """Timed repetitions: 20 on CUDA; on CPU 5 for the acceptance cases, 3 for the many small
    cpu-tier cases (their p20-p80 spread is reported, so a noisy median is visible)."""
    if device.startswith("cuda"):
        return 20
    return 3 if tier == "cpu" else 5


def _cpu_shape(op: str, rows: int) -> Shape:
    if op == "tlpo_loss":  # one hidden row per group: N = G groups
        return Shape(rows=rows * (CPU_SEQ - CPU_PREFIX), seq=1, dim=CPU_DIM, vocab=CPU_VOCAB,
                     candidates=TLPO_CANDIDATES)
    return Shape(rows=rows, seq=CPU_SEQ, dim=CPU_DIM, vocab=CPU_VOCAB, ignored_prefix=CPU_PREFIX)


def _gpu_shape(op: str, tokens: int, dim: int, vocab: int, label: str = "") -> Shape:
    if op == "tlpo_loss":
        return Shape(rows=tokens, seq=1, dim=dim, vocab=vocab, label=label, candidates=TLPO_CANDIDATES)
    seq = min(GPU_SEQ, tokens // 2)
    # All tokens valid on GPU tiers, so N is exactly the advertised token count and the numbers
    # compare with peers' published CE benchmarks; the ignored-prefix lever is shown by the cpu tier.
    return Shape(rows=tokens // seq, seq=seq, dim=dim, vocab=vocab, ignored_prefix=0, label=label)


def cases(tier: str, ops: Optional[Sequence[str]] = None) -> List[Case]:
    if tier == "quick":
        out = [ACCEPTANCE, TDPO_ACCEPTANCE]
    elif tier == "cpu":
        out = [Case(op, _cpu_shape(op, rows), "fp32") for op in OPS for rows in CPU_ROWS]
    elif tier == "core":
        out = [Case(op, _gpu_shape(op, n, d, v, label), "bf16")
               for op in OPS for label, (d, v) in HEADS.items() for n in CORE_TOKENS]
    elif tier == "sweep":
        out = [Case(op, _gpu_shape(op, n, SWEEP_DIM, v), "bf16")
               for op in OPS for v in SWEEP_VOCABS for n in SWEEP_TOKENS]
    else:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    if ops:
        out = [c for c in out if c.op in ops]
    return out


def tiny_cases(ops: Optional[Sequence[str]] = None) -> List[Case]:
    """One few-token fp32 case per operation (the structure of its cpu-tier case): for checking
    that peers compute the same quantity, and for the Triton interpreter."""
    return [Case(op, _cpu_shape(op, CPU_ROWS[0]).tiny(), "fp32") for op in OPS if not ops or op in ops]
