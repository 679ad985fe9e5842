"""The custom ops (autograd, masking, vocabulary-parallel merge) behind ``linear_vocab_stats``."""

from tokpo_kernels.ops.vocab_stats import vocab_stats_2d

__all__ = ["vocab_stats_2d"]
