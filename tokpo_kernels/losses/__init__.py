"""Losses: a few lines of PyTorch each on ``linear_vocab_stats`` (METHODS.md §2–5); no kernels here.

This file imports the preference losses (TDPO, TI-DPO, DPO) and the TI-DPO importance weights.
The TLPO / PPO / cross-entropy exports (``tlpo.py``, ``ppo.py``, ``cross_entropy.py``) are added
when those modules are merged.
"""

from tokpo_kernels.losses.dpo import dpo_loss
from tokpo_kernels.losses.importance import token_importance_weights
from tokpo_kernels.losses.tdpo import tdpo_loss
from tokpo_kernels.losses.tidpo import tidpo_loss

__all__ = ["dpo_loss", "tdpo_loss", "tidpo_loss", "token_importance_weights"]
