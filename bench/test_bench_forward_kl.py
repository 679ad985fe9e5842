"""pytest-benchmark suite of the mean forward KL(ref || policy) (``forward_kl``; peer: Liger's JSD loss with beta = 0).

    pytest bench/test_bench_forward_kl.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from __future__ import annotations

import pytest

from bench._pytest_helpers import PHASES, generate, run_benchmark, run_interpreted

OPS = ["forward_kl"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    generate(metafunc, OPS)


@pytest.mark.parametrize("phase", PHASES)
def test_benchmark(benchmark, bench_env, case, impl, phase):
    run_benchmark(benchmark, bench_env, case, impl, phase)


def test_triton_interpreted(tiny_case, record_property):
    run_interpreted(tiny_case, record_property)
