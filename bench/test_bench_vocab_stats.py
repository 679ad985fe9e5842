"""pytest-benchmark suite of ``linear_vocab_stats`` (with reference + KL, and without reference).

    pytest bench/ --tier cpu                    # add --benchmark-json=out.json to keep results
"""

from __future__ import annotations

import pytest

from bench._pytest_helpers import case_params, run_benchmark

OPS = ["vocab_stats_kl", "vocab_stats"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"case", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("case", "impl"), case_params(metafunc.config, OPS))


@pytest.mark.parametrize("phase", ["fwd", "fwd_bwd"])
def test_linear_vocab_stats(benchmark, bench_env, case, impl, phase):
    run_benchmark(benchmark, bench_env, case, impl, phase)
