"""pytest-benchmark suite of the mean forward KL(ref || policy) (``forward_kl``; peer: Liger's JSD loss with beta = 0).

    pytest bench/test_bench_forward_kl.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["forward_kl"]
