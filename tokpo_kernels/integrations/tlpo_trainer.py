"""TLPO training: one hidden row per group, ``tk.tlpo_loss``, and a ``transformers.Trainer`` wrapper.

What a TLPO update does (docs/methods.md §4): every group (built by
:func:`~tokpo_kernels.integrations.tlpo_explore.build_groups`) is a prefix ending at its update
position ``u`` plus K candidate ids with advantages. All K candidates share the prefix, so:

* the policy runs each prefix ONCE (:func:`causal_lm_hidden_states`: base model only, no logits) and
  the single hidden row at ``u`` goes into ``tk.tlpo_loss`` with the ``(K,)`` candidate ids as
  targets — never K sequences;
* the frozen reference runs the same prefixes under ``no_grad``; its hidden row at ``u`` and its own
  lm-head give the reference candidate log-probs inside the same ``linear_vocab_stats`` pass (used by
  the k3 KL term).

:func:`tlpo_group_loss` is that computation; :func:`tlpo_train_step` adds ``backward`` and an optimizer
step (optionally ``num_iterations`` PPO-style passes on the same groups, with ``old_logp`` frozen at the
first pass so the ratio clip is real); :class:`TLPOTrainer` (a ``transformers.Trainer``) builds groups
on the fly from on-policy samples of each prompt batch and keeps a frozen reference copy of the policy,
refreshed (re-copied from the policy) at the start of every epoch.

Sharded models: both lm-heads in the loss and the exploration's next-token probabilities go
through ``gathered_lm_head``. The policy's head is a plain parameter or an FSDP2 ``DTensor``
(gathered differentiably, its gradient averaged over the mesh as FSDP2 does). Training a ZeRO-3 /
FSDP1-sharded policy head through this loss is not supported (untested).

``transformers`` is imported only when :class:`TLPOTrainer` is first accessed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import defaultdict
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Union

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels.functional import linear_vocab_stats
from tokpo_kernels.integrations._config_utils import UNSET, fill_config_from_keywords
from tokpo_kernels.integrations._hf_utils import IGNORE_INDEX, autocast_head_dtype, pad_right, tokenizer_pad_id
from tokpo_kernels.integrations.hf_hidden import causal_lm_hidden_states, gathered_lm_head
from tokpo_kernels.integrations.tlpo_explore import TLPOGroup, build_groups
from tokpo_kernels.integrations.tlpo_language import LanguageChecker
from tokpo_kernels.losses.tlpo import tlpo_loss

# TLPOTrainer is resolved by the module __getattr__ below (PEP 562), so that importing this module
# never imports transformers; ruff cannot see that.
__all__ = ["TLPOTrainer", "collate_groups", "frozen_reference", "tlpo_group_loss", "tlpo_train_step"]  # noqa: F822


def frozen_reference(policy: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``policy`` in eval mode with ``requires_grad=False`` everywhere."""
    ref = copy.deepcopy(policy)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def collate_groups(groups: Sequence[TLPOGroup], *, pad_id: int = 0, ignore_index: int = IGNORE_INDEX,
                   device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Right-pad the groups' prefixes into one batch.

    Returns ``input_ids (G, L)``, ``attention_mask (G, L)``, ``positions (G,)`` (the update position
    ``u`` of each row), ``candidates (G, K)`` padded with ``ignore_index`` and ``advantages (G, K)``
    (0 on padding). Groups may have different K.
    """
    if not groups:
        raise ValueError("collate_groups: got no groups")
    ids, mask = pad_right([x.prefix_ids for x in groups], int(pad_id), device)
    cand, _ = pad_right([x.candidates for x in groups], int(ignore_index), device)
    adv, _ = pad_right([x.advantages for x in groups], 0.0, device, dtype=torch.float32)
    positions = mask.sum(1) - 1
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "candidates": cand, "advantages": adv}


def _rows(model: torch.nn.Module, batch: Dict[str, torch.Tensor],
          forward_context: Optional[Callable[[], ContextManager]] = None) -> torch.Tensor:
    with (forward_context or contextlib.nullcontext)():
        hidden = causal_lm_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["positions"]]


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or dtype is None else t.to(dtype)


def tlpo_group_loss(
    policy: torch.nn.Module,
    ref: Optional[torch.nn.Module],
    groups: Union[Sequence[TLPOGroup], Dict[str, torch.Tensor]],
    *,
    kl_beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    old_logp: Optional[torch.Tensor] = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    forward_context: Optional[Callable[[], ContextManager]] = None,
    head_dtype: Optional[torch.dtype] = None,
) -> LossOutput:
    """``tk.tlpo_loss`` on one hidden row per group (policy with grad, reference without).

    Args:
        policy: the ``*ForCausalLM`` being trained (any wrapper ``causal_lm_hidden_states`` accepts).
        ref: the frozen reference model, or ``None`` (then ``kl_beta`` must be 0).
        groups: a list of :class:`TLPOGroup` or a batch from :func:`collate_groups`.
        kl_beta, eps_low, eps_high, old_logp, impl: passed to ``tk.tlpo_loss``.
        forward_context: a context manager factory entered around each model forward (a trainer's
            ``accelerator.autocast``), ``None`` for none.
        head_dtype: the dtype the lm-head operands (hidden rows, weights, biases) are cast to before
            the loss — the autocast dtype, as the model's own ``lm_head`` would see them under
            autocast — or ``None`` to leave them. The loss accumulates in fp32 either way.

    The policy forward covers the prefixes only (``G`` sequences, not ``G·K``); the lm-head enters
    through ``tlpo_loss`` (``linear_vocab_stats``), so no ``(tokens, V)`` logits are formed.
    """
    device = next(policy.parameters()).device
    batch = groups if isinstance(groups, dict) else collate_groups(groups, pad_id=pad_id,
                                                                    ignore_index=ignore_index, device=device)
    hidden = _cast(_rows(policy, batch, forward_context), head_dtype)
    ref_kw: Dict[str, Optional[torch.Tensor]] = {}
    ref_ctx: ContextManager = contextlib.nullcontext()
    if ref is not None:
        with torch.no_grad():
            ref_kw["ref_hidden"] = _cast(_rows(ref, batch, forward_context), head_dtype)
        # The reference only enters the (no-grad) forward statistics, computed inside this call, so
        # its possibly sharded lm-head is gathered just for it.
        ref_ctx = gathered_lm_head(ref)
    # The policy's head is gathered like the TDPO/TI-DPO trainers' (an FSDP2 DTensor with its
    # gradient averaged over the mesh); a bare full_tensor() would keep each rank's own gradient.
    with gathered_lm_head(policy) as head, ref_ctx as ref_head:
        if ref_head is not None:
            ref_kw["ref_weight"] = _cast(ref_head.weight.detach(), head_dtype)
            ref_kw["ref_bias"] = _cast(None if ref_head.bias is None else ref_head.bias.detach(), head_dtype)
        head_kw = head.loss_kwargs()
        head_kw["bias"] = _cast(head_kw["bias"], head_dtype)
        return tlpo_loss(
            hidden, _cast(head.weight, head_dtype), batch["candidates"], batch["advantages"], **ref_kw,
            old_logp=old_logp, kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high,
            ignore_index=ignore_index, impl=impl, **head_kw,
        )


def tlpo_train_step(
    policy: torch.nn.Module,
    ref: Optional[torch.nn.Module],
    groups: Sequence[TLPOGroup],
    optimizer: torch.optim.Optimizer,
    *,
    kl_beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    num_iterations: int = 1,
    max_grad_norm: Optional[float] = 1.0,
    pad_id: int = 0,
    impl: str = "auto",
) -> Dict[str, float]:
    """One TLPO update on ``groups``: loss → backward → (clip) → ``optimizer.step()``.

    ``num_iterations = 1`` is the reference code's update (``ρ ≡ 1``). With ``num_iterations > 1``
    the same groups are reused for that many optimizer steps, ``old_logp`` being the candidates'
    log-probs before the first step, so the PPO clip bounds how far the reuse moves them.

    Returns the metrics of the first iteration (``loss`` plus ``tk.tlpo_loss``'s metrics) as floats.
    An empty ``groups`` returns ``{}`` without touching the optimizer.
    """
    if not groups:
        return {}
    device = next(policy.parameters()).device
    batch = collate_groups(groups, pad_id=pad_id, ignore_index=IGNORE_INDEX, device=device)
    was_training = policy.training
    policy.train()
    first: Dict[str, float] = {}
    try:
        # One step: old_logp = detached current (ρ ≡ 1, the reference code). Several: frozen before step 1.
        old_logp = _candidate_logp(policy, batch, IGNORE_INDEX, impl) if num_iterations > 1 else None
        for it in range(max(1, int(num_iterations))):
            out = tlpo_group_loss(policy, ref, batch, kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high,
                                  old_logp=old_logp, ignore_index=IGNORE_INDEX, impl=impl)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], max_grad_norm)
            optimizer.step()
            if it == 0:
                first = {"loss": float(out.loss.detach())}
                first.update({k: float(v) for k, v in out.metrics.items()})
    finally:
        policy.train(was_training)
    return first


def _candidate_logp(policy: torch.nn.Module, batch: Dict[str, torch.Tensor], ignore_index: int, impl: str
                    ) -> torch.Tensor:
    """Detached ``(G, K)`` log-probs of the candidates under the current policy (``old_logp``).

    The head goes through ``gathered_lm_head`` like the loss's, so a sharded head is read whole."""
    with torch.no_grad(), gathered_lm_head(policy) as head:
        stats = linear_vocab_stats(_rows(policy, batch), head.weight, batch["candidates"],
                                   ignore_index=ignore_index, impl=impl, **head.loss_kwargs())
    return stats.logp.detach()


# ----------------------------------------------------------------------------------------------
# transformers.Trainer wrapper (built lazily so that importing this module never imports transformers)

_TRAINER_CLASS = None


def _build_trainer_class():
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tokpo_kernels.integrations.tlpo_config import TLPOConfig

    def _as_tlpo_config(args: Any) -> "TLPOConfig":
        """``None`` → a default ``TLPOConfig`` (Trainer's default output dir); a plain ``TrainingArguments``
        → a ``TLPOConfig`` with the same values (its ``__post_init__`` runs again)."""
        if args is None:
            return TLPOConfig(output_dir="tmp_trainer")
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args: expected a TLPOConfig or a TrainingArguments, got {type(args).__name__}")
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
        return TLPOConfig(**values)

    class _RefreshReference(TrainerCallback):
        """Re-copy the policy's weights into the frozen reference at the start of every epoch."""

        def __init__(self, trainer: "Trainer") -> None:
            self.trainer = trainer

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.trainer.refresh_reference()
            return control

    class TLPOTrainer(Trainer):
        """TLPO on ``transformers.Trainer``: groups built on the fly from on-policy samples.

        ``train_dataset`` holds prompts: items ``{"prompt": str}`` or ``{"input_ids": [...]}`` (or
        bare strings). For every batch of prompts, :meth:`compute_loss`

        1. samples ``num_samples`` responses per prompt from the current policy (temperature
           ``sample_temperature``, eval mode, no grad; string prompts tokenised as ``prompt_format``
           says: the chat template when the tokenizer has one, else the tokenizer with its own
           special tokens),
        2. finds each response's first confusion point with the checker and explores
           ``num_candidates`` candidates at its update position, continued greedily for
           ``continue_tokens`` tokens and labelled ±1 (``build_groups``),
        3. returns ``tk.tlpo_loss`` on one policy hidden row per group, with the reference's hidden row
           for the k3 KL term (:func:`tlpo_group_loss`).

        Configuration: :class:`~tokpo_kernels.integrations.tlpo_config.TLPOConfig` (a
        ``TrainingArguments``; a plain one is converted). The method keywords below still work and
        fill the config, with a ``FutureWarning``; ``target`` given as a ``LanguageChecker`` object
        stays a keyword (it overrides ``args.target`` / ``args.ignore_ascii``). ``bf16=True`` /
        ``fp16=True``: sampling and both hidden-state forwards run under the trainer's autocast and the
        lm-head operands are cast to its dtype, as in the model's own forward.

        A batch without any informative group returns a zero loss (no parameter update beyond the
        optimizer's own, e.g. weight decay). The reference is a frozen deep copy of the policy made at
        construction (or ``ref_model``) and re-copied from the policy at the start of each epoch.

        What the logged ``loss`` is: ``tk.tlpo_loss``'s total ``−mean(S − kl_beta·KL)``. On the one
        update per batch that TLPO makes, ``ρ ≡ 1`` and the advantages of a group are centred (they
        sum to 0 over its candidates), so the surrogate part ``−mean(ρA)`` is ~0 *by construction*
        (its gradient is not: it moves probability towards the candidates with positive advantage),
        and the KL part is 0 at the start of every epoch (the reference was just copied from the
        policy). The parts are therefore logged separately, all under ``tlpo/``:
        ``tlpo/policy_loss`` (the surrogate part), ``tlpo/kl`` (the mean k3 KL to the reference) and
        ``tlpo/kl_penalty`` (``kl_beta × tlpo/kl``, the KL part of the loss), ``tlpo/clip_fraction``,
        ``tlpo/ratio/mean``, ``tlpo/logps/candidates``, ``tlpo/advantages/abs_mean``,
        ``tlpo/num_candidates``, and the sampler's ``tlpo/confusion_rate``, ``tlpo/groups``,
        ``tlpo/ascii_skipped_share`` (averaged between logging steps).

        Args (beyond ``transformers.Trainer``'s; ``processing_class`` must be the tokenizer):
            target: a ``LanguageChecker`` (else deprecated: set ``TLPOConfig.target``).
            ref_model: frozen reference (default: a deep copy of ``model``).
            num_samples, sample_temperature, max_new_tokens, num_candidates, continue_tokens, kl_beta,
            eps_low, eps_high, ignore_ascii, drop_uniform, impl: deprecated keywords of the
                ``TLPOConfig`` fields of the same names (``impl`` is ``loss_impl``).
        """

        def __init__(self, model=None, args=None, *, target: Any = UNSET,
                     ref_model: Optional[torch.nn.Module] = None, num_samples: Any = UNSET,
                     sample_temperature: Any = UNSET, max_new_tokens: Any = UNSET, num_candidates: Any = UNSET,
                     continue_tokens: Any = UNSET, kl_beta: Any = UNSET, eps_low: Any = UNSET,
                     eps_high: Any = UNSET, ignore_ascii: Any = UNSET, drop_uniform: Any = UNSET,
                     impl: Any = UNSET, data_collator=None, **kwargs: Any) -> None:
            checker = target if isinstance(target, LanguageChecker) else None
            keywords = dict(target=UNSET if checker is not None else target, num_samples=num_samples,
                            sample_temperature=sample_temperature, max_new_tokens=max_new_tokens,
                            num_candidates=num_candidates, continue_tokens=continue_tokens, kl_beta=kl_beta,
                            eps_low=eps_low, eps_high=eps_high, ignore_ascii=ignore_ascii,
                            drop_uniform=drop_uniform, loss_impl=impl)
            args = fill_config_from_keywords("TLPOTrainer", TLPOConfig, args, keywords, convert=_as_tlpo_config,
                                             stacklevel=3)
            if args.remove_unused_columns:
                args.remove_unused_columns = False  # the "prompt" column is not a model.forward argument
            if data_collator is None:
                data_collator = _prompt_collator
            super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
            if self.processing_class is None:
                raise ValueError("TLPOTrainer needs the tokenizer as processing_class=")
            self.checker = checker if checker is not None else \
                LanguageChecker(args.target, ignore_ascii=args.ignore_ascii)
            self.ref_model = frozen_reference(model) if ref_model is None else ref_model
            self.ref_model.eval().requires_grad_(False)
            self.ref_model.to(self.args.device)
            self.model_accepts_loss_kwargs = False
            self._tlpo_metrics: Dict[str, List[float]] = defaultdict(list)
            self.add_callback(_RefreshReference(self))

        @property
        def tlpo_kwargs(self) -> Dict[str, Any]:
            """``build_groups`` keywords from the config."""
            a = self.args
            return dict(num_samples=a.num_samples, temperature=a.sample_temperature, max_new_tokens=a.max_new_tokens,
                        num_candidates=a.num_candidates, continue_tokens=a.continue_tokens,
                        drop_uniform=a.drop_uniform, prompt_format=a.prompt_format,
                        add_special_tokens=a.add_special_tokens)

        @property
        def loss_kwargs(self) -> Dict[str, Any]:
            """``tlpo_group_loss`` keywords from the config."""
            a = self.args
            return dict(kl_beta=a.kl_beta, eps_low=a.eps_low, eps_high=a.eps_high, impl=a.loss_impl)

        def refresh_reference(self) -> None:
            """Copy the current policy weights into the reference (docs/methods.md §4: every epoch)."""
            policy = self.accelerator.unwrap_model(self.model)
            self.ref_model.load_state_dict(policy.state_dict())
            self.ref_model.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            policy = self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():  # sampling and exploration forwards, as DPOTrainer's generate
                groups, stats = build_groups(policy, self.processing_class, inputs["prompts"], self.checker,
                                             **self.tlpo_kwargs)
            for name in ("confusion_rate", "groups", "ascii_skipped_share"):
                self._tlpo_metrics[f"tlpo/{name}"].append(float(stats[name]))
            if not groups:
                loss = torch.zeros((), device=self.args.device, requires_grad=True)
                return (loss, None) if return_outputs else loss
            pad = tokenizer_pad_id(self.processing_class, default=0)
            out = tlpo_group_loss(model, self.ref_model, groups, pad_id=pad, forward_context=self.accelerator.autocast,
                                  head_dtype=autocast_head_dtype(self.accelerator, self.args.device),
                                  **self.loss_kwargs)
            for name, value in out.metrics.items():
                self._tlpo_metrics[f"tlpo/{name}"].append(float(value))
            if "kl" in out.metrics:
                self._tlpo_metrics["tlpo/kl_penalty"].append(self.args.kl_beta * float(out.metrics["kl"]))
            return (out.loss, out) if return_outputs else out.loss

        def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
            for name, values in self._tlpo_metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self._tlpo_metrics.clear()
            super().log(logs, *args, **kwargs)

    TLPOTrainer.__module__ = __name__
    TLPOTrainer.__qualname__ = "TLPOTrainer"
    _TRAINER_CLASS = TLPOTrainer
    return TLPOTrainer


def _prompt_collator(features: Sequence[Any]) -> Dict[str, Any]:
    """Pass prompts through untouched: ``{"prompts": [str | list[int], ...]}``."""
    prompts = []
    for f in features:
        if isinstance(f, dict):
            prompts.append(f["prompt"] if "prompt" in f else list(f["input_ids"]))
        else:
            prompts.append(f)
    return {"prompts": prompts}


def __getattr__(name: str) -> Any:
    if name == "TLPOTrainer":
        return _build_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
