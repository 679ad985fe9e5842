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
  ``ref_model`` — the same model with its adapter disabled (or TRL's ``"ref"`` adapter), as TRL does.

``DPOConfig.beta`` is β. Per-pair metrics are gathered across processes and logged as their mean
under TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` plus ``kl/chosen``, ``kl/rejected``,
``kl/margin`` (and ``triplet_loss`` for TI-DPO). Note docs/methods.md's reward includes the KL:
``rewards/* = β(M + K)``.

``DPOConfig`` fields that select *other* DPO losses (``loss_type``, ``loss_weights``, ``ld_alpha``,
``f_divergence_type``, ``label_smoothing``, ``use_weighting``) are ignored (a warning is emitted
when they differ from the defaults); ``precompute_ref_log_probs=True`` is rejected, because TDPO's
per-token KL needs the reference's full distribution, not its log-probs. When ``ref_model`` is
``None`` and the policy is not PEFT, the reference is a frozen ``copy.deepcopy`` of the policy
(TRL would reload the checkpoint by name instead).

Distributed: single device, DDP, and FSDP2 (DTensor lm-head, gathered with ``full_tensor()``)
are supported. DeepSpeed ZeRO-3 and FSDP1 shard the policy's lm-head outside its forward; the
loss's backward (which recomputes logit tiles from the weight) would then see a re-sharded weight,
so they are rejected with ``NotImplementedError`` (use ZeRO-1/2 or FSDP2).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

try:
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
    from trl.trainer.utils import use_adapter
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "tokpo_kernels.integrations.trainers needs TRL (and transformers): pip install tokpo_kernels[trl] "
        f"(import failed: {err})"
    ) from err

import tokpo_kernels as tk
from tokpo_kernels.integrations._hf_utils import IGNORE_INDEX, is_peft
from tokpo_kernels.integrations.anchors import generate_anchors, prompts_from_preference_batch
from tokpo_kernels.integrations.attribution import importance_scores, importance_token_weights
from tokpo_kernels.integrations.hf_hidden import (
    LMHead,
    causal_lm_hidden_states,
    frozen_lm_head,
    gathered_lm_head,
)
from tokpo_kernels.losses.tdpo import TDPO_VARIANTS
from tokpo_kernels.losses.tidpo import TIDPO_PREFERENCES

__all__ = ["TDPOTrainer", "TIDPOTrainer"]

_NON_MODEL_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# DPOConfig fields that choose another DPO loss, with their defaults.
_IGNORED_DPO_FIELDS = {
    "loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None, "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0, "use_weighting": False,
}


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


class _TokenLevelDPOTrainer(DPOTrainer):
    """Shared plumbing: batch → (hidden, ref_hidden, targets), reference handling, metric logging."""

    _tag_names = ["trl", "dpo", "tokpo_kernels"]

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        loss_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        if args is not None and getattr(args, "precompute_ref_log_probs", False):
            raise ValueError(
                f"{type(self).__name__} needs the reference model's full next-token distribution (per-token KL), "
                "so precompute_ref_log_probs=True is not supported; set it to False"
            )
        if args is not None:
            changed = [name for name, default in _IGNORED_DPO_FIELDS.items() if getattr(args, name, default) != default]
            if changed:
                warnings.warn(
                    f"{type(self).__name__} computes its own loss; DPOConfig fields {changed} are ignored",
                    UserWarning, stacklevel=3,
                )
        if (ref_model is None and isinstance(model, nn.Module) and kwargs.get("peft_config") is None
                and not is_peft(model)):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.loss_impl = loss_impl
        super().__init__(model, ref_model, args, **kwargs)
        self._check_sharding()

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

    # ------------------------------------------------------------------ forward pieces
    @staticmethod
    def _model_kwargs(inputs: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}

    @staticmethod
    def _targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Shifted labels: ``targets[:, t]`` is the token predicted from hidden position ``t``."""
        return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)[:, 1:]

    def _policy_hidden(self, model: nn.Module, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
        hidden = causal_lm_hidden_states(model, input_ids, attention_mask, **model_kwargs)
        return hidden[:, -input_ids.shape[1]:][:, :-1]  # drop prompt-learning virtual tokens, then shift

    def _reference_context(self):
        if self.ref_model is None and is_peft(self.accelerator.unwrap_model(self.model)):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        if self.ref_model is None:
            raise ValueError(f"{type(self).__name__} needs a reference model (ref_model) or a PEFT policy")
        return self.ref_model, contextlib.nullcontext()

    def _reference_hidden(self, input_ids, attention_mask, model_kwargs) -> tuple:
        """``(ref_hidden[:, :-1], frozen LMHead)`` under ``torch.no_grad()``."""
        ref, adapter_ctx = self._reference_context()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter_ctx:
            hidden = causal_lm_hidden_states(ref, input_ids, attention_mask, **model_kwargs)
            head = frozen_lm_head(ref)
        return hidden[:, -input_ids.shape[1]:][:, :-1], head

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

    # ------------------------------------------------------------------ logging
    def _log_tk_metrics(self, mode: str, metrics: Dict[str, torch.Tensor], inputs: Dict[str, Any]) -> None:
        for key, value in metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._metrics[mode][key].append(gathered.mean().item())
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
        self._log_tk_metrics(mode, out.metrics, inputs)
        if return_outputs:  # the logits for compute_metrics: one extra full forward, as TRL 1.16 does
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                **self._model_kwargs(inputs))
            return out.loss, outputs
        return out.loss


class TDPOTrainer(_TokenLevelDPOTrainer):
    """TRL ``DPOTrainer`` training with TDPO (``tk.tdpo_loss``; docs/methods.md §2).

    ``TDPOTrainer(model, ref_model=None, args=DPOConfig(beta=0.1, ...), tdpo_alpha=0.5,
    tdpo_variant="tdpo2", loss_impl="auto", train_dataset=..., processing_class=..., ...)``

    Args (in addition to ``DPOTrainer``'s; β is ``args.beta``):
        tdpo_alpha: α, weight of the KL margin in TDPO2 (reference default 0.5).
        tdpo_variant: ``"tdpo1"`` or ``"tdpo2"`` (default; the reference config ships ``"tdpo1"``).
        loss_impl: ``impl`` of the fused statistics (``"auto"`` | ``"triton"`` | ``"torch"`` | ``"naive"``).
    """

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        tdpo_alpha: float = 0.5, tdpo_variant: str = "tdpo2", loss_impl: str = "auto", **kwargs: Any,
    ) -> None:
        if tdpo_variant not in TDPO_VARIANTS:
            raise ValueError(f"tdpo_variant: expected one of {TDPO_VARIANTS}, got {tdpo_variant!r}")
        self.tdpo_alpha = float(tdpo_alpha)
        self.tdpo_variant = tdpo_variant
        super().__init__(model, ref_model, args, loss_impl=loss_impl, **kwargs)

    def _loss(self, model, inputs):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        model_kwargs = self._model_kwargs(inputs)
        targets = self._targets(input_ids, inputs["completion_mask"])
        ref_hidden, ref_head = self._reference_hidden(input_ids, attention_mask, model_kwargs)
        hidden = self._policy_hidden(model, input_ids, attention_mask, model_kwargs)
        with gathered_lm_head(model) as head:
            h = self._head_args(head, ref_head, hidden, ref_hidden)
            return tk.tdpo_loss(
                hidden, h["weight"], targets, ref_hidden, h["ref_weight"], bias=h["bias"], ref_bias=h["ref_bias"],
                beta=self.beta, alpha=self.tdpo_alpha, variant=self.tdpo_variant, softcap=h["softcap"],
                temperature=h["temperature"], ignore_index=IGNORE_INDEX, impl=self.loss_impl,
            )


class TIDPOTrainer(_TokenLevelDPOTrainer):
    """TRL ``DPOTrainer`` training with TI-DPO (``tk.tidpo_loss``; docs/methods.md §3).

    Per batch: (1) the attribution pass (``importance_scores``: gradient of the last position's max
    logit w.r.t. the input embeddings, L1 over hidden, eval mode, no parameter gradients) turned
    into ``token_weights`` aligned with the shifted targets; (2) optionally one anchor response per
    prompt sampled from the current policy; (3) ``tk.tidpo_loss`` on the policy's and reference's
    hidden states of chosen, rejected and anchor (chosen/rejected/anchor share one policy forward
    and one reference forward).

    ``TIDPOTrainer(model, ref_model=None, args=DPOConfig(beta=0.1, ...), tidpo_gamma=0.1, ...)``

    Args (in addition to ``DPOTrainer``'s; β is ``args.beta``). Defaults are the paper's; the
    reference code uses beta=0.2, gamma=0.001, margin=0.001, lam=0.2, sigma_div=8:
        tidpo_alpha: α of the TDPO2-style KL margin (0.5).
        tidpo_gamma: γ, weight of the triplet term (0.1).
        tidpo_margin: triplet margin (0.01); ``≤ 0`` disables the triplet term.
        tidpo_preference: ``"tdpo2"`` (reference code) or ``"dpo"`` (paper's weighted DPO).
        tidpo_kl_coef: optional mean sequence-KL penalty weight (0.0).
        tidpo_use_importance: run the attribution pass (True); False → uniform weights.
        tidpo_importance_lam, tidpo_importance_sigma_div: λ (0.7) and σ_div (4.0).
        tidpo_importance_span: ``"all"`` non-pad tokens (reference code) or ``"response"``.
        tidpo_use_anchor: sample anchors and add the triplet term (True).
        tidpo_anchor_max_new_tokens, tidpo_anchor_top_k, tidpo_anchor_top_p,
        tidpo_anchor_temperature: sampling (64, 50, 0.95, 0.8).
        tidpo_anchor_generation_kwargs: extra ``generate`` keyword arguments.
        loss_impl: ``impl`` of the fused statistics.
    """

    def __init__(
        self, model: Any, ref_model: Optional[nn.Module] = None, args: Optional[DPOConfig] = None, *,
        tidpo_alpha: float = 0.5,
        tidpo_gamma: float = 0.1,
        tidpo_margin: float = 0.01,
        tidpo_preference: str = "tdpo2",
        tidpo_kl_coef: float = 0.0,
        tidpo_use_importance: bool = True,
        tidpo_importance_lam: float = 0.7,
        tidpo_importance_sigma_div: float = 4.0,
        tidpo_importance_span: str = "all",
        tidpo_use_anchor: bool = True,
        tidpo_anchor_max_new_tokens: int = 64,
        tidpo_anchor_top_k: int = 50,
        tidpo_anchor_top_p: float = 0.95,
        tidpo_anchor_temperature: float = 0.8,
        tidpo_anchor_generation_kwargs: Optional[dict] = None,
        loss_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        if tidpo_preference not in TIDPO_PREFERENCES:
            raise ValueError(f"tidpo_preference: expected one of {TIDPO_PREFERENCES}, got {tidpo_preference!r}")
        if tidpo_importance_span not in ("all", "response"):
            raise ValueError(f"tidpo_importance_span: expected 'all' or 'response', got {tidpo_importance_span!r}")
        self.tidpo_alpha = float(tidpo_alpha)
        self.tidpo_gamma = float(tidpo_gamma)
        self.tidpo_margin = float(tidpo_margin)
        self.tidpo_preference = tidpo_preference
        self.tidpo_kl_coef = float(tidpo_kl_coef)
        self.tidpo_use_importance = bool(tidpo_use_importance)
        self.tidpo_importance_lam = float(tidpo_importance_lam)
        self.tidpo_importance_sigma_div = float(tidpo_importance_sigma_div)
        self.tidpo_importance_span = tidpo_importance_span
        self.tidpo_use_anchor = bool(tidpo_use_anchor)
        self.tidpo_anchor_kwargs = dict(
            max_new_tokens=int(tidpo_anchor_max_new_tokens), top_k=int(tidpo_anchor_top_k),
            top_p=float(tidpo_anchor_top_p), temperature=float(tidpo_anchor_temperature),
            generation_kwargs=dict(tidpo_anchor_generation_kwargs or {}),
        )
        super().__init__(model, ref_model, args, loss_impl=loss_impl, **kwargs)

    # Separate methods so that tests (and users) can substitute fixed weights / anchors.
    def compute_token_weights(self, model: nn.Module, inputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """``(2B, T − 1)`` importance weights aligned with the shifted targets, or ``None`` (uniform)."""
        if not self.tidpo_use_importance:
            return None
        policy = self.accelerator.unwrap_model(model)
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
        ) as unwrapped:
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
            ref_all, ref_head = self._reference_hidden(all_ids, all_mask, {})
            hid_all = self._policy_hidden(model, all_ids, all_mask, {})
            t = input_ids.shape[1] - 1
            hidden, ref_hidden, targets = hid_all[:rows, :t], ref_all[:rows, :t], all_targets[:rows, :t]
            a_hidden, a_ref_hidden, a_targets = hid_all[rows:], ref_all[rows:], all_targets[rows:]
        else:
            targets = self._targets(input_ids, completion_mask)
            ref_hidden, ref_head = self._reference_hidden(input_ids, attention_mask, model_kwargs)
            hidden = self._policy_hidden(model, input_ids, attention_mask, model_kwargs)
            a_hidden = a_ref_hidden = a_targets = None
            if anchors is not None:
                a_targets = self._targets(anchors.input_ids, anchors.completion_mask)
                a_ref_hidden, _ = self._reference_hidden(anchors.input_ids, anchors.attention_mask, {})
                a_hidden = self._policy_hidden(model, anchors.input_ids, anchors.attention_mask, {})

        with gathered_lm_head(model) as head:
            h = self._head_args(head, ref_head, hidden, ref_hidden)
            return tk.tidpo_loss(
                hidden, h["weight"], targets, ref_hidden, h["ref_weight"], token_weights=token_weights,
                anchor_hidden=a_hidden, anchor_ref_hidden=a_ref_hidden, anchor_targets=a_targets,
                beta=self.beta, alpha=self.tidpo_alpha, gamma=self.tidpo_gamma, margin=self.tidpo_margin,
                preference=self.tidpo_preference, kl_coef=self.tidpo_kl_coef, bias=h["bias"],
                ref_bias=h["ref_bias"], softcap=h["softcap"], temperature=h["temperature"],
                ignore_index=IGNORE_INDEX, impl=self.loss_impl,
            )
