"""tokpo_kernels: fused lm-head statistics and token-level preference-optimisation losses.

``import tokpo_kernels`` never imports transformers/trl and never touches CUDA.
"""

from tokpo_kernels._types import LossOutput, VocabStats
from tokpo_kernels.functional import linear_vocab_stats

__version__ = "0.1.0"

__all__ = ["LossOutput", "VocabStats", "linear_vocab_stats", "__version__"]
