"""Benchmarked operations, one file each; importing this package registers all of them.

To add one: write ``bench/ops/<name>.py`` with ``make_inputs(shape, dtype, device) -> Batch``
(usually ``bench.ops._common.head_batch`` plus what the loss needs) and ``call(batch, impl)``
(one forward of the library function), register both with
``bench.ops._common.register_library_operation`` and a FLOP model from ``bench.flops``, import the
file below and add its cases in ``bench/tiers.py``.
"""

from bench.ops import (  # noqa: F401
    dpo_loss,
    forward_kl,
    linear_cross_entropy,
    linear_vocab_stats,
    ppo_loss,
    tdpo_loss,
    tidpo_loss,
    tlpo_loss,
)
