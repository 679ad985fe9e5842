"""Autograd Function and implementation dispatch for ``linear_vocab_stats``."""

from tokpo_kernels.ops.params import StatsParams
from tokpo_kernels.ops.vocab_stats import vocab_stats_2d

__all__ = ["StatsParams", "vocab_stats_2d"]
