"""pytest-benchmark suite of ``tk.ppo_loss`` (``loss_type="grpo"``; peer: Liger's ``LigerFusedLinearGRPOLoss``).

    pytest bench/test_bench_ppo_loss.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from __future__ import annotations

import pytest

from bench._pytest_helpers import PHASES, generate, run_benchmark, run_interpreted

OPS = ["ppo_loss"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    generate(metafunc, OPS)


@pytest.mark.parametrize("phase", PHASES)
def test_benchmark(benchmark, bench_env, case, impl, phase):
    run_benchmark(benchmark, bench_env, case, impl, phase)


def test_triton_interpreted(tiny_case, record_property):
    run_interpreted(tiny_case, record_property)
