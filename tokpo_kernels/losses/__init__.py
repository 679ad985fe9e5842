"""Losses as small PyTorch functions of the per-token statistics of ``linear_vocab_stats``.

No loss adds a kernel; each takes ``impl=`` and passes it through. Each loss is one module whose
``@loss_function`` decorator registers it (``_registry.LOSSES``); importing it below is its one
registration line: ``tokpo_kernels``, its ``nn.Module`` wrappers and ``__all__`` follow from the list.
"""

from tokpo_kernels.losses._registry import LOSSES, LossSpec  # noqa: F401  (re-export)
from tokpo_kernels.losses.cross_entropy import linear_cross_entropy  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.distill import distill_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.dpo import dpo_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.importance import token_importance_weights  # noqa: F401  (re-export)
from tokpo_kernels.losses.ppo import ppo_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.simpo import simpo_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.tdpo import tdpo_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.tidpo import tidpo_loss  # noqa: F401  (re-export; registers the loss)
from tokpo_kernels.losses.tlpo import tlpo_advantages, tlpo_loss  # noqa: F401  (re-export; registers the loss)

# Public helpers that are not losses (no module wrapper); the losses come from the registry.
HELPERS = ("tlpo_advantages", "token_importance_weights")

__all__ = sorted({"LOSSES", "LossSpec", *HELPERS, *(spec.name for spec in LOSSES)})
