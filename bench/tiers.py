"""Which cases each tier runs (shared by ``python -m bench`` and the pytest-benchmark suite)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from bench.registry import Case, Shape

# The acceptance case (also the whole of --quick): CPU fp32, 4 rows x 512 tokens whose first 64
# are prompt (ignored), a 32k vocabulary and D = 256, with a reference and kl=True.
ACCEPTANCE = Case("vocab_stats_kl", Shape(rows=4, seq=512, dim=256, vocab=32000, ignored_prefix=64), "fp32")

# Real lm-heads (DESIGN.md "Benchmarks").
HEADS = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}
CORE_TOKENS = (4096, 16384, 65536)
SEQ = 4096  # tokens per row on GPU tiers; N tokens = N / SEQ rows
SWEEP_VOCABS = (32000, 64000, 128256, 256000)
SWEEP_TOKENS = (1024, 4096, 16384, 65536, 131072)
SWEEP_DIM = 4096

TIERS = ("quick", "cpu", "core", "sweep")
GPU_ONLY = ("core", "sweep")


def tier_device(tier: str) -> str:
    """Default device of a tier: the small tiers are CPU cases (the acceptance case is defined on
    CPU, and a GPU would finish them in milliseconds); the real-head tiers want CUDA."""
    if tier in GPU_ONLY:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _gpu_shape(tokens: int, dim: int, vocab: int, label: str = "") -> Shape:
    seq = min(SEQ, tokens)
    # All tokens valid on GPU tiers, so N is exactly the advertised token count and the numbers
    # compare with peers' published CE benchmarks; the ignored-prefix lever is shown by the cpu tier.
    return Shape(rows=tokens // seq, seq=seq, dim=dim, vocab=vocab, ignored_prefix=0, label=label)


def cases(tier: str, ops: Optional[Sequence[str]] = None) -> List[Case]:
    if tier == "quick":
        out = [ACCEPTANCE]
    elif tier == "cpu":
        s = ACCEPTANCE.shape
        out = []
        for op in ("vocab_stats_kl", "vocab_stats"):
            for rows in (1, 4, 8):  # three N for a time/memory-vs-N plot, 448 .. 3584 valid tokens
                out.append(Case(op, Shape(rows, s.seq, s.dim, s.vocab, s.ignored_prefix), "fp32"))
    elif tier == "core":
        out = [
            Case(op, _gpu_shape(n, d, v, label), "bf16")
            for op in ("vocab_stats_kl", "vocab_stats")
            for label, (d, v) in HEADS.items()
            for n in CORE_TOKENS
        ]
    elif tier == "sweep":
        out = [
            Case(op, _gpu_shape(n, SWEEP_DIM, v), "bf16")
            for op in ("vocab_stats_kl", "vocab_stats")
            for v in SWEEP_VOCABS
            for n in SWEEP_TOKENS
        ]
    else:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    if ops:
        out = [c for c in out if c.op in ops]
    return out
