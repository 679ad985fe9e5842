"""``python -m bench.model`` (also ``python -m bench --model``): predicted time and memory of the
Triton strategies on an H100 SXM and an H200, with no GPU.

For every operation of the core tier below (``MODEL_OPS``), at each core-tier head and token count
(``bench/tiers.py``), and for each strategy (``"streaming"``, ``"chunked"``), the model adds up the
kernels of one forward+backward step — cuBLAS GEMMs, fused Triton ``tl.dot`` kernels, memory-bound
row passes, launch gaps, host reads — and reports FLOPs, HBM and L2 bytes, the predicted time, the
fraction of the bf16 roofline the step reaches under the operation's FLOP model (``bench/flops.py``:
8NDV, 10NDV or 12NDV) and the peak extra memory against the gradient buffers' floor.

Every hardware number is a named assumption of :class:`Gpu` with its source (printed in the header,
one command-line flag each). The step's kernels follow the launchers (``tokpo_kernels/kernels/
launch.py``, ``backward_chunks.py``), and the chunk widths come from ``chunking.chunk_plan``, called
with the same arguments as the launchers (forward chunk, backward sub-chunk and ``∂h`` window).
``docs/performance-model.md`` gives the equations and what a GPU run must measure to replace each
assumption. A prediction is not a measurement: the README labels these numbers as a model.

    python -m bench.model                          # every op x head x N x strategy, H100 and H200
    python -m bench.model --gpu H100 --ops linear_cross_entropy,tdpo_loss --heads llama-3-8b --n 16384
    python -m bench.model --json model.json        # the rows as a JSON list
    python -m bench.model --breakdown ...          # where the time of each printed row goes
    python -m bench.model --gemm-tflops 750        # any assumption overridden (see --help)
    python -m bench.model --ignored-fraction 0.25  # what-ifs on the design (prompt rows, buffer handling)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from bench import tiers
from bench.registry import Case, get_operation
from tokpo_kernels.kernels import chunking, configs
from tokpo_kernels.kernels.forward_stats import NUM_PARTIALS
from tokpo_kernels.kernels.strategy import DEFAULT_STRATEGY

# The core tier's operations the model covers, in the bench's table order.
MODEL_OPS = ("vocab_stats_kl", "linear_cross_entropy", "dpo_loss", "tdpo_loss", "tlpo_loss")
STRATEGIES = chunking.STRATEGIES
IN_BYTES = 2  # the core tier runs bf16 hidden states and heads
FP32 = 4


@dataclass(frozen=True)
class OpTraits:
    """What an operation's step does to the heads, as far as cost goes.

    ``reference``: a frozen reference head is streamed in the forward (its log-sum-exp is needed
    even for a log-prob at one id). ``kl_grad``: a full-vocabulary KL has a gradient, so the
    backward recomputes the reference's logits too. The FLOP model of ``bench/flops.py`` follows
    from these two (8NDV, 10NDV with a reference, 12NDV with a KL gradient); the tests check that
    they agree with each operation's registered FLOPs.
    """

    reference: bool
    kl_grad: bool
    flop_model: str


OP_TRAITS: Dict[str, OpTraits] = {
    # Cross-entropy: policy head only.
    "linear_cross_entropy": OpTraits(reference=False, kl_grad=False, flop_model="8NDV"),
    # bench/ops/dpo_loss.py passes the reference as hidden states + head (as Liger requires), so its
    # log-sum-exp is streamed in the forward; the reference is frozen and DPO has no KL term, so the
    # backward touches the policy head only.
    "dpo_loss": OpTraits(reference=True, kl_grad=False, flop_model="10NDV"),
    # TDPO2: the KL of the rejected rows has a gradient, which needs the reference's probabilities.
    "tdpo_loss": OpTraits(reference=True, kl_grad=True, flop_model="12NDV"),
    # TLPO: reference log-probs at the K candidates are precomputed (ref_logp=), no reference head.
    "tlpo_loss": OpTraits(reference=False, kl_grad=False, flop_model="8NDV"),
    # linear_vocab_stats with a reference and kl=True, cotangents on logp, lse and kl.
    "vocab_stats_kl": OpTraits(reference=True, kl_grad=True, flop_model="12NDV"),
}


def _assumption(default: Any, *, flag: str, unit: str, scale: float = 1.0, source: str) -> Any:
    """A dataclass field that is a named assumption: its command-line flag, the unit the flag is
    given in (``value = flag value * scale``) and where the number comes from."""
    return field(default=default, metadata={"flag": flag, "unit": unit, "scale": scale, "source": source})


@dataclass(frozen=True)
class Gpu:
    """The hardware assumptions for one GPU. Each field is overridable (``--help`` lists the flags);
    none is a measurement of this library's kernels."""

    name: str = "H100"
    # Both chips have the same SMs and clocks; the H200 differs in HBM only.
    peak_flops: float = _assumption(
        989.4e12, flag="--peak-tflops", unit="TFLOP/s", scale=1e12,
        source="spec: dense bf16 tensor peak of the H100 SXM5 and the H200 SXM (132 SMs x 4096 FLOP/clk x 1.83 GHz)")
    gemm_flops: float = _assumption(
        780e12, flag="--gemm-tflops", unit="TFLOP/s", scale=1e12,
        source="measured elsewhere: cuBLAS bf16 8192^3 GEMM on an H200, 769-798 TFLOP/s over runs (range 750-800); "
               "taken as the same on the H100 SXM (same SMs, clock and power limit)")
    triton_efficiency: float = _assumption(
        0.525, flag="--triton-efficiency", unit="x peak",
        source="assumption: a fused Triton tl.dot kernel on sm_90 without warp specialisation (Triton 3.9 "
               "cannot warp-specialise there) reaches 45-60 % of peak; the midpoint is used")
    hbm_bytes_per_s: float = _assumption(
        3.35e12, flag="--hbm-tbs", unit="TB/s", scale=1e12,
        source="spec: HBM3 3.35 TB/s (H100 SXM5), HBM3e 4.8 TB/s (H200)")
    hbm_efficiency: float = _assumption(
        0.90, flag="--hbm-efficiency", unit="x spec",
        source="assumption: streaming kernels reach 90 % of the spec bandwidth")
    l2_bytes_per_s: float = _assumption(
        6.65e12, flag="--l2-tbs", unit="TB/s", scale=1e12,
        source="measured elsewhere: XLA's GPU dot-fusion cost model (device_l2_bandwidth, 'measured H100 L2 "
               "bandwidth'); used for the H200 too (same L2 design)")
    l2_bytes: float = _assumption(
        50e6, flag="--l2-mb", unit="MB", scale=1e6, source="spec: 50 MB L2 (H100 SXM5, H200)")
    l2_reuse_fraction: float = _assumption(
        0.5, flag="--l2-reuse-fraction", unit="x L2",
        source="assumption: a buffer one kernel writes and the next reads is read from L2 when it fits in "
               "this fraction of L2 (the rest holds the operands in flight); 0 sends every read to HBM")
    sms: int = _assumption(132, flag="--sms", unit="SMs", source="spec: 132 SMs (H100 SXM5, H200)")
    launch_s: float = _assumption(
        4e-6, flag="--launch-us", unit="us", scale=1e-6,
        source="assumption: idle time per dependent kernel launch (grid drain and ramp) on a stream the CPU "
               "keeps ahead of")
    sync_s: float = _assumption(
        20e-6, flag="--sync-us", unit="us", scale=1e-6,
        source="assumption: idle GPU per host read of the valid-row count (the queue drains, the scalar "
               "crosses PCIe, the CPU launches again); launch.py's docstring says tens of microseconds")
    gemm_tiles: Tuple[Tuple[int, int], ...] = _assumption(
        ((128, 256), (256, 128), (128, 128)), flag="--gemm-tiles", unit="MxN,...",
        source="assumption: the output tiles cuBLAS's sm_90 bf16 kernels choose among; the model takes the "
               "one with the least wave quantisation (partial last wave of tiles over the SMs)")
    split_k_max: int = _assumption(
        4, flag="--split-k-max", unit="splits",
        source="assumption: cuBLAS may split the reduction of a GEMM with K >= 2 x its larger output side up "
               "to this many ways when that fills the last wave of tiles better, paying an fp32 partial-sum "
               "round trip through HBM; 1 disables")
    calibration_gemm: Tuple[int, int, int] = _assumption(
        (8192, 8192, 8192), flag="--calibration-gemm", unit="MxNxK",
        source="the shape the GEMM rate was measured at: its own wave quantisation is divided out of the rate")

    def __post_init__(self) -> None:
        # Checked here so that a mistyped override fails with its flag's name before any arithmetic.
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            numbers = [x for t in value for x in t] if f.name == "gemm_tiles" else (
                list(value) if isinstance(value, tuple) else [value])
            smallest = 0.0 if f.name == "l2_reuse_fraction" else math.ulp(0.0)
            if not numbers or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= smallest
                                  for x in numbers):
                raise ValueError(f"{f.name} ({f.metadata['flag']}): expected positive numbers, got {value!r}")
        for name in ("triton_efficiency", "hbm_efficiency", "l2_reuse_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}: expected a fraction at most 1, got {getattr(self, name)!r}")
        if self.gemm_flops > self.peak_flops:
            raise ValueError(f"gemm_flops {self.gemm_flops:.4g}: expected at most peak_flops {self.peak_flops:.4g}")
        if not isinstance(self.sms, int) or not isinstance(self.split_k_max, int):
            raise ValueError(f"sms, split_k_max: expected integers, got {self.sms!r}, {self.split_k_max!r}")

    @property
    def hbm_rate(self) -> float:
        """Achievable HBM bytes/s."""
        return self.hbm_bytes_per_s * self.hbm_efficiency

    @property
    def triton_flops(self) -> float:
        return self.triton_efficiency * self.peak_flops


GPUS: Dict[str, Gpu] = {"H100": Gpu(name="H100"), "H200": Gpu(name="H200", hbm_bytes_per_s=4.8e12)}


_FWD_CONFIG = configs.cuda_config("fwd", torch.bfloat16)


@dataclass(frozen=True)
class Design:
    """The implementation choices the model follows (the launchers' code as it stands), overridable
    to ask "what if" questions; they are not hardware numbers."""

    # BLOCK_N x BLOCK_V of the fused Triton kernels on CUDA: kernels/configs.py's bf16 default.
    stream_tile: Tuple[int, int] = (_FWD_CONFIG.block_n, _FWD_CONFIG.block_v)
    chunk_budget: Optional[float] = None  # None: the library's default (chunking.resolve_budget)
    # Ignored rows as a fraction of all rows (prompt tokens). None: the case's own (the core tier
    # has none). Only with ignored rows do the launchers gather compacted copies of h (and of the
    # reference's h) and scatter dh back; the valid-row count N stays the case's.
    ignored_fraction: Optional[float] = None
    # True models a loop that allocates its next buffer while the previous one is still referenced
    # (two windows / chunks alive for a moment). The launchers do not: backward_chunks.py reuses one
    # dz buffer for every window and launch.py frees each logit chunk before the next GEMM.
    rebind_overlap: bool = False
    # gemm.addmm_f32_ adds into the fp32 dh accumulator in place when its one-time float64 self-check
    # passes; otherwise through a temporary the accumulator's size (one more N x D x 4 buffer and
    # pass per window). True: the check passes.
    inplace_addmm: bool = True
    compaction_launches: int = 4  # the valid-row permutation (argsort and count), once per step
    # O(N) kernels of the op and loss layers per step (merges, masks, the loss's arithmetic, its
    # autograd, the fp32 copies of the per-row inputs): tiny, so each costs one launch gap.
    small_kernels: int = 40


# Bytes per row of the O(N) tensors alive across the step: statistics saved by the forward, the
# permutation, the per-row cotangents and their fp32 copies.
SAVED_ROW_BYTES = 16 * FP32


@dataclass(frozen=True)
class Cost:
    """One kernel (or ``launches`` kernels) of a step."""

    seconds: float
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    launches: int = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wave_efficiency(gpu: Gpu, m: int, n: int) -> float:
    """Useful fraction of the tile slots an ``m x n`` output fills with the best tile of
    ``gpu.gemm_tiles`` (no split): ``m*n / (waves * SMs * tile)``."""
    best = 0.0
    for tm, tn in gpu.gemm_tiles:
        tiles = _cdiv(m, tm) * _cdiv(n, tn)
        best = max(best, m * n / (_cdiv(tiles, gpu.sms) * gpu.sms * tm * tn))
    return best


def gemm(gpu: Gpu, m: int, n: int, k: int, *, out_bytes: int = FP32, accumulate: bool = False) -> Cost:
    """A cuBLAS GEMM ``(m x k) . (k x n)`` of bf16 operands.

    Tensor time: the waves of output tiles, each tile at the per-SM rate implied by the measured GEMM
    rate (the calibration shape's own quantisation divided out), with the tile shape and K split
    (long reductions only) that finish first. HBM: operands read once (cuBLAS's rasterisation keeps their reuse in L2),
    the output written once, an accumulated output also read (``accumulate``: beta = 1 into an fp32
    buffer), split-K partials written and read. The kernel takes the larger of the two times. No
    L2 bound: the measured rate already includes cuBLAS's L2 behaviour (cluster multicast).
    """
    cm, cn, _ = gpu.calibration_gemm
    per_sm = gpu.gemm_flops / gpu.sms / wave_efficiency(gpu, cm, cn)
    io = (m * k + k * n) * IN_BYTES + m * n * out_bytes + (m * n * FP32 if accumulate else 0)
    best: Optional[Cost] = None
    for tm, tn in gpu.gemm_tiles:
        tiles = _cdiv(m, tm) * _cdiv(n, tn)
        # Only a long reduction is split (K at least twice the larger output side: the dW GEMMs,
        # K = N); the measured square GEMM is not, which keeps the calibration consistent.
        for s in range(1, (gpu.split_k_max if k >= 2 * max(m, n) else 1) + 1):
            tensor = _cdiv(tiles * s, gpu.sms) * 2.0 * tm * tn * _cdiv(k, s) / per_sm
            hbm = io + (2 * s * m * n * FP32 if s > 1 else 0)
            l2 = (m * k * _cdiv(n, tn) + k * n * _cdiv(m, tm)) * IN_BYTES + hbm - (m * k + k * n) * IN_BYTES
            cost = Cost(max(tensor, hbm / gpu.hbm_rate), 2.0 * m * n * k, hbm, l2, 1 + (s > 1))
            if best is None or _elapsed(gpu, cost) < _elapsed(gpu, best):
                best = cost
    assert best is not None
    return best


def _elapsed(gpu: Gpu, cost: Cost) -> float:
    """A kernel's time including its launch gaps."""
    return cost.seconds + cost.launches * gpu.launch_s


def fused(gpu: Gpu, design: Design, m: int, n: int, k: int, *, heads: int, write_bytes: float,
          quantise: bool) -> Cost:
    """A fused Triton kernel forming ``heads`` logit products ``(m x k) . (k x n)`` tile by tile
    in registers (``design.stream_tile``), with an epilogue that writes ``write_bytes``.

    The larger of: tensor time at the Triton efficiency (times the wave quantisation of its tiles
    when ``quantise``: one tile per program, one program per SM); L2->SM time of the operand tiles
    (each ``h`` block re-read for every vocabulary tile, each ``W`` tile for every row block), at
    the L2 rate, as nothing multicasts; HBM time with every operand read once.
    """
    bn, bv = design.stream_tile
    flops = 2.0 * m * n * k * heads
    l2 = heads * (m * k * _cdiv(n, bv) + n * k * _cdiv(m, bn)) * IN_BYTES + write_bytes
    hbm = heads * (m * k + n * k) * IN_BYTES + write_bytes
    eff = 1.0
    if quantise:
        tiles = _cdiv(m, bn) * _cdiv(n, bv)
        eff = tiles / (_cdiv(tiles, gpu.sms) * gpu.sms)
    t = max(flops / (gpu.triton_flops * eff), l2 / gpu.l2_bytes_per_s, hbm / gpu.hbm_rate)
    return Cost(t, flops, hbm, l2, 1)


def stream(gpu: Gpu, read: float, write: float, *, fresh: float = 0.0, flops: float = 0.0) -> Cost:
    """A memory-bound pass reading ``read`` and writing ``write`` bytes. ``fresh`` of the read
    bytes were written by the previous kernel: they come from L2 when they fit in
    ``l2_reuse_fraction`` of it."""
    from_l2 = fresh if fresh <= gpu.l2_reuse_fraction * gpu.l2_bytes else 0.0
    hbm = read - from_l2 + write
    return Cost(hbm / gpu.hbm_rate + from_l2 / gpu.l2_bytes_per_s, flops, hbm, read + write, 1)


def host_read(gpu: Gpu) -> Cost:
    """One device-to-host read of a scalar (the valid-row count): idle GPU, no kernel."""
    return Cost(gpu.sync_s, launches=0)


@dataclass
class Ledger:
    """The kernels of one phase of a step, grouped by what they do; each group's time includes
    its launch gaps."""

    gpu: Gpu
    items: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def add(self, what: str, cost: Cost, times: int = 1) -> None:
        acc = self.items.setdefault(what, dict.fromkeys(LEDGER_KEYS, 0.0))
        acc["seconds"] += _elapsed(self.gpu, cost) * times
        acc["flops"] += cost.flops * times
        acc["hbm_bytes"] += cost.hbm_bytes * times
        acc["l2_bytes"] += cost.l2_bytes * times
        acc["launches"] += cost.launches * times

    def total(self) -> Dict[str, float]:
        return {k: sum(v[k] for v in self.items.values()) for k in LEDGER_KEYS}


LEDGER_KEYS = ("seconds", "flops", "hbm_bytes", "l2_bytes", "launches")


def chunk_widths(total: int, columns: int) -> List[Tuple[int, int]]:
    """``(width, count)`` of ``total`` columns cut into chunks of ``columns``: full chunks, then
    the remainder (the launchers' ``range(0, total, columns)``)."""
    full, rest = divmod(total, columns)
    return ([(columns, full)] if full else []) + ([(rest, 1)] if rest else [])


def _expanded(widths: Sequence[Tuple[int, int]]) -> List[int]:
    return [w for w, count in widths for _ in range(count)]


@dataclass(frozen=True)
class Problem:
    """One modelled case: an operation at a head and a number of valid rows."""

    op: str
    head: str
    n: int  # valid rows (tokens; TLPO: groups)
    dim: int
    vocab: int
    targets: int  # J target ids per row (TLPO: K candidates)
    model_flops: float  # the operation's forward+backward FLOPs from bench/flops.py
    ignored: int = 0  # ignored rows besides the n valid ones (prompt tokens); the core tier has none

    @property
    def traits(self) -> OpTraits:
        return OP_TRAITS[self.op]


def ignored_rows(problem: Problem, design: Design = Design()) -> int:
    """Ignored rows of a step: the case's own, or ``design.ignored_fraction`` of all rows."""
    f = design.ignored_fraction
    return problem.ignored if f is None else round(problem.n * f / (1 - f))


@dataclass(frozen=True)
class Plans:
    """The chunk widths of one step, from ``chunking.chunk_plan`` called as the launchers call it.

    ``forward``: columns per fp32 logit chunk of the chunked forward (None for streaming, whose
    forward keeps no chunk). ``backward``: the backward's plan (``sub`` columns per ``∂z`` launch
    and ``∂W`` GEMM, ``window`` columns per ``∂h`` GEMM). ``*_copies``: the compacted copies of
    hidden-state matrices each phase holds when some rows are ignored; they come on top of the
    chunk budget (``chunking.allowance_bytes``), so they are memory only, not plan arguments.
    """

    forward: Optional[int]
    backward: chunking.ChunkPlan
    forward_copies: int
    backward_copies: int


# No bench operation of MODEL_OPS passes a bias (bench/ops/*.py), so the backward's plan is asked
# with has_bias=False, as backward_chunks.py asks it (``needs.bias``), and no ∂b partials, ∂b sums
# or bias reads are modelled. The recorded-arguments test fails if an operation starts passing one.
HAS_BIAS = False


def plans(problem: Problem, strategy: str, design: Design = Design()) -> Plans:
    """The chunk widths and row copies of ``strategy`` for ``problem`` (``Plans``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    N, D, V = problem.n, problem.dim, problem.vocab
    R, Q = problem.traits.reference, problem.traits.kl_grad
    some_ignored = ignored_rows(problem, design) > 0
    # launch.py (_chunked_stats): `compact_rows(h, idx, n), compact_rows(rh, idx, n)`, copies only
    # when rows are dropped; the streaming forward reads rows through the permutation, copying none.
    f_copies = (1 + R) if some_ignored and strategy == "chunked" else 0
    # backward_chunks.py: h_c always, rh_c only `if (use_q and strategy == "chunked")`.
    b_copies = (1 + (Q and strategy == "chunked")) if some_ignored else 0
    kw: Dict[str, Any] = dict(in_bytes=IN_BYTES, weight_bytes=IN_BYTES, has_ref=R)
    # launch.py: chunk_plan("chunked", n_valid, v, D, in_bytes=, weight_bytes=, has_ref=, budget=).forward
    forward = (chunking.chunk_plan("chunked", N, V, D, **kw, budget=design.chunk_budget).forward
               if strategy == "chunked" else None)
    # backward_chunks.py: chunk_plan(strategy, n_valid, v, d, in_bytes=, weight_bytes=, has_ref=,
    # kl_grad=use_q, has_bias=needs.bias, budget=).
    backward = chunking.chunk_plan(strategy, N, V, D, **kw, kl_grad=Q, has_bias=HAS_BIAS, budget=design.chunk_budget)
    return Plans(forward, backward, f_copies, b_copies)


def windows(vocab: int, plan: chunking.ChunkPlan) -> List[Tuple[int, List[Tuple[int, int]], int]]:
    """``(window width, its sub-chunks as (width, count), how many such windows)`` of the backward
    (``backward_chunks.py``: windows of ``plan.window`` columns, each cut into ``plan.sub``)."""
    return [(w, chunk_widths(w, plan.sub), count) for w, count in chunk_widths(vocab, plan.window)]


# The streaming forward's grid (kernels/configs.py, forward_splits): at least this many vocabulary
# splits so that the co-resident programs share row blocks of h through L2.
FORWARD_L2_SPLITS = 8


def forward_splits(gpu: Gpu, rows: int, vocab: int, design: Design = Design()) -> int:
    """The vocabulary splits of the streaming forward's grid on ``gpu``: ``configs.forward_splits``
    (which asks the device for its SM count), with ``gpu.sms``; ``$TOKPO_FORWARD_SPLITS`` too."""
    bn, bv = design.stream_tile
    tiles = _cdiv(vocab, bv)
    forced = os.environ.get("TOKPO_FORWARD_SPLITS")
    if forced:
        return max(1, min(int(forced), tiles))
    return max(1, min(tiles // 8, max(FORWARD_L2_SPLITS, _cdiv(2 * gpu.sms, _cdiv(max(rows, 1), bn)))))


def predict(problem: Problem, strategy: str, gpu: Gpu, design: Design = Design()) -> Dict[str, Any]:
    """The predicted forward+backward step of ``strategy`` for ``problem`` on ``gpu``.

    Returns the time, FLOPs and bytes of each phase, the chunk plan, and the memory (see
    ``docs/performance-model.md`` for the equations)."""
    pl = plans(problem, strategy, design)
    N, D, V, J = problem.n, problem.dim, problem.vocab, problem.targets
    R, Q = problem.traits.reference, problem.traits.kl_grad
    heads_f, heads_b = 1 + R, 1 + Q
    total_rows = N + ignored_rows(problem, design)
    rows = N * D * IN_BYTES  # one compacted copy of h
    fwd, bwd = Ledger(gpu), Ledger(gpu)

    # Forward, both strategies (launch.py, triton_forward): the valid-row permutation and count
    # (_compaction), the target logits by a gathered dot per head over the J target rows (pairs with
    # an ignored id are masked: their W and h rows are not read; every pair's int64 id is).
    fwd.add("compaction (permutation)", Cost(0.0, launches=design.compaction_launches))
    fwd.add("target logits (gathered dot)",
            stream(gpu, N * J * D * IN_BYTES + rows + total_rows * J * 8, N * J * FP32, flops=2.0 * N * J * D),
            heads_f)
    # Running per-row statistics: max, sum-exp, entropy and logit sums, plus the reference's max,
    # sum-exp and the KL sum (fp32 planes over N rows).
    state = (4 + 3 * R) * N * FP32
    if strategy == "chunked":
        assert pl.forward is not None
        fwd.add("host read of the valid-row count", host_read(gpu))  # int(n_valid.item()): no kernel
        if pl.forward_copies:
            fwd.add("compacted copy of h (index_select)", stream(gpu, rows, rows), pl.forward_copies)
        # torch.zeros of the (NUM_PARTIALS, 1, N) state, then `state[list(MAX_PLANES)] = -inf`: the
        # index list's copy to the device and the index_put kernel.
        fwd.add("running-state init (zeros, max planes at -inf)",
                Cost(NUM_PARTIALS * N * FP32 / gpu.hbm_rate, hbm_bytes=NUM_PARTIALS * N * FP32, launches=3))
        for w, count in chunk_widths(V, pl.forward):
            fwd.add("logit GEMM z = h W_c^T (cuBLAS, fp32 out)", gemm(gpu, N, w, D), count * heads_f)
            z = heads_f * N * w * FP32
            fwd.add("row statistics pass (reads z)", stream(gpu, z + state, state, fresh=z), count)
        # _merged: the one-split state through merge_splits (its O(N) arithmetic is in small_kernels).
        fwd.add("merge of the running state", stream(gpu, state, state, fresh=state))
        if total_rows > N:
            # expand_rows of each statistic present (lse; ref_lse with a reference; kl when asked,
            # which for these operations is exactly when its gradient flows): zeros, then index_copy_.
            stats = 1 + R + Q
            fwd.add("scatter of the statistics: zeroed rows", stream(gpu, 0, total_rows * FP32), stats)
            fwd.add("scatter of the statistics: valid rows copied in", stream(gpu, N * FP32 + N * 8, N * FP32), stats)
    else:
        partials = NUM_PARTIALS * forward_splits(gpu, total_rows, V, design) * total_rows * FP32
        fwd.add("fused forward statistics (Triton)", fused(gpu, design, N, V, D, heads=heads_f,
                                                           write_bytes=partials, quantise=False))
        fwd.add("merge of vocabulary splits", stream(gpu, partials, state, fresh=partials))

    # Backward, both strategies (backward_chunks.py): `row_valid.sum().item()` (one kernel and a host
    # read), the compacted copies, the zeroed fp32 dh accumulator; per sub-chunk dz then the dW GEMM
    # (mm_into: an fp32 product, then its copy into the bf16 dW rows); per window the dh GEMM.
    bwd.add("valid-row count (sum) and its host read", Cost(gpu.sync_s, hbm_bytes=total_rows, launches=1))
    if pl.backward_copies:
        bwd.add("compacted copy of h (index_select)", stream(gpu, rows, rows), pl.backward_copies)
    acc = N * D * FP32
    bwd.add("zero-fill of the fp32 dh accumulator", stream(gpu, 0, acc))
    row_inputs = 8 * N * FP32  # saved statistics and cotangents each dz pass reads
    for width, subs, n_windows in windows(V, pl.backward):
        for w, per_window in subs:
            k = n_windows * per_window
            dz = N * w * IN_BYTES
            if strategy == "chunked":
                bwd.add("logit recompute GEMM (cuBLAS, fp32 out)", gemm(gpu, N, w, D), k * heads_b)
                z = heads_b * N * w * FP32
                bwd.add("dz pass (reads z, writes bf16 dz into the window)",
                        stream(gpu, z + row_inputs, dz, fresh=z), k)
            else:
                bwd.add("fused recompute + dz kernel (Triton)",
                        fused(gpu, design, N, w, D, heads=heads_b, write_bytes=dz + row_inputs, quantise=True), k)
            bwd.add("dW_sub = dz_sub^T h GEMM (cuBLAS, fp32 out)", gemm(gpu, w, D, N), k)
            dw = w * D * FP32
            bwd.add("cast of dW_sub into the bf16 dW rows", stream(gpu, dw, w * D * IN_BYTES, fresh=dw), k)
        if design.inplace_addmm:
            bwd.add("dh_acc += dz_window W_window GEMM (cuBLAS, fp32 accumulate)",
                    gemm(gpu, N, D, width, accumulate=True), n_windows)
        else:
            bwd.add("dh_tmp = dz_window W_window GEMM (cuBLAS, fp32 out)", gemm(gpu, N, D, width), n_windows)
            bwd.add("dh_acc += dh_tmp (add_)", stream(gpu, 2 * acc, acc, fresh=acc), n_windows)
    if total_rows > N:
        # expand_rows: a zeroed fp32 dh of all rows (new_zeros), then the valid rows copied in
        # (index_copy_ reads the accumulator and the int64 row indices).
        bwd.add("scatter of dh: zeroed fp32 dh of all rows", stream(gpu, 0, total_rows * D * FP32))
        bwd.add("scatter of dh: valid rows copied in (index_copy_)", stream(gpu, acc + N * 8, acc))
    # ops/vocab_stats.py: `dh.to(hidden.dtype)`; `dw.to(weight.dtype)` is a no-op (dW is bf16 already).
    bwd.add("returned dh: cast of the fp32 dh", stream(gpu, total_rows * D * FP32, total_rows * D * IN_BYTES))
    fwd.add("O(N) op and loss kernels", Cost(0.0, launches=design.small_kernels // 2))
    bwd.add("O(N) op and loss kernels", Cost(0.0, launches=design.small_kernels - design.small_kernels // 2))

    f, b = fwd.total(), bwd.total()
    seconds = f["seconds"] + b["seconds"]
    mem = memory(problem, strategy, design, gpu)
    plan = pl.backward
    return {
        "chunk_columns": plan.sub, "chunks": sum(len(_expanded(s)) * c for _, s, c in windows(V, plan)),
        "window_columns": plan.window, "windows": sum(c for _, _, c in windows(V, plan)),
        "forward_columns": pl.forward,
        "forward_chunks": None if pl.forward is None else len(_expanded(chunk_widths(V, pl.forward))),
        "ignored_rows": total_rows - N,
        "fwd_ms": 1e3 * f["seconds"], "bwd_ms": 1e3 * b["seconds"], "predicted_ms": 1e3 * seconds,
        "flops": f["flops"] + b["flops"], "hbm_bytes": f["hbm_bytes"] + b["hbm_bytes"],
        "l2_bytes": f["l2_bytes"] + b["l2_bytes"], "launches": int(f["launches"] + b["launches"]),
        "roofline_fraction": problem.model_flops / gpu.peak_flops / seconds,
        "gemm_rate_fraction": problem.model_flops / gpu.gemm_flops / seconds,
        **mem,
        "breakdown": {"fwd": fwd.items, "bwd": bwd.items},
    }


def memory(problem: Problem, strategy: str, design: Design = Design(), gpu: Optional[Gpu] = None) -> Dict[str, Any]:
    """Peak extra memory of a step (bytes above the inputs) and the floor it is compared with.

    The buffers alive at each moment of the step, as the launchers allocate them (``gpu`` only sets
    the streaming forward's split count: default the H100's), the largest moment wins, plus the
    O(N) tensors kept across the step (``SAVED_ROW_BYTES`` per row):

    * forward: the compacted copies, the chunked strategy's fp32 logit chunk(s) (``launch.py``
      frees each chunk before the next GEMM; with ``rebind_overlap``, the what-if of a loop that
      does not, the previous chunk's too while the next is allocated), the running state, or the
      streaming forward's split partials;
    * backward window loop: ``∂W`` (weight dtype), the fp32 ``∂h`` accumulator and the compacted
      copies (``base``), plus the one bf16 ``∂z`` buffer of ``min(window, V)`` columns that
      ``backward_chunks.py`` reuses for every window (the last, narrower one uses its first
      columns) and, during a sub-chunk, the larger of its fp32 logits (chunked: the reference's too
      when a KL gradient flows; freed before the ``∂W`` GEMM) and the ``∂W`` GEMM's fp32 output
      (freed after its copy into ``∂W``); with ``rebind_overlap``, the what-if of a new buffer per
      window, two windows' ``∂z`` as the next one is allocated; without ``inplace_addmm``, an
      accumulator-sized temporary per window;
    * backward end (the ``∂z`` buffer and the copies freed first): with ignored rows, ``∂W``, the
      fp32 ``∂h`` of the valid rows and the zeroed fp32 ``∂h`` of all rows it is scattered into;
      then ``∂W``, the fp32 ``∂h`` of all rows and the returned ``∂h`` in the hidden dtype.
    """
    gpu = GPUS["H100"] if gpu is None else gpu
    pl = plans(problem, strategy, design)
    N, D, V = problem.n, problem.dim, problem.vocab
    R, Q = problem.traits.reference, problem.traits.kl_grad
    total_rows = N + ignored_rows(problem, design)
    rows, acc, dw = N * D * IN_BYTES, N * D * FP32, V * D * IN_BYTES
    moments: Dict[str, int] = {}

    def at(name: str, size: int) -> None:
        moments[name] = max(moments.get(name, 0), int(size))

    if strategy == "chunked":
        assert pl.forward is not None
        # launch.py's forward: the compacted copies, the (NUM_PARTIALS, n) state, per chunk z (and zr).
        base_f = pl.forward_copies * rows + NUM_PARTIALS * N * FP32
        prev = 0
        for w in _expanded(chunk_widths(V, pl.forward)):
            col = N * w * FP32
            if design.rebind_overlap and prev:
                # z_new beside z_prev (and zr_prev); then zr_new beside z_new and zr_prev.
                at("forward chunk", base_f + prev * (1 + R) + col)
                if R:
                    at("forward chunk", base_f + prev + 2 * col)
            at("forward chunk", base_f + (1 + R) * col)
            prev = col
    else:
        at("forward partials", NUM_PARTIALS * forward_splits(gpu, total_rows, V, design) * total_rows * FP32)

    base = dw + acc + pl.backward_copies * rows
    buffer = N * min(pl.backward.window, V) * IN_BYTES  # the one dz buffer of every window
    prev_dz = 0
    for width in _expanded([(w, c) for w, _, c in windows(V, pl.backward)]):
        dz = N * width * IN_BYTES if design.rebind_overlap else buffer
        if design.rebind_overlap and prev_dz:
            at("backward: next dz window allocated", base + prev_dz + dz)
        for s in {w for w, _ in chunk_widths(width, pl.backward.sub)}:
            if strategy == "chunked":
                at("backward: sub-chunk logits", base + dz + (1 + Q) * N * s * FP32)
            at("backward: dW GEMM output", base + dz + s * D * FP32)
        if not design.inplace_addmm:
            at("backward: dh temporary", base + dz + acc)
        prev_dz = dz
    if total_rows > N:
        # backward_chunks.py frees the dz buffer and the copies before scattering dh to all rows.
        at("backward end: dh scattered to all rows", dw + acc + total_rows * D * FP32)
    at("backward end: returned dh", dw + total_rows * D * (FP32 + IN_BYTES))

    saved = SAVED_ROW_BYTES * total_rows
    where = max(moments, key=moments.__getitem__)
    peak = moments[where] + saved
    floor = chunking.floor_bytes(N, V, D, IN_BYTES, IN_BYTES)
    loop = max((v for k, v in moments.items() if k.startswith("backward:")), default=base)
    allowance = chunking.allowance_bytes(N, V, D, in_bytes=IN_BYTES, weight_bytes=IN_BYTES,
                                         budget=chunking.resolve_budget(design.chunk_budget))
    return {"peak_extra_bytes": int(peak), "floor_bytes": int(floor), "peak_moment": where,
            "chunk_bytes": int(loop - base), "allowance_bytes": int(allowance),
            "row_copy_bytes": int(max(pl.forward_copies, pl.backward_copies) * rows),
            "returned_grad_bytes": (V + total_rows) * D * IN_BYTES}


def problems(ops: Sequence[str] = MODEL_OPS, heads: Optional[Sequence[str]] = None,
             tokens: Optional[Sequence[int]] = None) -> List[Problem]:
    """The core tier's cases (``bench/tiers.py``) of ``ops``, optionally narrowed to some heads and
    token counts."""
    unknown = sorted(set(ops) - set(OP_TRAITS))
    if unknown:
        raise ValueError(f"ops: the model covers {list(OP_TRAITS)}, got {unknown}")
    if heads is not None and not set(heads) <= set(tiers.HEADS):
        raise ValueError(f"heads: expected some of {list(tiers.HEADS)}, got {list(heads)}")
    if tokens is not None and not set(tokens) <= set(tiers.CORE_TOKENS):
        raise ValueError(f"n: expected some of {list(tiers.CORE_TOKENS)}, got {list(tokens)}")
    out = []
    for case in tiers.cases("core", ops=list(ops)):
        s = case.shape
        if (heads is None or s.label in heads) and (tokens is None or s.valid_tokens in tokens):
            out.append(_problem(case))
    return out


def _problem(case: Case) -> Problem:
    s = case.shape
    flops = get_operation(case.op).flops(s)["fwd_bwd"]
    return Problem(case.op, s.label, s.valid_tokens, s.dim, s.vocab, s.candidates or 1, flops,
                   ignored=s.tokens - s.valid_tokens)


def rows(gpus: Iterable[Gpu], design: Design = Design(), ops: Sequence[str] = MODEL_OPS,
         heads: Optional[Sequence[str]] = None, tokens: Optional[Sequence[int]] = None,
         breakdown: bool = False) -> List[Dict[str, Any]]:
    """One row per GPU x operation x head x N x strategy (the JSON list of ``--json``).

    ``default`` marks the strategy ``impl="triton"`` runs on CUDA
    (``tokpo_kernels.kernels.strategy.DEFAULT_STRATEGY``); ``fastest`` the one the model predicts
    faster for that case."""
    out: List[Dict[str, Any]] = []
    library = DEFAULT_STRATEGY["cuda"]
    cases = problems(ops, heads, tokens)
    for gpu in gpus:
        assumptions = {f.name: getattr(gpu, f.name) for f in dataclasses.fields(gpu) if f.name != "name"}
        for p in cases:
            group = []
            for strategy in STRATEGIES:
                r = predict(p, strategy, gpu, design)
                if not breakdown:
                    r.pop("breakdown")
                group.append({
                    "op": p.op, "head": p.head, "n": p.n, "dim": p.dim, "vocab": p.vocab, "targets_per_row": p.targets,
                    "dtype": "bf16", "strategy": strategy, "default": strategy == library, "gpu": gpu.name,
                    "flop_model": p.traits.flop_model, "model_flops": p.model_flops, **r,
                    "peak_to_floor": r["peak_extra_bytes"] / r["floor_bytes"],
                    "assumptions": assumptions,
                })
            best = min(group, key=lambda g: g["predicted_ms"])
            for g in group:
                g["fastest"] = g is best
            out += group
    return out


# ---------------------------------------------------------------------------------------------
# Command line

def _parse_value(f: dataclasses.Field, text: str) -> Any:
    """A flag's text as the field's value (tuples as ``128x256,256x128`` or ``8192x8192x8192``)."""
    try:
        if f.name == "gemm_tiles":
            return tuple(tuple(int(x) for x in t.split("x")) for t in text.split(","))
        if f.name == "calibration_gemm":
            return tuple(int(x) for x in text.split("x"))
        if f.type in (int, "int"):
            return int(text)
        return float(text) * f.metadata["scale"]
    except ValueError:
        flag, unit = f.metadata["flag"], f.metadata["unit"]
        raise argparse.ArgumentTypeError(f"{flag}: cannot read {text!r} as {unit}") from None


def _shown(f: dataclasses.Field, v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join("x".join(map(str, t)) for t in v) if isinstance(v[0], tuple) else "x".join(map(str, v))
    scale = f.metadata["scale"]
    return f"{v / scale:g}" if scale != 1 else f"{v:g}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", default=None, help="write the rows as a JSON list to PATH")
    p.add_argument("--gpu", default=",".join(GPUS), help=f"comma list of {list(GPUS)} (default: all)")
    p.add_argument("--ops", default=",".join(MODEL_OPS), help="comma list of operations (default: all modelled)")
    p.add_argument("--heads", default=None, help=f"comma list of {list(tiers.HEADS)} (default: all)")
    p.add_argument("--n", default=None, help=f"comma list of token counts of {list(tiers.CORE_TOKENS)} (default: all)")
    p.add_argument("--breakdown", action="store_true", help="print where the time of each row goes (and keep it "
                                                            "in the JSON)")
    hw = p.add_argument_group("hardware assumptions (each overrides the value for every GPU selected)")
    for f in dataclasses.fields(Gpu):
        if f.name != "name":
            hw.add_argument(f.metadata["flag"], dest=f.name, default=None, metavar=f.metadata["unit"].replace(" ", ""),
                            type=lambda t, f=f: _parse_value(f, t), help=f.metadata["source"])
    d = p.add_argument_group("design")
    d.add_argument("--chunk-budget", type=float, default=None,
                   help=f"chunk buffers as a fraction of the floor (default: the library's, {chunking.DEFAULT_BUDGET})")
    d.add_argument("--stream-tile", default="x".join(map(str, Design.stream_tile)),
                   help="BLOCK_N x BLOCK_V of the fused Triton kernels (default: kernels/configs.py's)")
    d.add_argument("--ignored-fraction", type=float, default=None,
                   help="ignored (prompt) rows as a fraction of all rows, added to the N valid ones (default: the "
                        "case's own, none in the core tier); ignored rows make the launchers copy h compacted")
    d.add_argument("--rebind-overlap", action="store_true",
                   help="what if the backward allocated a new dz buffer per window, and the chunked forward its next "
                        "logit chunk, while the previous one is still referenced (the launchers do not: one dz "
                        "buffer serves every window, each logit chunk is freed before the next GEMM)")
    d.add_argument("--no-inplace-addmm", action="store_true",
                   help="model the dh accumulation through a temporary (gemm.addmm_f32_'s fallback when its "
                        "in-place self-check fails)")
    d.add_argument("--small-kernels", type=int, default=Design.small_kernels,
                   help="O(N) kernels of the op and loss layers per step, one launch gap each")
    d.add_argument("--compaction-launches", type=int, default=Design.compaction_launches,
                   help="kernels that build the valid-row permutation, once per step")
    return p.parse_args(list(argv))


def gpus_from_args(args: argparse.Namespace) -> List[Gpu]:
    """The selected GPUs with every overridden assumption applied."""
    names = [g.strip() for g in args.gpu.split(",") if g.strip()]
    if not names or not set(names) <= set(GPUS):
        raise ValueError(f"--gpu: expected some of {list(GPUS)}, got {args.gpu!r}")
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Gpu)
            if f.name != "name" and getattr(args, f.name, None) is not None}
    return [dataclasses.replace(GPUS[n], **over) for n in names]


def design_from_args(args: argparse.Namespace) -> Design:
    try:
        bn, bv = (int(x) for x in args.stream_tile.split("x"))
    except ValueError:
        raise ValueError(f"--stream-tile: expected BLOCK_NxBLOCK_V, e.g. 128x128, got {args.stream_tile!r}") from None
    if args.chunk_budget is not None and not args.chunk_budget > 0:
        raise ValueError(f"--chunk-budget: expected a positive fraction, got {args.chunk_budget!r}")
    if args.small_kernels < 0 or args.compaction_launches < 0:
        raise ValueError(f"--small-kernels, --compaction-launches: expected counts >= 0, got "
                         f"{args.small_kernels}, {args.compaction_launches}")
    if bn <= 0 or bv <= 0:
        raise ValueError(f"--stream-tile: expected positive sizes, got {args.stream_tile!r}")
    if args.ignored_fraction is not None and not 0 <= args.ignored_fraction < 1:
        raise ValueError(f"--ignored-fraction: expected a fraction in [0, 1), got {args.ignored_fraction!r}")
    return Design(stream_tile=(bn, bv), chunk_budget=args.chunk_budget, ignored_fraction=args.ignored_fraction,
                  rebind_overlap=args.rebind_overlap, inplace_addmm=not args.no_inplace_addmm,
                  compaction_launches=args.compaction_launches, small_kernels=args.small_kernels)


def header(gpus: Sequence[Gpu], design: Design) -> str:
    lines = ["Cost model of one forward+backward step (bf16, no GPU used: a prediction, not a measurement).",
             "Assumptions (override with the flag shown):"]
    for f in dataclasses.fields(Gpu):
        if f.name == "name":
            continue
        vals = " / ".join(f"{g.name} {_shown(f, getattr(g, f.name))}" for g in gpus)
        lines.append(f"  {f.metadata['flag']:<22} {vals} {f.metadata['unit']}  [{f.metadata['source']}]")
    budget = chunking.resolve_budget(design.chunk_budget)
    forced = os.environ.get(chunking.COLUMNS_ENV, "").strip()
    width = f"forced to {forced} columns by ${chunking.COLUMNS_ENV}" if forced else f"budget {budget:g} x floor"
    ignored = ("the case's own ignored rows" if design.ignored_fraction is None
               else f"{design.ignored_fraction:g} of all rows ignored")
    overlap = ("what-if: a new dz window / logit chunk allocated before the previous one is freed"
               if design.rebind_overlap else "one dz buffer for every window, each logit chunk freed before the next")
    lines.append(f"Design: fused Triton tiles {design.stream_tile[0]}x{design.stream_tile[1]}; chunk plan from "
                 f"tokpo_kernels.kernels.chunking.chunk_plan, {width}; {ignored}; "
                 f"{overlap}; "
                 f"dh accumulated {'in place' if design.inplace_addmm else 'through a temporary'}; "
                 f"{design.compaction_launches} compaction and {design.small_kernels} O(N) kernels per step.")
    lines.append("FLOP models (bench/flops.py): " + ", ".join(
        f"{op} {t.flop_model}" for op, t in OP_TRAITS.items()) + ". roofline = model FLOPs / peak / predicted "
        "time; floor = dW (bf16) + fp32 dh accumulator + returned dh.")
    lines.append(f"default: the strategy impl=\"triton\" runs on CUDA ({DEFAULT_STRATEGY['cuda']}); "
                 "*: the one the model predicts faster.")
    return "\n".join(lines)


def table(rs: Sequence[Dict[str, Any]]) -> str:
    cols = ("gpu", "op", "head", "N", "strategy", "fwd C", "sub", "window", "TFLOP", "HBM GB", "L2 GB", "fwd ms",
            "bwd ms", "step ms", "% peak", "% GEMM", "peak GB", "x floor", "")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c not in ("gpu", "op", "head", "strategy", "")
                                                         else "---" for c in cols) + "|"]
    for r in rs:
        mark = ("default" if r["default"] else "") + (" *" if r["fastest"] else "")
        cells = (r["gpu"], r["op"], r["head"], r["n"], r["strategy"], r["forward_columns"] or "-", r["chunk_columns"],
                 r["window_columns"], f"{r['flops'] / 1e12:.1f}",
                 f"{r['hbm_bytes'] / 1e9:.0f}", f"{r['l2_bytes'] / 1e9:.0f}", f"{r['fwd_ms']:.1f}",
                 f"{r['bwd_ms']:.1f}", f"{r['predicted_ms']:.1f}", f"{100 * r['roofline_fraction']:.1f}",
                 f"{100 * r['gemm_rate_fraction']:.1f}", f"{r['peak_extra_bytes'] / 1e9:.2f}",
                 f"{r['peak_to_floor']:.3f}", mark.strip())
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def breakdown_text(r: Dict[str, Any]) -> str:
    fwd = (f"forward {r['forward_chunks']} chunks of {r['forward_columns']}, " if r["forward_columns"] else "")
    lines = [f"{r['gpu']} {r['op']} {r['head']} N={r['n']} {r['strategy']} ({fwd}backward {r['windows']} windows of "
             f"{r['window_columns']} in {r['chunks']} sub-chunks of {r['chunk_columns']}): {r['predicted_ms']:.1f} ms, "
             f"{r['launches']} launches; peak extra {r['peak_extra_bytes'] / 1e9:.2f} GB = {r['peak_to_floor']:.3f} x "
             f"floor, at {r['peak_moment']}"]
    for phase, items in r["breakdown"].items():
        for what, v in sorted(items.items(), key=lambda kv: -kv[1]["seconds"]):
            lines.append(f"  {phase} {what:<62} {1e3 * v['seconds']:8.2f} ms  {v['flops'] / 1e12:7.2f} TFLOP  "
                         f"{v['hbm_bytes'] / 1e9:7.2f} GB HBM  {int(v['launches']):5d} launches")
    return "\n".join(lines)


def summary(rs: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per GPU and operation at the Llama-3-8B head, N = 16384, for the default strategy."""
    out = []
    for r in rs:
        if r["head"] == "llama-3-8b" and r["n"] == 16384 and r["default"] and r["op"] in ("linear_cross_entropy",
                                                                                         "tdpo_loss"):
            out.append(f"{r['gpu']} {r['op']} llama-3-8b N=16384, {r['strategy']} (impl=\"triton\"): "
                       f"{r['predicted_ms']:.1f} ms = {100 * r['roofline_fraction']:.1f} % of the "
                       f"{r['flop_model']} roofline at {r['assumptions']['peak_flops'] / 1e12:.1f} TFLOP/s "
                       f"({100 * r['gemm_rate_fraction']:.1f} % of the {r['assumptions']['gemm_flops'] / 1e12:.0f} "
                       f"TFLOP/s GEMM rate); peak extra memory {r['peak_to_floor']:.3f} x floor")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the model's table (and write ``--json``); returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        gpus, design = gpus_from_args(args), design_from_args(args)
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        heads = [h.strip() for h in args.heads.split(",")] if args.heads else None
        tokens = [int(n) for n in args.n.split(",")] if args.n else None
        rs = rows(gpus, design, ops, heads, tokens, breakdown=args.breakdown)
    except ValueError as e:
        print(f"python -m bench.model: {e}", file=sys.stderr)
        return 2
    print(header(gpus, design))
    print()
    print(table(rs))
    if args.breakdown:
        for r in rs:
            print()
            print(breakdown_text(r))
    lines = summary(rs)
    if lines:
        print()
        print("\n".join(lines))
    other = defaultdict(list)
    for r in rs:
        if r["fastest"] and not r["default"]:
            other[r["gpu"]].append(f"{r['op']} {r['head']} N={r['n']} ({r['strategy']})")
    if other:
        print("\nWhere the model predicts the other strategy faster than the default:")
        for gpu, where in other.items():
            print(f"  {gpu}: " + "; ".join(where))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rs, f, indent=1, default=_json_default)
            f.write("\n")
        print(f"\nwrote {len(rs)} rows to {args.json}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
