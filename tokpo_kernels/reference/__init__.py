"""Naive full-logit implementation: the test oracle and the benchmark baseline."""

from tokpo_kernels.reference.naive import naive_vocab_stats

__all__ = ["naive_vocab_stats"]
