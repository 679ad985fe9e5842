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
    dpo_configs  ``TDPOConfig`` / ``TIDPOConfig``, their ``DPOConfig`` subclasses (needs trl)
    ref_hidden_cache  the reference's hidden states on disk (``precompute_ref_hidden_states``)
    trl_metrics  DPOTrainer's token metrics from the loss's statistics pass
    tlpo_*       the TLPO data pipeline, trainer and ``TLPOConfig`` (the config needs transformers)
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
    "TDPOConfig": "dpo_configs",
    "TIDPOConfig": "dpo_configs",
    "LanguageChecker": "tlpo_language",
    "first_confusion": "tlpo_language",
    "char_script": "tlpo_language",
    "target_scripts": "tlpo_language",
    "confusion_token_index": "tlpo_language",
    "update_position": "tlpo_language",
    "decoded_token_offsets": "tlpo_language",
    "TLPOGroup": "tlpo_explore",
    "SampledResponse": "tlpo_explore",
    "sample_responses": "tlpo_explore",
    "detect_confusion": "tlpo_explore",
    "explore_candidates": "tlpo_explore",
    "build_groups": "tlpo_explore",
    "next_token_probs": "tlpo_explore",
    "TLPOTrainer": "tlpo_trainer",
    "TLPOConfig": "tlpo_config",
    "prompt_ids": "tlpo_explore",
    "tlpo_train_step": "tlpo_trainer",
    "tlpo_group_loss": "tlpo_trainer",
    "collate_groups": "tlpo_trainer",
    "frozen_reference": "tlpo_trainer",
}

# ``import *`` stays importable without trl: the trainers and their configs are attributes, not in __all__.
__all__ = [
    "AnchorBatch",
    "LMHead",
    "LanguageChecker",
    "SampledResponse",
    "TLPOGroup",
    "build_groups",
    "char_script",
    "collate_groups",
    "confusion_token_index",
    "decoded_token_offsets",
    "detect_confusion",
    "explore_candidates",
    "first_confusion",
    "frozen_reference",
    "next_token_probs",
    "prompt_ids",
    "sample_responses",
    "target_scripts",
    "tlpo_group_loss",
    "tlpo_train_step",
    "update_position",
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
