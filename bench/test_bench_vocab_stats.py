"""pytest-benchmark suite of ``tk.linear_vocab_stats``: with a reference and ``kl=True``
(``vocab_stats_kl``) and without (``vocab_stats``).

    pytest bench/test_bench_vocab_stats.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["vocab_stats_kl", "vocab_stats"]
