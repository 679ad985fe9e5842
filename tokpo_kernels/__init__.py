"""tokpo_kernels: fused lm-head statistics and token-level preference-optimisation losses.

``import tokpo_kernels`` never imports transformers/trl and never touches CUDA.
"""

from tokpo_kernels._types import LossOutput, VocabStats
from tokpo_kernels.functional import linear_vocab_stats
from tokpo_kernels.losses import (
    dpo_loss,
    linear_cross_entropy,
    ppo_loss,
    tdpo_loss,
    tidpo_loss,
    tlpo_advantages,
    tlpo_loss,
    token_importance_weights,
)
from tokpo_kernels.modules import DPOLoss, LinearCrossEntropyLoss, PPOLoss, TDPOLoss, TIDPOLoss, TLPOLoss

__version__ = "0.1.0"

__all__ = [
    "DPOLoss",
    "LinearCrossEntropyLoss",
    "LossOutput",
    "PPOLoss",
    "TDPOLoss",
    "TIDPOLoss",
    "TLPOLoss",
    "VocabStats",
    "__version__",
    "dpo_loss",
    "linear_cross_entropy",
    "linear_vocab_stats",
    "ppo_loss",
    "tdpo_loss",
    "tidpo_loss",
    "tlpo_advantages",
    "tlpo_loss",
    "token_importance_weights",
]
