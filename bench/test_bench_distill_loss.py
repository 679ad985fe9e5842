"""pytest-benchmark suite of ``tk.distill_loss`` (peer: Liger's ``LigerFusedLinearJSDLoss`` with ``beta=0``).

    pytest bench/test_bench_distill_loss.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["distill_loss"]
