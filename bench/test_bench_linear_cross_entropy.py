"""pytest-benchmark suite of ``tk.linear_cross_entropy`` (peers: PyTorch's ``linear_cross_entropy``,
Liger's fused linear CE, Cut Cross-Entropy).

    pytest bench/test_bench_linear_cross_entropy.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["linear_cross_entropy"]
