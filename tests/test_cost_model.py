"""The cost model of ``python -m bench --model`` (``bench/model.py``): its rows, its overridable
assumptions, one row recomputed by hand, and the library's default strategy agreeing with it.

No GPU: the model is arithmetic on shapes (two tests run a tiny step of each strategy under the
Triton interpreter, to record the chunk-plan arguments the launchers use and the kernels they
launch). The chunk-width and split environment variables are cleared in every test, since the
model sizes chunks with the same function (and variables) as the launchers.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from bench import model, tiers
from bench.registry import get_operation
from tokpo_kernels.backends import unavailable_reason
from tokpo_kernels.kernels import backward_chunks, chunking, configs, launch
from tokpo_kernels.kernels.forward_stats import NUM_PARTIALS
from tokpo_kernels.kernels.strategy import DEFAULT_STRATEGY

REPO = Path(__file__).resolve().parent.parent
LLAMA = "llama-3-8b"
# Each hardware assumption with an override that must change some output of the Llama-3-8B rows at
# N = 16384 (the time, or for the peak the roofline fraction).
OVERRIDES = {
    "peak_flops": "1200",
    "gemm_flops": "600",
    "triton_efficiency": "0.3",
    "hbm_bytes_per_s": "2",
    "hbm_efficiency": "0.5",
    "l2_bytes_per_s": "3",
    "l2_bytes": "10",
    "l2_reuse_fraction": "0",
    "sms": "100",
    "launch_s": "20",
    "sync_s": "5000",
    "gemm_tiles": "256x256",
    "split_k_max": "1",
    "calibration_gemm": "1024x1024x1024",
}


@pytest.fixture(autouse=True)
def _default_chunking(monkeypatch):
    monkeypatch.delenv(chunking.BUDGET_ENV, raising=False)
    monkeypatch.delenv(chunking.COLUMNS_ENV, raising=False)
    monkeypatch.delenv("TOKPO_FORWARD_SPLITS", raising=False)


def _llama(op: str, n: int = 16384) -> model.Problem:
    (p,) = model.problems([op], [LLAMA], [n])
    return p


@pytest.mark.parametrize("gpu", list(model.GPUS))
@pytest.mark.parametrize("op", ["linear_cross_entropy", "tdpo_loss"])
def test_default_strategy_is_the_predicted_faster_one(gpu, op):
    """``impl="triton"``'s CUDA strategy is the one the model predicts faster at the Llama-3-8B head,
    N = 16384, on both GPUs (until a GPU measurement replaces the prediction)."""
    p = _llama(op)
    times = {s: model.predict(p, s, model.GPUS[gpu])["predicted_ms"] for s in model.STRATEGIES}
    assert min(times, key=times.get) == DEFAULT_STRATEGY["cuda"], times


def test_json_rows_cover_every_case_with_the_documented_keys(tmp_path):
    out = tmp_path / "model.json"
    assert model.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    types = {"op": str, "head": str, "n": int, "strategy": str, "default": bool, "gpu": str,
             "predicted_ms": float, "roofline_fraction": float, "peak_extra_bytes": int, "floor_bytes": int}
    for r in rows:
        for key, kind in types.items():
            assert type(r[key]) is kind, (key, r[key])
    got = [(r["gpu"], r["op"], r["head"], r["n"], r["strategy"]) for r in rows]
    want = list(itertools.product(model.GPUS, model.MODEL_OPS, tiers.HEADS, tiers.CORE_TOKENS, model.STRATEGIES))
    assert sorted(got) == sorted(want)
    assert {r["gpu"] for r in rows} == {"H100", "H200"}
    assert set(model.MODEL_OPS) <= set(tiers.OPS)
    # impl="triton" runs one strategy per case; "fastest" marks exactly one per case too.
    for key in {g[:4] for g in got}:
        group = [r for r in rows if (r["gpu"], r["op"], r["head"], r["n"]) == key]
        assert [r["strategy"] for r in group if r["default"]] == [DEFAULT_STRATEGY["cuda"]]
        assert sum(r["fastest"] for r in group) == 1
        fastest = min(group, key=lambda r: r["predicted_ms"])
        assert fastest["fastest"]


def test_roofline_fraction_is_a_fraction_of_the_model_flops():
    for r in model.rows(model.GPUS.values()):
        assert 0 < r["roofline_fraction"] <= 1, r
        peak = r["assumptions"]["peak_flops"]
        assert math.isclose(r["roofline_fraction"], r["model_flops"] / peak / (r["predicted_ms"] / 1e3))
        # A step can beat neither the tensor peak nor the measured GEMM rate on its FLOPs.
        assert r["gemm_rate_fraction"] <= 1


def test_every_hardware_assumption_is_a_flag_with_a_source():
    fields = [f for f in dataclasses.fields(model.Gpu) if f.name != "name"]
    assert {f.name for f in fields} == set(OVERRIDES)
    for f in fields:
        assert f.metadata["flag"].startswith("--") and f.metadata["source"], f.name


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_each_override_reaches_the_prediction(name):
    f = next(f for f in dataclasses.fields(model.Gpu) if f.name == name)
    base = model.gpus_from_args(model.parse_args(["--gpu", "H100"]))[0]
    (gpu,) = model.gpus_from_args(model.parse_args(["--gpu", "H100", f.metadata["flag"], OVERRIDES[name]]))
    assert getattr(gpu, name) != getattr(base, name)
    assert dataclasses.replace(gpu, **{name: getattr(base, name)}) == base  # nothing else moved
    before = model.rows([base], heads=[LLAMA], tokens=[16384])
    after = model.rows([gpu], heads=[LLAMA], tokens=[16384])
    assert all(a["assumptions"][name] == getattr(gpu, name) for a in after)
    assert any((a["predicted_ms"], a["roofline_fraction"]) != (b["predicted_ms"], b["roofline_fraction"])
               for a, b in zip(after, before, strict=True)), name


def test_gemm_rate_override_scales_the_gemm_time():
    """At the calibration shape a GEMM runs at exactly the stated rate; halving the rate doubles the
    time of a compute-bound GEMM (a forward logit chunk at the Llama-3-8B head), and a step's
    predicted time grows by exactly what its GEMMs grow, nothing else moving."""
    gpu = model.GPUS["H100"]
    half = dataclasses.replace(gpu, gemm_flops=gpu.gemm_flops / 2)
    m, n, k = gpu.calibration_gemm
    assert math.isclose(model.gemm(gpu, m, n, k).seconds, 2 * m * n * k / gpu.gemm_flops)
    assert math.isclose(model.gemm(gpu, 16384, 1024, 4096).seconds, 2 * 16384 * 1024 * 4096 / gpu.gemm_flops)
    assert math.isclose(model.gemm(half, 16384, 1024, 4096).seconds, 2 * model.gemm(gpu, 16384, 1024, 4096).seconds)
    for op, strategy in itertools.product(("linear_cross_entropy", "tdpo_loss"), model.STRATEGIES):
        a = model.predict(_llama(op), strategy, gpu)
        b = model.predict(_llama(op), strategy, half)
        grown = 0.0
        for phase in ("fwd", "bwd"):
            assert a["breakdown"][phase].keys() == b["breakdown"][phase].keys()
            for what, ta in a["breakdown"][phase].items():
                tb = b["breakdown"][phase][what]
                if "cuBLAS" in what:
                    assert tb["seconds"] > ta["seconds"], what
                    grown += tb["seconds"] - ta["seconds"]
                else:
                    assert tb == ta, what
        assert grown > 0
        assert math.isclose(b["predicted_ms"] - a["predicted_ms"], 1e3 * grown)


def test_one_row_by_hand():
    """Cross-entropy, chunked, Llama-3-8B head, N = 16384 on the H100, with no split-K and no L2 reuse
    so that every byte is counted once: chunk plan, FLOPs, HBM bytes, launches, floor and peak,
    recomputed here from the design's description (chunking.py's docstrings,
    docs/performance-model.md), not from the model's code."""
    N, D, V, J = 16384, 4096, 128256, 1
    gpu = dataclasses.replace(model.GPUS["H100"], split_k_max=1, l2_reuse_fraction=0.0)
    r = model.predict(_llama("linear_cross_entropy"), "chunked", gpu)

    # The plan: the allowance is 10 % of the floor plus the returned dh's room (no row is ignored,
    # and copies would not be charged anyway); the forward's fp32 chunk takes all of it. Backward:
    # a sub-chunk column costs its fp32 logits and its fp32 dW rows (no bias: no db partials), a
    # window column its bf16 dz. The widest sub-chunk with a window as wide beside it is 2437
    # columns >= MIN_WINDOW = 2048, so sub = window = 2432 (whole 128-column quanta); the window
    # then gets the rest in whole sub-chunks: 2451 columns, one sub-chunk.
    floor = V * D * 2 + N * D * (4 + 2)
    allowed = 0.10 * floor + N * D * 2
    fwd_c = int(allowed / (N * 4)) // 128 * 128
    sub_cost, window_cost = N * 4 + D * 4, N * 2
    assert allowed / (sub_cost + window_cost) >= chunking.MIN_WINDOW
    sub = int(allowed / (sub_cost + window_cost)) // 128 * 128
    window = int((allowed - sub * sub_cost) / window_cost) // sub * sub
    assert (fwd_c, sub, window) == (4224, 2432, 2432)
    assert (r["forward_columns"], r["chunk_columns"], r["window_columns"]) == (fwd_c, sub, window)
    assert r["floor_bytes"] == floor

    assert r["flops"] == 8 * N * D * V + 2 * N * J * D  # four N·D·V products and the target dot

    forward = [fwd_c] * (V // fwd_c) + [V % fwd_c]  # 30 chunks of 4224, one of 1536
    windows = [window] * (V // window) + [V % window]  # 52 windows of 2432, one of 1792
    state = 4 * N * 4  # running max, sum-exp, entropy, logit sum (fp32)
    planes = NUM_PARTIALS * N * 4  # the whole running state, zeroed once
    hbm = N * J * D * 2 + N * D * 2 + N * J * 8 + N * J * 4  # target logits: W rows, h rows, int64 ids; fp32 out
    hbm += planes  # running-state init
    for w in forward:
        hbm += N * D * 2 + w * D * 2 + N * w * 4  # GEMM: h, W_c, fp32 z
        hbm += N * w * 4 + 2 * state  # row statistics pass
    hbm += 2 * state  # merge of the running state
    hbm += N  # the backward's row_valid.sum() (bool rows)
    hbm += N * D * 4  # zero-fill of the fp32 dh accumulator
    subs = 0
    for width in windows:
        for w in [sub] * (width // sub) + ([width % sub] if width % sub else []):
            subs += 1
            hbm += N * D * 2 + w * D * 2 + N * w * 4  # recompute GEMM
            hbm += N * w * 4 + 8 * N * 4 + N * w * 2  # dz pass: z and the per-row inputs in, bf16 dz out
            hbm += w * N * 2 + N * D * 2 + w * D * 4  # dW GEMM, fp32 out
            hbm += w * D * 4 + w * D * 2  # copy into the bf16 dW rows
        hbm += N * width * 2 + width * D * 2 + 2 * N * D * 4  # dh GEMM reads and writes the fp32 accumulator
    hbm += N * D * 4 + N * D * 2  # returned dh
    assert r["hbm_bytes"] == hbm
    assert (len(forward), subs, len(windows)) == (r["forward_chunks"], r["chunks"], r["windows"]) == (31, 53, 53)
    # Forward: compaction 4, target 1, state init 3 (zeros, the index list's copy, index_put), 2 per
    # chunk, merge 1, O(N) 20. Backward: the row-count sum 1, zero-fill 1, 4 per sub-chunk (recompute,
    # dz, dW GEMM, its copy), 1 per window, dh cast 1, O(N) 20.
    assert r["launches"] == (4 + 1 + 3 + 2 * len(forward) + 1 + 20) + (1 + 1 + 4 * subs + len(windows) + 1 + 20)

    # Peak: dW, the fp32 accumulator, the one dz buffer (a window wide) and a sub-chunk's fp32
    # logits, which beat the dW GEMM's fp32 output and the end of the backward (the floor).
    assert N * sub * 4 > sub * D * 4 and N * window * 2 + N * sub * 4 > N * D * 2
    assert r["peak_extra_bytes"] == V * D * 2 + N * D * 4 + N * window * 2 + N * sub * 4 + 16 * N * 4
    assert r["peak_moment"] == "backward: sub-chunk logits"
    assert r["returned_grad_bytes"] == (V + N) * D * 2


def test_op_traits_match_the_bench_flop_models():
    for op in model.MODEL_OPS:
        p = _llama(op)
        traits = model.OP_TRAITS[op]
        ndv = p.n * p.dim * p.vocab
        assert p.model_flops == int(traits.flop_model.removesuffix("NDV")) * ndv, op
        assert p.model_flops == (8 + 2 * traits.reference + 2 * traits.kl_grad) * ndv, op
    assert _llama("tlpo_loss").targets == tiers.TLPO_CANDIDATES


@pytest.mark.parametrize("argv, needle", [
    (["--gpu", "A100"], "--gpu"),
    (["--ops", "ppo_loss"], "ops"),
    (["--heads", "llama3-8b"], "heads"),
    (["--hbm-efficiency", "1.5"], "hbm_efficiency"),
    (["--gemm-tflops", "1000"], "gemm_flops"),
    (["--sms", "0"], "sms"),
    (["--ignored-fraction", "1"], "--ignored-fraction"),
])
def test_bad_arguments_are_refused_by_name(argv, needle, capsys):
    assert model.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unreadable_override_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        model.parse_args(["--gemm-tiles", "128by256"])
    assert "--gemm-tiles" in capsys.readouterr().err


def test_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "bench.model", "--gpu", "H200", "--ops", "tdpo_loss", "--heads", LLAMA, "--n", "16384"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "| H200 | tdpo_loss | llama-3-8b | 16384 | chunked |" in out
    assert "--gemm-tflops" in out and "spec" in out  # the assumptions and their sources are printed


def _plan_calls(calls):
    """The recorded chunk_plan calls, dtype sizes left out (the tiny step runs fp32, the model bf16),
    each once in first-call order (a bench build runs the step more than once)."""
    out = []
    for args, kwargs in calls:
        key = (args, tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("in_bytes", "weight_bytes"))))
        if key not in out:
            out.append(key)
    return out


def _tiny_shapes():
    for case in tiers.tiny_cases(list(model.MODEL_OPS)):
        yield pytest.param(case.op, case.shape, id=f"{case.op}-ignored{case.shape.tokens - case.shape.valid_tokens}")
    (tdpo,) = tiers.tiny_cases(["tdpo_loss"])
    yield pytest.param("tdpo_loss", dataclasses.replace(tdpo.shape, ignored_prefix=0), id="tdpo_loss-ignored0")


@pytest.mark.triton
@pytest.mark.parametrize("strategy", model.STRATEGIES)
@pytest.mark.parametrize("op, shape", list(_tiny_shapes()))
def test_chunk_plans_are_asked_as_the_launchers_ask(op, shape, strategy, monkeypatch):
    """The model calls ``chunk_plan`` with the arguments the launchers pass (strategy, valid rows,
    head, reference, KL gradient, bias, budget), with and without ignored rows: recorded from one tiny
    fp32 step of the strategy's backend (under the Triton interpreter on CPU)."""
    impl = f"triton_{strategy}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason(impl, device)
    if reason:
        pytest.skip(reason)
    real = chunking.chunk_plan
    ran, asked = [], []

    def recorder(calls):
        return lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1]

    monkeypatch.setattr(launch, "chunk_plan", recorder(ran))
    monkeypatch.setattr(backward_chunks, "chunk_plan", recorder(ran))
    get_operation(op).impls[impl].build(shape, torch.float32, torch.device(device)).fwd_bwd()
    monkeypatch.setattr(chunking, "chunk_plan", recorder(asked))
    problem = model.Problem(op, "tiny", shape.valid_tokens, shape.dim, shape.vocab, shape.candidates or 1, 0.0,
                            ignored=shape.tokens - shape.valid_tokens)
    model.plans(problem, strategy)
    assert ran and _plan_calls(asked) == _plan_calls(ran)


def _copies(x, idx, n):
    """Whether ``compact_rows`` / ``expand_rows`` copy (rather than return ``x`` itself)."""
    return x is not None and idx.shape[0] != n


# The model's kernel items and the launcher function whose every call (or every copying call) is
# one launch of the item. mm_into is one fp32 GEMM and, for bf16, its copy into the dW rows;
# expand_rows one zeroed buffer and one index_copy_.
_KERNELS = (
    ("target logits (gathered dot)", (launch, "launch_target_logits"), None),
    ("fused forward statistics (Triton)", (launch, "launch_forward_stats"), None),
    ("logit GEMM z = h W_c^T (cuBLAS, fp32 out)", (launch, "mm_f32"), None),
    ("row statistics pass (reads z)", (launch, "launch_row_stats"), None),
    ("fwd compacted copy of h (index_select)", (launch, "compact_rows"), _copies),
    ("scatter of the statistics: zeroed rows", (launch, "expand_rows"), _copies),
    ("scatter of the statistics: valid rows copied in", (launch, "expand_rows"), _copies),
    ("bwd compacted copy of h (index_select)", (backward_chunks, "compact_rows"), _copies),
    ("logit recompute GEMM (cuBLAS, fp32 out)", (backward_chunks, "mm_f32"), None),
    ("dz pass (reads z, writes bf16 dz into the window)", (backward_chunks, "launch_dz_from_logits"), None),
    ("fused recompute + dz kernel (Triton)", (backward_chunks, "launch_dz_recompute"), None),
    ("dW_sub = dz_sub^T h GEMM (cuBLAS, fp32 out)", (backward_chunks, "mm_into"), None),
    ("cast of dW_sub into the bf16 dW rows", (backward_chunks, "mm_into"), None),
    ("dh_acc += dz_window W_window GEMM (cuBLAS, fp32 accumulate)", (backward_chunks, "addmm_f32_"), None),
    ("scatter of dh: zeroed fp32 dh of all rows", (backward_chunks, "expand_rows"), _copies),
    ("scatter of dh: valid rows copied in (index_copy_)", (backward_chunks, "expand_rows"), _copies),
)


@pytest.mark.triton
@pytest.mark.parametrize("strategy", model.STRATEGIES)
@pytest.mark.parametrize("op, shape", list(_tiny_shapes()))
def test_kernel_counts_follow_the_launchers(op, shape, strategy, monkeypatch):
    """Every large kernel the model charges is one the launchers run, as many times: recorded from
    one tiny fp32 step of the strategy's backend (Triton interpreter on CPU), at 24-column chunks
    of a 64-column vocabulary (forward chunks 24, 24, 16; ∂h windows of 48 then 16 columns, cut
    into sub-chunks 24, 24 | 16), so that remainders and several windows are crossed; with ignored
    rows, the compacted copies and the scatters too. (The GEMM count is the model's with split-K
    off; mm_into is one fp32 GEMM and, for bf16, its copy into the dW rows.)"""
    impl = f"triton_{strategy}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason(impl, device)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(chunking.COLUMNS_ENV, "24")
    built = get_operation(op).impls[impl].build(shape, torch.float32, torch.device(device))
    ran = collections.Counter()

    for what, (module, name), when in _KERNELS:
        real = getattr(module, name)

        def wrapper(*a, _real=real, _what=what, _when=when, **k):
            if _when is None or _when(*a):
                ran[_what] += 1
            return _real(*a, **k)

        # Two items count mm_into (and expand_rows): their wrappers chain, each counting its own item.
        monkeypatch.setattr(module, name, wrapper)
    built.fwd_bwd()

    problem = model.Problem(op, "tiny", shape.valid_tokens, shape.dim, shape.vocab, shape.candidates or 1, 0.0,
                            ignored=shape.tokens - shape.valid_tokens)
    r = model.predict(problem, strategy, dataclasses.replace(model.GPUS["H100"], split_k_max=1))
    tracked = {what for what, _, _ in _KERNELS}
    charged = collections.Counter()
    for phase, items in r["breakdown"].items():
        for what, v in items.items():
            key = f"{phase} {what}" if what == "compacted copy of h (index_select)" else what
            if key in tracked:
                charged[key] = int(v["launches"])
    assert ran and +charged == +ran  # (+: entries of 0 dropped)
    assert (r["forward_chunks"] or 0, r["chunks"], r["windows"]) == ((3 if strategy == "chunked" else 0), 3, 2)


def test_peak_stays_within_the_budget():
    """chunking's guarantee, on the model's account of the buffers the launchers allocate: with no
    ignored rows, the chunk buffers stay within the allowance and the peak within (1 + budget) x
    floor plus the O(N) saved rows, at every core case."""
    for p in model.problems():
        for s in model.STRATEGIES:
            m = model.memory(p, s)
            assert m["chunk_bytes"] <= m["allowance_bytes"], (p, s)
            assert m["peak_extra_bytes"] <= (1 + chunking.DEFAULT_BUDGET) * m["floor_bytes"] + \
                model.SAVED_ROW_BYTES * p.n, (p, s)


def test_one_dz_buffer_serves_every_window():
    """backward_chunks.py allocates one dz buffer, a window wide, for the whole loop: the streaming
    peak at the Llama-3-8B head, N = 16384 is dW + the fp32 accumulator + one window + the dW GEMM's
    fp32 output of one sub-chunk. The what-if of a new buffer per window (``--rebind-overlap``,
    allocated while the previous one is referenced) holds two windows at that moment instead."""
    p = _llama("linear_cross_entropy")
    plan = model.plans(p, "streaming").backward
    assert model.Design().rebind_overlap is False
    m = model.memory(p, "streaming")
    dz = p.n * plan.window * 2
    base = p.vocab * p.dim * 2 + p.n * p.dim * 4
    assert m["peak_moment"] == "backward: dW GEMM output"
    assert m["peak_extra_bytes"] == base + dz + plan.sub * p.dim * 4 + model.SAVED_ROW_BYTES * p.n
    what_if = model.memory(p, "streaming", model.Design(rebind_overlap=True))
    assert what_if["peak_moment"] == "backward: next dz window allocated"
    assert what_if["peak_extra_bytes"] == base + 2 * dz + model.SAVED_ROW_BYTES * p.n > m["peak_extra_bytes"]


@pytest.mark.parametrize("op, strategy, forward_copies, backward_copies", [
    ("linear_cross_entropy", "chunked", 1, 1),
    ("linear_cross_entropy", "streaming", 0, 1),
    ("tdpo_loss", "chunked", 2, 2),
    ("tdpo_loss", "streaming", 0, 1),
    ("dpo_loss", "chunked", 2, 1),
])
def test_ignored_rows_add_copies_on_top_of_the_budget(op, strategy, forward_copies, backward_copies):
    """With ignored rows the launchers copy h compacted (the chunked forward: h and the reference's
    h; the backward: h, and the reference's for the chunked strategy's KL recompute) and scatter
    dh back to all rows; the copies come on top of the budget: the chunk plan is the one without
    ignored rows, and the peak of the backward loop grows by exactly the backward's copies. With
    none (the core tier), no copy and no scatter."""
    p = _llama(op)
    gpu = model.GPUS["H100"]
    plain = model.predict(p, strategy, gpu)
    assert plain["ignored_rows"] == 0 and plain["row_copy_bytes"] == 0
    assert not any("copy of h" in k or "scatter" in k for phase in plain["breakdown"].values() for k in phase)
    design = model.Design(ignored_fraction=0.25)
    r = model.predict(p, strategy, gpu, design)
    rows = p.n * p.dim * 2
    ignored = round(p.n / 3)
    assert r["ignored_rows"] == ignored
    assert r["row_copy_bytes"] == max(forward_copies, backward_copies) * rows
    for phase, copies in (("fwd", forward_copies), ("bwd", backward_copies)):
        got = r["breakdown"][phase].get("compacted copy of h (index_select)", {"hbm_bytes": 0, "launches": 0})
        assert (got["hbm_bytes"], got["launches"]) == (2 * rows * copies, copies), phase
    assert {"scatter of dh: zeroed fp32 dh of all rows", "scatter of dh: valid rows copied in (index_copy_)"} \
        <= set(r["breakdown"]["bwd"])
    traits = model.OP_TRAITS[op]
    want = chunking.chunk_plan(strategy, p.n, p.vocab, p.dim, in_bytes=2, weight_bytes=2, has_ref=traits.reference,
                               kl_grad=traits.kl_grad, has_bias=False)
    assert model.plans(p, strategy, design).backward == model.plans(p, strategy).backward == want
    assert r["peak_moment"] == plain["peak_moment"] and r["peak_moment"].startswith("backward:")
    assert r["peak_extra_bytes"] == plain["peak_extra_bytes"] + backward_copies * rows + \
        model.SAVED_ROW_BYTES * ignored
    assert r["predicted_ms"] > plain["predicted_ms"]


def test_forward_splits_follow_the_library(monkeypatch):
    """The streaming forward's split count is configs.forward_splits on a GPU of ``gpu.sms`` SMs."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=model.GPUS["H100"].sms))
    cfg = configs.cuda_config("fwd", torch.bfloat16)
    assert model.Design().stream_tile == (cfg.block_n, cfg.block_v)
    for n, v in ((4096, 128256), (16384, 256000), (65536, 152064), (128, 32000), (16, 512)):
        want = configs.forward_splits(n, v, cfg, torch.device("cuda"))
        assert model.forward_splits(model.GPUS["H100"], n, v) == want, (n, v)
