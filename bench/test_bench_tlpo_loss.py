"""pytest-benchmark suite of ``tk.tlpo_loss``, G groups x K = 16 candidates, one hidden row per group.

    pytest bench/test_bench_tlpo_loss.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["tlpo_loss"]
