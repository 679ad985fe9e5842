"""Shared pieces of the pytest-benchmark suites (``bench/test_bench_<op>.py``): which parameters a
tier gives, one timed measurement with its metadata in ``benchmark.extra_info``, and the
interpreted-Triton smoke case. Each suite module only names its operations."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import pytest
import torch

from bench.ops._common import interpreted_impls
from bench.registry import DTYPES, Case, Unavailable, get_operation
from bench.runner import spawn_worker
from bench.tiers import GPU_ONLY, cases, tier_device, tiny_cases

PHASES = ("fwd", "fwd_bwd")
INTERPRETER_TIMEOUT_S = 300.0


def _tier(config: pytest.Config) -> str:
    return config.getoption("--tier")


def case_params(config: pytest.Config, ops: Sequence[str]) -> List[Any]:
    """``(case, impl)`` parameters of the selected tier for the given operations, or one skipped
    parameter saying why the tier cannot run here."""
    # The plugin, not the import, decides: pytest-benchmark installed but disabled
    # (-p no:benchmark) leaves the module importable and the ``benchmark`` fixture missing.
    if not config.pluginmanager.hasplugin("benchmark"):
        return [pytest.param(None, None, id="no-pytest-benchmark", marks=pytest.mark.skip(
            reason="pytest-benchmark is not installed (pip install pytest-benchmark) or is disabled"))]
    tier = _tier(config)
    if tier in GPU_ONLY and tier_device(tier) != "cuda":
        return [pytest.param(None, None, id=f"{tier}-needs-cuda",
                             marks=pytest.mark.skip(reason=f"tier {tier} needs a CUDA device"))]
    return [pytest.param(case, impl, id=f"{case.key}-{impl}")
            for case in cases(tier, ops) for impl in get_operation(case.op).impls]


def tiny_params(config: pytest.Config, ops: Sequence[str]) -> List[Any]:
    """The interpreted-Triton smoke cases: only where the tier runs on CPU (on CUDA the benchmark
    rows run the real kernels)."""
    if tier_device(_tier(config)) == "cuda":
        return [pytest.param(None, id="on-cuda", marks=pytest.mark.skip(
            reason="CUDA present: the Triton impl is benchmarked natively, not interpreted"))]
    return [pytest.param(case, id=f"{case.op}-tiny") for case in tiny_cases(ops)]


def generate(metafunc: pytest.Metafunc, ops: Sequence[str]) -> None:
    """``pytest_generate_tests`` of a suite module for ``ops``."""
    if {"case", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("case", "impl"), case_params(metafunc.config, ops))
    if "tiny_case" in metafunc.fixturenames:
        metafunc.parametrize("tiny_case", tiny_params(metafunc.config, ops))


def run_benchmark(benchmark: Any, bench_env: Dict[str, Any], case: Case, impl_name: str, phase: str) -> None:
    """Time ``phase`` ("fwd" or "fwd_bwd") of one (case, impl) and record what it was measured on."""
    device = torch.device(bench_env["device"])
    op = get_operation(case.op)
    impl = op.impls[impl_name]
    missing = impl.missing()
    if missing:
        pytest.skip(f"not installed: {missing}")
    elsewhere = impl.unavailable_on(str(device))
    if elsewhere:
        pytest.skip(f"unavailable: {elsewhere}")
    try:
        built = impl.build(case.shape, DTYPES[case.dtype], device)
    except Unavailable as exc:
        pytest.skip(f"unavailable: {exc}")
    step = built.fwd if phase == "fwd" else built.fwd_bwd
    if device.type == "cuda":
        def fn() -> None:
            step()
            torch.cuda.synchronize(device)  # time the GPU work, not the launch
    else:
        fn = step
    flops = op.flops(case.shape)[phase]
    benchmark.group = f"{case.key} {phase}"  # impls of one case/phase are compared side by side
    benchmark.extra_info.update(
        operation=case.op, impl=impl_name, impl_note=impl.note, phase=phase, shape=case.shape.to_dict(),
        dtype=case.dtype, device=bench_env["device"], device_name=bench_env["device_name"], model_flops=flops,
        torch=bench_env["torch"], triton=bench_env["triton"], python=bench_env["python"],
        tokpo_kernels=bench_env["tokpo_kernels"], peers=bench_env["peers"],
        commit=bench_env["commit"], dirty=bench_env["dirty"], inputs=built.extra,
    )
    rounds = 20 if device.type == "cuda" else 3
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        benchmark.extra_info["median_ms"] = median_s * 1e3
        benchmark.extra_info["tflops"] = flops / median_s / 1e12


def run_interpreted(case: Case, record_property: Any) -> None:
    """Run every impl that needs the Triton interpreter on CPU (``interpreted_impls``) on a tiny
    case under ``TRITON_INTERPRET=1`` in a fresh process (the variable is read when Triton kernels
    are defined, so it cannot be switched on in this one) and check its result against the
    operation's baseline impl. Its time is recorded but means little: the interpreter executes
    kernels op by op in NumPy."""
    impls = interpreted_impls()
    if not impls:
        pytest.skip("no registered backend runs in the Triton interpreter here (is triton installed?)")
    op = get_operation(case.op)
    base = op.impls[op.baseline].build(case.shape, DTYPES[case.dtype], torch.device("cpu"))
    expected = base.summary(base.fwd())
    for impl in impls:
        spec = {"op": case.op, "impl": impl, "shape": case.shape.to_dict(), "dtype": case.dtype, "device": "cpu",
                "reps": 2, "warmup": 1, "mode": "time"}
        res = spawn_worker(spec, INTERPRETER_TIMEOUT_S, {"TRITON_INTERPRET": "1"})
        assert res["status"] == "ok", f"interpreted {impl} failed: {res.get('reason')}\n{res.get('traceback', '')}"
        for key, value in expected.items():
            assert res["summary"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{impl} {key}"
        record_property(f"interpreted_{impl}_fwd_bwd_ms", res["fwd_bwd_ms"])


# The two tests every ``test_bench_<op>.py`` module runs: a module imports them and declares its
# ``OPS``; ``bench/conftest.py`` parametrises them per module.
@pytest.mark.parametrize("phase", PHASES)
def test_benchmark(benchmark, bench_env, case, impl, phase):
    run_benchmark(benchmark, bench_env, case, impl, phase)


def test_triton_interpreted(tiny_case, record_property):
    run_interpreted(tiny_case, record_property)
