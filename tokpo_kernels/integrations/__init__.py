"""Hugging Face ``transformers`` / TRL integrations (optional extra: ``pip install tokpo_kernels[trl]``).

Nothing is imported eagerly: ``import tokpo_kernels.integrations`` imports neither transformers nor
trl. Submodules and the names below are loaded on first attribute access (PEP 562)::

    from tokpo_kernels.integrations import TDPOTrainer          # imports trl now
    from tokpo_kernels.integrations import causal_lm_hidden_states

Submodules:
    hf_hidden    final hidden states and the lm-head of a causal LM without logits (torch only)
    attribution  TI-DPO token-importance scores (gradient of the max last logit w.r.t. embeddings)
    anchors      TI-DPO anchor responses sampled from the policy
    trainers     ``TDPOTrainer`` / ``TIDPOTrainer`` on TRL's ``DPOTrainer`` (needs trl)
    tlpo_*       the TLPO data pipeline and trainer
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> submodule that defines it. Only these (and submodule names) are resolved lazily.
_EXPORTS = {
    "LMHead": "hf_hidden",
    "lm_head_params": "hf_hidden",
    "causal_lm_hidden_states": "hf_hidden",
    "gathered_lm_head": "hf_hidden",
    "frozen_lm_head": "hf_hidden",
    "unwrap_causal_lm": "hf_hidden",
    "importance_scores": "attribution",
    "importance_token_weights": "attribution",
    "AnchorBatch": "anchors",
    "generate_anchors": "anchors",
    "TDPOTrainer": "trainers",
    "TIDPOTrainer": "trainers",
}

# ``import *`` stays importable without trl: the trainers are attributes, not in __all__.
__all__ = [
    "AnchorBatch",
    "LMHead",
    "causal_lm_hidden_states",
    "frozen_lm_head",
    "gathered_lm_head",
    "generate_anchors",
    "importance_scores",
    "importance_token_weights",
    "lm_head_params",
    "unwrap_causal_lm",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        else:
            globals()[name] = module
            return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
