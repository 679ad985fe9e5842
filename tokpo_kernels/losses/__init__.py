"""Losses as small PyTorch functions of the per-token statistics of ``linear_vocab_stats``.

No loss adds a kernel; each takes ``impl=`` and passes it through.
"""

from tokpo_kernels.losses.cross_entropy import linear_cross_entropy
from tokpo_kernels.losses.dpo import dpo_loss
from tokpo_kernels.losses.importance import token_importance_weights
from tokpo_kernels.losses.ppo import ppo_loss
from tokpo_kernels.losses.tdpo import tdpo_loss
from tokpo_kernels.losses.tidpo import tidpo_loss
from tokpo_kernels.losses.tlpo import tlpo_advantages, tlpo_loss

__all__ = [
    "dpo_loss",
    "linear_cross_entropy",
    "ppo_loss",
    "tdpo_loss",
    "tidpo_loss",
    "tlpo_advantages",
    "tlpo_loss",
    "token_importance_weights",
]
