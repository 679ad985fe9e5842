"""Benchmarked operations, one file each; importing this package registers all of them.

To add one (a loss such as cross-entropy, DPO, TDPO): write ``bench/ops/<name>.py`` that builds
inputs with ``bench.inputs.make_head_inputs`` and calls ``bench.registry.register_operation`` with a
FLOP model and one ``Impl`` per implementation, then import it below and add its cases in
``bench/tiers.py``.
"""

from bench.ops import linear_vocab_stats  # noqa: F401
