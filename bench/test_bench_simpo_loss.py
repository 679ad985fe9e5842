"""pytest-benchmark suite of ``tk.simpo_loss`` (no peer registered; Liger's SimPO is checked in the tests).

    pytest bench/test_bench_simpo_loss.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["simpo_loss"]
