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
# Issue 12's bf16 criterion is on the same inputs in bf16 (the C++ backend's GEMMs on the matrix units).
TDPO_ACCEPTANCE_BF16 = Case("tdpo_loss", TDPO_ACCEPTANCE.shape, "bf16")


@dataclass(frozen=True)
class Check:
    """An acceptance criterion on one quick-tier case: ``impl`` against ``against``, forward+backward,
    peak extra memory at most ``max_memory_ratio`` and median time at most ``max_time_ratio`` of it.
    A bound of None is not checked (its ratio is still reported); at least one bound is given."""

    source: str
    case: Case
    impl: str
    against: str
    max_memory_ratio: Optional[float]
    max_time_ratio: Optional[float]

    def __post_init__(self) -> None:
        if self.max_memory_ratio is None and self.max_time_ratio is None:
            raise ValueError(f"Check {self.source!r} ({self.impl} vs {self.against} on {self.case.key}): "
                             "expected max_memory_ratio and/or max_time_ratio, got neither")


CHECKS = (
    Check("issue 2", ACCEPTANCE, "torch", "naive", 1 / 8, 1.5),
    Check("issue 3", TDPO_ACCEPTANCE, "torch", "tdpo_reference_code", 1 / 8, 1.5),
    # Issue 12 (the C++ backend, on a 2-core CPU): fp32 no slower than the chunked PyTorch backend and
    # >= 25x less live extra memory than materialised logits; bf16 >= 2.5x faster than torch on the
    # same bf16 inputs and >= 2x faster than naive bf16.
    Check("issue 12", TDPO_ACCEPTANCE, "cpp", "torch", None, 1.0),
    Check("issue 12", TDPO_ACCEPTANCE, "cpp", "naive", 1 / 25, None),
    Check("issue 12", TDPO_ACCEPTANCE_BF16, "cpp", "torch", None, 1 / 2.5),
    Check("issue 12", TDPO_ACCEPTANCE_BF16, "cpp", "naive", None, 1 / 2),
)

# CPU tier: one small head (V = 32000 as a real tokenizer, D = 256), 2 pairs of short rows with a
# prompt prefix, N = 224 valid tokens (TLPO: G = 224 groups), in fp32 and in bf16 (the dtype
# training runs in, and where the C++ backend's matrix-unit GEMMs differ from the fp32 path). Sized
# so that every operation with every CPU-runnable impl and peer (~80 rows over both dtypes) finishes
# in ~10 minutes on 2 cores: each (case, impl) costs two fresh processes of ~2 s start-up and input
# building on top of the measurement, which leaves room for one N per operation (time and memory
# versus N is the scale tier's plot on CPU, and the GPU tiers' on CUDA).
CPU_DIM, CPU_VOCAB, CPU_SEQ, CPU_PREFIX = 256, 32000, 64, 8
CPU_ROWS = (4,)
# fp16 stays out: no CPU training runs in it, and its rows would only double the tier's time again.
CPU_DTYPES = ("fp32", "bf16")

# Scale tier (CPU): issue 12's table, linear cross-entropy and TDPO at N valid tokens in {256, 2048,
# 16384} on the CPU tier's head (D = 256, V = 32000), fp32 and bf16, every token valid (N exact, as
# in the GPU tiers), rows of min(512, N/2) tokens so that the preference batch has an even row count.
SCALE_OPS = ("linear_cross_entropy", "tdpo_loss")
SCALE_TOKENS = (256, 2048, 16384)
SCALE_SEQ = 512

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

TIERS = ("quick", "cpu", "scale", "core", "sweep")
GPU_ONLY = ("core", "sweep")
CPU_TIERS = ("cpu", "scale")  # run on CPU whatever devices there are


def tier_device(tier: str) -> str:
    """Default device of a tier. quick: the current device (CUDA when there is one, where the
    acceptance cases also run the Triton impl); cpu/scale: CPU; core/sweep: CUDA (real heads in bf16)."""
    if tier in CPU_TIERS:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def tier_reps(tier: str, device: str) -> int:
    """Timed repetitions: 20 on CUDA; on CPU 5 for the acceptance cases, 3 for the many small
    cpu-tier cases and the scale tier's (whose N = 16384 steps take seconds each); their p20-p80
    spread is reported, so a noisy median is visible."""
    if device.startswith("cuda"):
        return 20
    return 3 if tier in CPU_TIERS else 5


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


def _scale_shape(op: str, tokens: int) -> Shape:
    seq = min(SCALE_SEQ, tokens // 2)
    shape = Shape(rows=tokens // seq, seq=seq, dim=CPU_DIM, vocab=CPU_VOCAB)
    # Checked here, not assumed: a token count that is not rows x seq, or an odd row count for a
    # preference operation (its rows are [chosen; rejected] pairs), would silently be another case.
    if shape.valid_tokens != tokens or (op in PREFERENCE_OPS and shape.rows % 2):
        raise ValueError(f"scale tier: N = {tokens} gives {shape.rows} rows x {seq} tokens for {op}; "
                         "expected exactly N tokens and, for a preference operation, an even row count")
    return shape


def cases(tier: str, ops: Optional[Sequence[str]] = None) -> List[Case]:
    if tier == "quick":
        out = [ACCEPTANCE, TDPO_ACCEPTANCE, TDPO_ACCEPTANCE_BF16]
    elif tier == "cpu":
        out = [Case(op, _cpu_shape(op, rows), dtype) for op in OPS for dtype in CPU_DTYPES for rows in CPU_ROWS]
    elif tier == "scale":
        out = [Case(op, _scale_shape(op, n), dtype)
               for op in SCALE_OPS if op in OPS for dtype in CPU_DTYPES for n in SCALE_TOKENS]
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
