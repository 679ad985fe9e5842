"""pytest-benchmark suite of ``tk.ppo_loss`` (``loss_type="grpo"``; peer: Liger's ``LigerFusedLinearGRPOLoss``).

    pytest bench/test_bench_ppo_loss.py --tier cpu      # add --benchmark-json=out.json to keep results

Time only, in-process (peak memory needs a fresh process per measurement: ``python -m bench``).
"""

from bench._pytest_helpers import test_benchmark, test_triton_interpreted  # noqa: F401  (collected here)

OPS = ["ppo_loss"]
