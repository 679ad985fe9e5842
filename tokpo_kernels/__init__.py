"""tokpo_kernels: fused lm-head statistics and token-level preference-optimisation losses.

``import tokpo_kernels`` never imports transformers/trl and never touches CUDA. Every registered
loss (``tokpo_kernels.losses.LOSSES``) and its ``nn.Module`` class are exported from here by name.
"""

from tokpo_kernels import losses as _losses
from tokpo_kernels import modules as _modules
from tokpo_kernels._types import LossOutput, VocabStats  # noqa: F401  (re-export)
from tokpo_kernels.functional import linear_vocab_stats  # noqa: F401  (re-export)
from tokpo_kernels.losses import tlpo_advantages, token_importance_weights  # noqa: F401  (re-export)

__version__ = "0.1.0"

for _spec in _losses.LOSSES:
    globals()[_spec.name] = _spec.fn
    globals()[_spec.module] = getattr(_modules, _spec.module)

__all__ = sorted([
    "LossOutput",
    "VocabStats",
    "__version__",
    "linear_vocab_stats",
    "tlpo_advantages",
    "token_importance_weights",
    *(s.name for s in _losses.LOSSES),
    *(s.module for s in _losses.LOSSES),
])
