"""Shared pieces of the pytest-benchmark suites (``bench/test_bench_*.py``): which parameters a
tier gives, and one timed measurement with its metadata in ``benchmark.extra_info``."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from bench.registry import DTYPES, Case, Unavailable, get_operation
from bench.tiers import GPU_ONLY, cases, tier_device


def case_params(config: pytest.Config, ops: List[str]) -> List[Any]:
    """``(case, impl)`` parameters of the selected tier for the given operations, or one skipped
    parameter saying why the tier cannot run here."""
    # The plugin, not the import, decides: pytest-benchmark installed but disabled
    # (-p no:benchmark) leaves the module importable and the ``benchmark`` fixture missing.
    if not config.pluginmanager.hasplugin("benchmark"):
        return [pytest.param(None, None, id="no-pytest-benchmark", marks=pytest.mark.skip(
            reason="pytest-benchmark is not installed (pip install pytest-benchmark) or is disabled"))]
    tier = config.getoption("--tier")
    if tier in GPU_ONLY and tier_device(tier) != "cuda":
        return [pytest.param(None, None, id=f"{tier}-needs-cuda",
                             marks=pytest.mark.skip(reason=f"tier {tier} needs a CUDA device"))]
    out = []
    for case in cases(tier, ops):
        for impl in get_operation(case.op).impls:
            out.append(pytest.param(case, impl, id=f"{case.key}-{impl}"))
    return out


def run_benchmark(benchmark: Any, bench_env: Dict[str, Any], case: Case, impl: str, phase: str) -> None:
    """Time ``phase`` ("fwd" or "fwd_bwd") of one (case, impl) and record what it was measured on."""
    device = torch.device(bench_env["device"])
    op = get_operation(case.op)
    missing = op.impls[impl].missing()
    if missing:
        pytest.skip(f"not installed: {missing}")
    try:
        built = op.impls[impl].build(case.shape, DTYPES[case.dtype], device)
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
        operation=case.op, impl=impl, phase=phase, shape=case.shape.to_dict(), dtype=case.dtype,
        device=bench_env["device"], device_name=bench_env["device_name"], model_flops=flops,
        torch=bench_env["torch"], triton=bench_env["triton"], python=bench_env["python"],
        commit=bench_env["commit"], dirty=bench_env["dirty"], inputs=built.extra,
    )
    rounds = 20 if device.type == "cuda" else 5
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        median_s = stats.stats.median
        benchmark.extra_info["median_ms"] = median_s * 1e3
        benchmark.extra_info["tflops"] = flops / median_s / 1e12
