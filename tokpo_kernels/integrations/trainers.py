"""``TDPOTrainer`` and ``TIDPOTrainer``: TRL ``DPOTrainer`` subclasses that train with ``tk.tdpo_loss`` /
``tk.tidpo_loss`` (docs/methods.md §2–3) on the lm-head inputs, never materialising logits.

Written against TRL 1.16 (``pip install tokpo_kernels[trl]``). Everything of ``DPOTrainer`` is kept —
dataset preparation and tokenisation, ``DataCollatorForPreference``, PEFT handling, the reference
model's preparation, dropout disabling, logging — and only :meth:`compute_loss` is overridden (the
public ``Trainer`` hook that TRL 1.16's ``DPOTrainer.compute_loss`` uses to call its private
``_compute_loss``). The batch it receives is TRL 1.16's: ``input_ids``, ``attention_mask``,
``completion_mask``, each ``(2B, T)``, right-padded, rows ``[chosen; rejected]``. From it:

- ``targets = input_ids.masked_fill(completion_mask == 0, -100)[:, 1:]``;
- the policy's final hidden states ``[:, :-1]`` from
  :func:`~tokpo_kernels.integrations.hf_hidden.causal_lm_hidden_states` and its lm-head (weight, bias,
  Gemma softcap) from ``gathered_lm_head``;
- the reference's, under ``torch.no_grad()``: ``ref_model``, or — for a PEFT policy without a
  ``ref_model`` — the same model with its adapter disabled (or TRL's ``"ref"`` adapter), as TRL does;
  or, with ``precompute_ref_hidden_states=True``, from the on-disk cache built once at construction
  (:mod:`~tokpo_kernels.integrations.ref_hidden_cache`; no reference model in memory while training).

Mixed precision as ``DPOTrainer``: both forwards run under the trainer's autocast
(``self.accelerator.autocast()``: ``bf16=True`` / ``fp16=True``), which ``causal_lm_hidden_states``
would otherwise bypass (it calls the base model, not the autocast-wrapped ``model.forward``); the
lm-head operands (hidden states, weight, bias) are cast to the autocast dtype, as ``F.linear`` inside
the model's own forward would cast them. The loss accumulates in fp32.

Configuration: :class:`~tokpo_kernels.integrations.dpo_configs.TDPOConfig` /
:class:`~tokpo_kernels.integrations.dpo_configs.TIDPOConfig` (``DPOConfig`` subclasses; a plain
``DPOConfig`` is converted). ``DPOConfig.beta`` is β. The method keyword arguments of the trainers
(``tdpo_alpha=…``, ``loss_impl=…``) still work and fill the config, with a ``FutureWarning``.

Metrics: every metric ``DPOTrainer`` logs, under its name — ``entropy``, ``logits/chosen``,
``logits/rejected``, ``mean_token_accuracy`` (from the loss's statistics pass,
:mod:`~tokpo_kernels.integrations.trl_metrics`), ``num_tokens``, ``rewards/*``, ``logps/*`` — plus
``kl/chosen``, ``kl/rejected``, ``kl/margin`` (and ``triplet_loss`` for TI-DPO). ``rewards/*`` keep the
methods' meaning, ``β(M + K)`` (the sequence log-ratio plus the sequence KL, as the TDPO reference code
logs them), where ``DPOTrainer``'s are ``β·M``; ``rewards/accuracies`` and ``rewards/margins`` follow.

``DPOConfig`` fields that select *other* DPO losses (``loss_type``, ``loss_weights``, ``ld_alpha``,
``f_divergence_type``, ``label_smoothing``, ``use_weighting``) are ignored (a warning is emitted
when they differ from the defaults); ``precompute_ref_log_probs=True`` is rejected, because TDPO's
per-token KL needs the reference's full distribution, not its log-probs
(``precompute_ref_hidden_states=True`` is the replacement). When ``ref_model`` is ``None`` and the
policy is not PEFT, the reference is a frozen ``copy.deepcopy`` of the policy (TRL would reload the
checkpoint by name instead).

Distributed: single device, DDP, and FSDP2 (DTensor lm-head, gathered with ``full_tensor()``)
are supported. DeepSpeed ZeRO-3 and FSDP1 shard the policy's lm-head outside its forward; the
loss's backward (which recomputes logit tiles from the weight) would then see a re-sharded weight,
so they are rejected with ``NotImplementedError`` (use ZeRO-1/2 or FSDP2). The reference cache is
written by the main process and read by all (tested on a single process).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import textwrap
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

try:
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
    from trl.trainer.utils import hash_module, use_adapter
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "tokpo_kernels.integrations.trainers needs TRL (and transformers): pip install tokpo_kernels[trl] "
        f"(import failed: {err})"
    ) from err

import tokpo_kernels as tk
from tokpo_kernels.integrations._config_utils import UNSET, fill_config_from_keywords
from tokpo_kernels.integrations._hf_utils import IGNORE_INDEX, autocast_head_dtype, is_peft
from tokpo_kernels.integrations.anchors import generate_anchors, prompts_from_preference_batch
from tokpo_kernels.integrations.attribution import importance_scores, importance_token_weights
from tokpo_kernels.integrations.dpo_configs import TDPOConfig, TIDPOConfig, TokenLevelDPOConfig
from tokpo_kernels.integrations.hf_hidden import (
    LMHead,
    causal_lm_hidden_states,
    frozen_lm_head,
    gathered_lm_head,
)
from tokpo_kernels.integrations.ref_hidden_cache import RefHiddenCache, RefHiddenCacheWriter, read_manifest
from tokpo_kernels.integrations.trl_metrics import dpo_token_metric_sums

__all__ = ["TDPOTrainer", "TIDPOTrainer"]

# The dataset column (and batch key) that carries each example's global index into the reference cache.
REF_INDEX_KEY = "ref_hidden_index"
_NON_MODEL_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps",
                   REF_INDEX_KEY}
# DPOConfig fields that choose another DPO loss, with their defaults.
_IGNORED_DPO_FIELDS = {
    "loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None, "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0, "use_weighting": False,
}


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def _as_config(config_cls: type, args: Optional[DPOConfig], model: Any, suffix: str) -> TokenLevelDPOConfig:
    """``args`` as a ``config_cls``: a default one when ``None`` (named like ``DPOTrainer``'s default),
    a copy of every init field of a plain ``DPOConfig`` (its ``__post_init__`` runs again)."""
    if isinstance(args, config_cls):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return config_cls(f"{str(name).split('/')[-1]}-{suffix}")
    if not isinstance(args, DPOConfig):
        raise TypeError(f"args: expected a {config_cls.__name__} or a DPOConfig, got {type(args).__name__}")
    if isinstance(args, TokenLevelDPOConfig):
        raise TypeError(f"args: expected a {config_cls.__name__}, got a {type(args).__name__} (another method's)")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
    return config_cls(**values)


# The tokenised columns of TRL 1.16's preference datasets: what decides the cached rows.
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _token_digest(dataset: Any) -> str:
    """SHA-256 of a tokenised preference dataset's token ids, row by row.

    Not ``Dataset._fingerprint``: after TRL's ``map`` calls it depends on how the mapped function
    hashed (it differed between two trainers built on the same data with another ``max_steps``), so a
    resumed run would recompute a valid cache. The ids themselves are what the cached rows depend on.
    """
    import hashlib

    import numpy as np

    columns = [c for c in _TOKEN_COLUMNS if c in dataset.column_names]
    if not columns:
        raise ValueError(f"precompute_ref_hidden_states=True: expected tokenised columns {_TOKEN_COLUMNS}, got "
                         f"{dataset.column_names}")
    digest = hashlib.sha256()
    for batch in dataset.select_columns(columns).iter(batch_size=1024):
        for name in columns:
            rows = batch[name]
            digest.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
            digest.update(np.asarray([t for r in rows for t in r], dtype=np.int64).tobytes())
    return digest.hexdigest()


class _WithRefIndex:
    """Collator wrapper: carries the ``ref_hidden_index`` column past ``DataCollatorForPreference`` (which
    keeps only the keys it knows) into the batch as a ``(B,)`` tensor."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list) -> Dict[str, Any]:
        if not examples or not isinstance(examples[0], dict) or REF_INDEX_KEY not in examples[0]:
            return self.inner(examples)
        index = torch.tensor([int(e[REF_INDEX_KEY]) for e in examples], dtype=torch.int64)
        batch = self.inner([{k: v for k, v in e.items() if k != REF_INDEX_KEY} for e in examples])
        batch[REF_INDEX_KEY] = index
        return batch


class _TokenLevelDPOTrainer(DPOTrainer):
    """Shared plumbing: config, batch → (hidden, ref_hidden, targets), reference handling (live or
    cached), autocast, metric logging."""

    _tag_names = ["trl", "dpo", "tokpo_kernels"]
    _config_class: type = TokenLevelDPOConfig
    _config_suffix = "DPO"

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        loss_impl: Any = UNSET, _method_keywords: Optional[Dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if args is not None and getattr(args, "precompute_ref_log_probs", False):
            raise ValueError(
                f"{type(self).__name__} needs the reference model's full next-token distribution (per-token KL), "
                "so precompute_ref_log_probs=True is not supported; set it to False (precompute_ref_hidden_states="
                "True stores what the loss needs instead)"
            )
        args = fill_config_from_keywords(
            type(self).__name__, self._config_class, args, {**(_method_keywords or {}), "loss_impl": loss_impl},
            convert=lambda a: _as_config(self._config_class, a, model, self._config_suffix),
            stacklevel=4,  # this function, _TokenLevelDPOTrainer.__init__, the method's __init__, the user
        )
        changed = [name for name, default in _IGNORED_DPO_FIELDS.items() if getattr(args, name, default) != default]
        if changed:
            warnings.warn(
                f"{type(self).__name__} computes its own loss; DPOConfig fields {changed} are ignored",
                UserWarning, stacklevel=3,
            )
        if (ref_model is None and isinstance(model, nn.Module) and kwargs.get("peft_config") is None
                and not is_peft(model)):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model, ref_model, args, **kwargs)
        self._check_sharding()
        self.ref_cache: Optional[RefHiddenCache] = None
        if args.precompute_ref_hidden_states:
            self._precompute_reference()

    # ------------------------------------------------------------------ config views (kept for callers)
    @property
    def loss_impl(self) -> str:
        return self.args.loss_impl

    # ------------------------------------------------------------------ checks
    def _check_sharding(self) -> None:
        zero3 = False
        if getattr(self, "is_deepspeed_enabled", False):
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            zero3 = plugin is not None and getattr(plugin, "zero_stage", 0) == 3
        fsdp1 = False
        if getattr(self, "is_fsdp_enabled", False):
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            fsdp1 = plugin is not None and getattr(plugin, "fsdp_version", 1) == 1
        if zero3 or fsdp1:
            raise NotImplementedError(
                f"{type(self).__name__}: {'DeepSpeed ZeRO-3' if zero3 else 'FSDP1'} shards the lm-head outside its "
                "forward, and the fused loss's backward needs the full weight; use ZeRO-1/2 or FSDP2 (fsdp_version=2)"
            )

    # ------------------------------------------------------------------ mixed precision
    def _head_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The dtype ``F.linear`` would compute the lm-head in under the trainer's autocast, or ``None``."""
        return autocast_head_dtype(self.accelerator, device)

    def _to_head_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = self._head_dtype(hidden.device)
        return hidden if dtype is None else hidden.to(dtype)

    # ------------------------------------------------------------------ forward pieces
    @staticmethod
    def _model_kwargs(inputs: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}

    @staticmethod
    def _targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Shifted labels: ``targets[:, t]`` is the token predicted from hidden position ``t``."""
        return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)[:, 1:]

    def _policy_hidden(self, model: nn.Module, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        with self.accelerator.autocast():
            hidden = causal_lm_hidden_states(model, input_ids, attention_mask, **model_kwargs)
        hidden = hidden[:, -input_ids.shape[1]:][:, :-1]  # drop prompt-learning virtual tokens, then shift
        return self._to_head_dtype(hidden)

    def _reference_context(self):
        if self.ref_model is None and is_peft(self.accelerator.unwrap_model(self.model)):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        if self.ref_model is None:
            raise ValueError(f"{type(self).__name__} needs a reference model (ref_model) or a PEFT policy")
        return self.ref_model, contextlib.nullcontext()

    def _live_reference_hidden(self, input_ids, attention_mask, model_kwargs) -> tuple:
        """``(ref_hidden[:, :-1], frozen LMHead)`` of the reference model, under ``torch.no_grad()``."""
        ref, adapter_ctx = self._reference_context()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter_ctx:
            with self.accelerator.autocast():
                hidden = causal_lm_hidden_states(ref, input_ids, attention_mask, **model_kwargs)
            head = frozen_lm_head(ref)
        return self._to_head_dtype(hidden[:, -input_ids.shape[1]:][:, :-1]), head

    def _reference_hidden(self, inputs: Dict[str, Any], input_ids, attention_mask, model_kwargs) -> tuple:
        """The reference's ``(hidden, LMHead)`` for the batch: from the cache when there is one, else live."""
        if self.ref_cache is None:
            return self._live_reference_hidden(input_ids, attention_mask, model_kwargs)
        if REF_INDEX_KEY not in inputs:
            raise ValueError(
                f"{type(self).__name__}: precompute_ref_hidden_states=True, but this batch has no '{REF_INDEX_KEY}': "
                "only the train and eval datasets given at construction are cached (evaluate(eval_dataset=...) with "
                "another dataset needs a trainer built with it)"
            )
        mask = self._targets(input_ids, inputs["completion_mask"]) != IGNORE_INDEX
        hidden = self.ref_cache.batch_hidden(inputs[REF_INDEX_KEY], mask)
        return hidden, self.ref_cache.lm_head(hidden.device)

    @staticmethod
    def _head_args(head: LMHead, ref_head: LMHead, hidden: torch.Tensor, ref_hidden: torch.Tensor) -> dict:
        if head.softcap != ref_head.softcap or head.temperature() != ref_head.temperature():
            raise ValueError(
                "policy and reference lm-heads differ in softcap/logit scale "
                f"({head.softcap}, {head.scale}) vs ({ref_head.softcap}, {ref_head.scale}); the fused losses take one"
            )

        def cast(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
            return None if t is None else t.to(like.dtype)

        return dict(
            weight=cast(head.weight, hidden), bias=cast(head.bias, hidden),
            ref_weight=cast(ref_head.weight, ref_hidden), ref_bias=cast(ref_head.bias, ref_hidden),
            softcap=head.softcap, temperature=head.temperature(),
        )

    # ------------------------------------------------------------------ the reference cache
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and REF_INDEX_KEY not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [REF_INDEX_KEY]

    def _cached_splits(self) -> list:
        """``[(name, dataset)]`` of the datasets the cache covers: train, then eval (one or a dict)."""
        splits = [("train", self.train_dataset)] if self.train_dataset is not None else []
        if isinstance(self.eval_dataset, dict):
            splits += [(f"eval/{name}", ds) for name, ds in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            splits.append(("eval", self.eval_dataset))
        for name, ds in splits:
            if not hasattr(ds, "add_column") or not hasattr(ds, "__len__"):
                raise ValueError(
                    f"precompute_ref_hidden_states=True: expected map-style datasets.Dataset objects, got a "
                    f"{type(ds).__name__} for {name}"
                )
        return splits

    def _precompute_reference(self) -> None:
        """Build (or reuse) the reference cache, index the datasets into it, and drop the reference model."""
        splits = self._cached_splits()
        directory = self.args.ref_hidden_states_dir or os.path.join(self.args.output_dir, "ref_hidden_states")
        ref, _ = self._reference_context()
        fingerprint = {
            "splits": [[name, len(ds), _token_digest(ds)] for name, ds in splits],
            "reference_sha256": hash_module(self.accelerator.unwrap_model(ref)) if self.ref_model is not None
            else hash_module(self.accelerator.unwrap_model(self.model)),  # PEFT: base weights + initial adapter
            "head_dtype": str(self._head_dtype(self.accelerator.device)),
            "max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode,
        }
        offset, indexed = 0, []
        for name, ds in splits:
            indexed.append((name, ds.add_column(REF_INDEX_KEY, list(range(offset, offset + len(ds))))))
            offset += len(ds)
        self.data_collator = _WithRefIndex(self.data_collator)
        manifest = read_manifest(directory)
        if (manifest is None or manifest.get("fingerprint") != fingerprint) and self.accelerator.is_main_process:
            self._write_reference_cache(directory, indexed, offset, fingerprint)
        self.accelerator.wait_for_everyone()
        self.ref_cache = RefHiddenCache(directory)
        # Training reads the datasets with the index column; the reference model is no longer needed.
        by_name = dict(indexed)
        if "train" in by_name:
            self.train_dataset = by_name["train"]
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: by_name[f"eval/{name}"] for name in self.eval_dataset}
        elif self.eval_dataset is not None:
            self.eval_dataset = by_name["eval"]
        if self.ref_model is not None:
            dropped = self.ref_model
            # The accelerator keeps every prepared model in its _models list; without removing it there the
            # reference would stay in memory for the whole training.
            self.accelerator._models = [m for m in self.accelerator._models if m is not dropped]
            self.ref_model = None
            del dropped
            gc.collect()

    def _write_reference_cache(self, directory: str, indexed: list, total: int, fingerprint: dict) -> None:
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        writer = RefHiddenCacheWriter(directory, total, fingerprint)
        device = self.accelerator.device
        for _, ds in indexed:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                                 collate_fn=self.data_collator)
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
                hidden, _ = self._live_reference_hidden(input_ids, attention_mask, self._model_kwargs(batch))
                mask = self._targets(input_ids, batch["completion_mask"]) != IGNORE_INDEX
                writer.add_batch(batch[REF_INDEX_KEY], hidden, mask)
        ref, adapter_ctx = self._reference_context()
        with adapter_ctx:
            writer.finish(frozen_lm_head(ref))

    # ------------------------------------------------------------------ logging
    def _log_tk_metrics(self, mode: str, out: "tk.LossOutput", inputs: Dict[str, Any]) -> None:
        for key, value in out.metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._metrics[mode][key].append(gathered.mean().item())
        if out.stats is not None:
            # DPOTrainer's token metrics: sums and counts gathered across processes, then divided.
            for key, (total, count) in dpo_token_metric_sums(out.stats).items():
                total = self.accelerator.gather_for_metrics(total.reshape(1)).sum().item()
                count = self.accelerator.gather_for_metrics(count.reshape(1)).sum().item()
                self._metrics[mode][key].append(total / count if count > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _loss(self, model: nn.Module, inputs: Dict[str, Any]) -> "tk.LossOutput":  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The fused TDPO / TI-DPO loss of one ``[chosen; rejected]`` batch (overrides ``DPOTrainer.compute_loss``)."""
        mode = "train" if self.model.training else "eval"
        out = self._loss(model, inputs)
        self._log_tk_metrics(mode, out, inputs)
        if return_outputs:  # the logits for compute_metrics: one extra full forward, as TRL 1.16 does
            with torch.no_grad(), self.accelerator.autocast():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                **self._model_kwargs(inputs))
            return out.loss, outputs
        return out.loss


class TDPOTrainer(_TokenLevelDPOTrainer):
    """TRL ``DPOTrainer`` training with TDPO (``tk.tdpo_loss``; docs/methods.md §2).

    ``TDPOTrainer(model, ref_model=None, args=TDPOConfig(beta=0.1, tdpo_alpha=0.5, ...),
    train_dataset=..., processing_class=..., ...)``; the method's options are the fields of
    :class:`~tokpo_kernels.integrations.dpo_configs.TDPOConfig` (``tdpo_alpha``, ``tdpo_variant``,
    ``loss_impl``, ``precompute_ref_hidden_states``, ``ref_hidden_states_dir``); a plain ``DPOConfig`` is
    converted with the defaults of those fields.

    Deprecated keyword arguments (they fill the config, with a ``FutureWarning``): ``tdpo_alpha``,
    ``tdpo_variant``, ``loss_impl``.
    """

    _config_class = TDPOConfig
    _config_suffix = "TDPO"
    # The model card (TRL's create_model_card) names the method and cites its paper from these two.
    _tag_names = ["trl", "tdpo", "tokpo_kernels"]
    _name = "TDPO"
    _paper = {
        "title": "Token-level Direct Preference Optimization",
        "id": "2404.11999",
        "citation": textwrap.dedent("""\
            @inproceedings{zeng2024tdpo,
                title     = {{Token-level Direct Preference Optimization}},
                author    = {Yongcheng Zeng and Guoqing Liu and Weiyu Ma and Ning Yang and Haifeng Zhang and Jun Wang},
                booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML 2024)},
                year      = 2024,
                url       = {https://arxiv.org/abs/2404.11999},
            }"""),
    }

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        tdpo_alpha: Any = UNSET, tdpo_variant: Any = UNSET, loss_impl: Any = UNSET, **kwargs: Any,
    ) -> None:
        super().__init__(model, ref_model, args, loss_impl=loss_impl,
                         _method_keywords={"tdpo_alpha": tdpo_alpha, "tdpo_variant": tdpo_variant}, **kwargs)

    @property
    def tdpo_alpha(self) -> float:
        return self.args.tdpo_alpha

    @property
    def tdpo_variant(self) -> str:
        return self.args.tdpo_variant

    def _loss(self, model, inputs):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        model_kwargs = self._model_kwargs(inputs)
        targets = self._targets(input_ids, inputs["completion_mask"])
        ref_hidden, ref_head = self._reference_hidden(inputs, input_ids, attention_mask, model_kwargs)
        hidden = self._policy_hidden(model, input_ids, attention_mask, model_kwargs)
        with gathered_lm_head(model) as head:
            h = self._head_args(head, ref_head, hidden, ref_hidden)
            return tk.tdpo_loss(
                hidden, h["weight"], targets, ref_hidden, h["ref_weight"], bias=h["bias"], ref_bias=h["ref_bias"],
                beta=self.beta, alpha=self.tdpo_alpha, variant=self.tdpo_variant, softcap=h["softcap"],
                temperature=h["temperature"], ignore_index=IGNORE_INDEX, impl=self.loss_impl, token_stats=True,
            )


# The trainer keyword (deprecated) -> TIDPOConfig field; the same names.
_TIDPO_KEYWORDS = (
    "tidpo_alpha", "tidpo_gamma", "tidpo_margin", "tidpo_preference", "tidpo_kl_coef", "tidpo_use_importance",
    "tidpo_importance_lam", "tidpo_importance_sigma_div", "tidpo_importance_span", "tidpo_use_anchor",
    "tidpo_anchor_max_new_tokens", "tidpo_anchor_top_k", "tidpo_anchor_top_p", "tidpo_anchor_temperature",
    "tidpo_anchor_generation_kwargs",
)


class TIDPOTrainer(_TokenLevelDPOTrainer):
    """TRL ``DPOTrainer`` training with TI-DPO (``tk.tidpo_loss``; docs/methods.md §3).

    Per batch: (1) the attribution pass (``importance_scores``: gradient of the last position's max
    logit w.r.t. the input embeddings, L1 over hidden, eval mode, no parameter gradients) turned
    into ``token_weights`` aligned with the shifted targets; (2) optionally one anchor response per
    prompt sampled from the current policy; (3) ``tk.tidpo_loss`` on the policy's and reference's
    hidden states of chosen, rejected and anchor (chosen/rejected/anchor share one policy forward
    and one reference forward).

    ``TIDPOTrainer(model, ref_model=None, args=TIDPOConfig(beta=0.1, tidpo_gamma=0.1, ...), ...)``; the
    method's options are the fields of :class:`~tokpo_kernels.integrations.dpo_configs.TIDPOConfig`
    (defaults are the paper's; the authors' code uses beta=0.2, gamma=0.001, margin=0.001, lam=0.2,
    sigma_div=8). Every ``tidpo_*`` field and ``loss_impl`` is also accepted as a (deprecated) keyword
    argument, which fills the config with a ``FutureWarning``.
    """

    _config_class = TIDPOConfig
    _config_suffix = "TIDPO"
    _tag_names = ["trl", "ti-dpo", "tokpo_kernels"]
    _name = "TI-DPO"
    _paper = {
        "title": "Token-Importance Guided Direct Preference Optimization",
        "id": "2505.19653",
        "citation": textwrap.dedent("""\
            @inproceedings{yang2026tidpo,
                title     = {{Token-Importance Guided Direct Preference Optimization}},
                author    = {Ning Yang and Hai Lin and Yibo Liu and Baoliang Tian and Guoqing Liu and Haijun Zhang},
                booktitle = {The Fourteenth International Conference on Learning Representations (ICLR 2026)},
                year      = 2026,
                url       = {https://arxiv.org/abs/2505.19653},
            }"""),
    }

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        tidpo_alpha: Any = UNSET,
        tidpo_gamma: Any = UNSET,
        tidpo_margin: Any = UNSET,
        tidpo_preference: Any = UNSET,
        tidpo_kl_coef: Any = UNSET,
        tidpo_use_importance: Any = UNSET,
        tidpo_importance_lam: Any = UNSET,
        tidpo_importance_sigma_div: Any = UNSET,
        tidpo_importance_span: Any = UNSET,
        tidpo_use_anchor: Any = UNSET,
        tidpo_anchor_max_new_tokens: Any = UNSET,
        tidpo_anchor_top_k: Any = UNSET,
        tidpo_anchor_top_p: Any = UNSET,
        tidpo_anchor_temperature: Any = UNSET,
        tidpo_anchor_generation_kwargs: Any = UNSET,
        loss_impl: Any = UNSET,
        **kwargs: Any,
    ) -> None:
        given = locals()
        super().__init__(model, ref_model, args, loss_impl=loss_impl,
                         _method_keywords={k: given[k] for k in _TIDPO_KEYWORDS}, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # The method options used to be trainer attributes (self.tidpo_gamma, ...): read them from the config.
        if name in _TIDPO_KEYWORDS and "args" in self.__dict__:
            return getattr(self.__dict__["args"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def tidpo_anchor_kwargs(self) -> Dict[str, Any]:
        a = self.args
        return dict(max_new_tokens=a.tidpo_anchor_max_new_tokens, top_k=a.tidpo_anchor_top_k,
                    top_p=a.tidpo_anchor_top_p, temperature=a.tidpo_anchor_temperature,
                    generation_kwargs=dict(a.tidpo_anchor_generation_kwargs or {}))

    # Separate methods so that tests (and users) can substitute fixed weights / anchors.
    def compute_token_weights(self, model: nn.Module, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """``(2B, T − 1)`` importance weights aligned with the shifted targets, or ``None`` (uniform)."""
        if not self.tidpo_use_importance:
            return None
        policy = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            scores = importance_scores(policy, inputs["input_ids"], inputs["attention_mask"],
                                       **self._model_kwargs(inputs))
        return importance_token_weights(
            scores, inputs["attention_mask"], inputs["completion_mask"], lam=self.tidpo_importance_lam,
            sigma_div=self.tidpo_importance_sigma_div, span=self.tidpo_importance_span,
        )

    def generate_anchor_batch(self, model: nn.Module, inputs: Dict[str, Any]):
        """One sampled response per pair (``AnchorBatch``), or ``None`` when anchors are off."""
        if not self.tidpo_use_anchor or self.tidpo_margin <= 0:
            return None
        prompts = prompts_from_preference_batch(inputs["input_ids"], inputs["attention_mask"],
                                                inputs["completion_mask"])
        with unwrap_model_for_generation(
            model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as unwrapped, self.accelerator.autocast():
            return generate_anchors(
                unwrapped, prompts, pad_token_id=self._tokenizer.pad_token_id,
                eos_token_id=self._tokenizer.eos_token_id, ignore_index=IGNORE_INDEX, **self.tidpo_anchor_kwargs,
            )

    def _loss(self, model, inputs):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        model_kwargs = self._model_kwargs(inputs)
        token_weights = self.compute_token_weights(model, inputs)
        anchors = self.generate_anchor_batch(model, inputs)
        if anchors is not None and self.ref_cache is not None:
            raise ValueError(
                "TIDPOTrainer: anchors are sampled during training, so their reference hidden states cannot be "
                "precomputed; with precompute_ref_hidden_states=True set tidpo_use_anchor=False (or tidpo_margin=0)"
            )

        rows = input_ids.shape[0]
        if anchors is not None and not model_kwargs:
            # one policy and one reference forward for [chosen; rejected; anchor], right-padded to a common length
            length = max(input_ids.shape[1], anchors.input_ids.shape[1])
            pad_id = self._tokenizer.pad_token_id
            all_ids = torch.cat([_pad_right(input_ids, length, pad_id), _pad_right(anchors.input_ids, length, pad_id)])
            all_mask = torch.cat([_pad_right(attention_mask, length, 0), _pad_right(anchors.attention_mask, length, 0)])
            all_comp = torch.cat([_pad_right(completion_mask, length, 0),
                                  _pad_right(anchors.completion_mask, length, 0)])
            all_targets = self._targets(all_ids, all_comp)
            ref_all, ref_head = self._live_reference_hidden(all_ids, all_mask, {})
            hid_all = self._policy_hidden(model, all_ids, all_mask, {})
            t = input_ids.shape[1] - 1
            hidden, ref_hidden, targets = hid_all[:rows, :t], ref_all[:rows, :t], all_targets[:rows, :t]
            a_hidden, a_ref_hidden, a_targets = hid_all[rows:], ref_all[rows:], all_targets[rows:]
        else:
            targets = self._targets(input_ids, completion_mask)
            ref_hidden, ref_head = self._reference_hidden(inputs, input_ids, attention_mask, model_kwargs)
            hidden = self._policy_hidden(model, input_ids, attention_mask, model_kwargs)
            a_hidden = a_ref_hidden = a_targets = None
            if anchors is not None:
                a_targets = self._targets(anchors.input_ids, anchors.completion_mask)
                a_ref_hidden, _ = self._live_reference_hidden(anchors.input_ids, anchors.attention_mask, {})
                a_hidden = self._policy_hidden(model, anchors.input_ids, anchors.attention_mask, {})

        with gathered_lm_head(model) as head:
            h = self._head_args(head, ref_head, hidden, ref_hidden)
            return tk.tidpo_loss(
                hidden, h["weight"], targets, ref_hidden, h["ref_weight"], token_weights=token_weights,
                anchor_hidden=a_hidden, anchor_ref_hidden=a_ref_hidden, anchor_targets=a_targets,
                beta=self.beta, alpha=self.tidpo_alpha, gamma=self.tidpo_gamma, margin=self.tidpo_margin,
                preference=self.tidpo_preference, kl_coef=self.tidpo_kl_coef, bias=h["bias"],
                ref_bias=h["ref_bias"], softcap=h["softcap"], temperature=h["temperature"],
                ignore_index=IGNORE_INDEX, impl=self.loss_impl, token_stats=True,
            )
