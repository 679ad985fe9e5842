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
from collections import defaultdict
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Union

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels.functional import linear_vocab_stats
from tokpo_kernels.integrations._hf_utils import IGNORE_INDEX, pad_right, tokenizer_pad_id
from tokpo_kernels.integrations.hf_hidden import causal_lm_hidden_states, gathered_lm_head
from tokpo_kernels.integrations.tlpo_explore import TLPOGroup, build_groups
from tokpo_kernels.integrations.tlpo_language import LanguageChecker, Target
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


def _rows(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = causal_lm_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["positions"]]


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
) -> LossOutput:
    """``tk.tlpo_loss`` on one hidden row per group (policy with grad, reference without).

    Args:
        policy: the ``*ForCausalLM`` being trained (any wrapper ``causal_lm_hidden_states`` accepts).
        ref: the frozen reference model, or ``None`` (then ``kl_beta`` must be 0).
        groups: a list of :class:`TLPOGroup` or a batch from :func:`collate_groups`.
        kl_beta, eps_low, eps_high, old_logp, impl: passed to ``tk.tlpo_loss``.

    The policy forward covers the prefixes only (``G`` sequences, not ``G·K``); the lm-head enters
    through ``tlpo_loss`` (``linear_vocab_stats``), so no ``(tokens, V)`` logits are formed.
    """
    device = next(policy.parameters()).device
    batch = groups if isinstance(groups, dict) else collate_groups(groups, pad_id=pad_id,
                                                                    ignore_index=ignore_index, device=device)
    hidden = _rows(policy, batch)
    ref_kw: Dict[str, Optional[torch.Tensor]] = {}
    ref_ctx: ContextManager = contextlib.nullcontext()
    if ref is not None:
        with torch.no_grad():
            ref_kw["ref_hidden"] = _rows(ref, batch)
        # The reference only enters the (no-grad) forward statistics, computed inside this call, so
        # its possibly sharded lm-head is gathered just for it.
        ref_ctx = gathered_lm_head(ref)
    # The policy's head is gathered like the TDPO/TI-DPO trainers' (an FSDP2 DTensor with its
    # gradient averaged over the mesh); a bare full_tensor() would keep each rank's own gradient.
    with gathered_lm_head(policy) as head, ref_ctx as ref_head:
        if ref_head is not None:
            ref_kw["ref_weight"] = ref_head.weight.detach()
            ref_kw["ref_bias"] = None if ref_head.bias is None else ref_head.bias.detach()
        return tlpo_loss(
            hidden, head.weight, batch["candidates"], batch["advantages"], **ref_kw,
            old_logp=old_logp, kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high,
            ignore_index=ignore_index, impl=impl, **head.loss_kwargs(),
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
    from transformers import Trainer, TrainerCallback

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
           ``sample_temperature``, eval mode, no grad),
        2. finds each response's first confusion point with the checker and explores
           ``num_candidates`` candidates at its update position, continued greedily for
           ``continue_tokens`` tokens and labelled ±1 (``build_groups``),
        3. returns ``tk.tlpo_loss`` on one policy hidden row per group, with the reference's hidden row
           for the k3 KL term (:func:`tlpo_group_loss`).

        A batch without any informative group returns a zero loss (no parameter update beyond the
        optimizer's own, e.g. weight decay). The reference is a frozen deep copy of the policy made at
        construction (or ``ref_model``) and re-copied from the policy at the start of each epoch.
        Logged metrics (averaged between logging steps): ``tk.tlpo_loss``'s (``policy_loss``, ``kl``,
        ``clip_fraction``, ``ratio/mean``, ``logps/candidates``, ``advantages/abs_mean``,
        ``num_candidates``) and the sampler's ``tlpo/confusion_rate``, ``tlpo/groups``.

        Args (beyond ``transformers.Trainer``'s; ``processing_class`` must be the tokenizer):
            target: target language/script or a ``LanguageChecker``.
            ref_model: frozen reference (default: a deep copy of ``model``).
            num_samples, sample_temperature, max_new_tokens: on-policy sampling (reference 8, 0.6).
            num_candidates, continue_tokens: exploration (reference 16, 3).
            kl_beta, eps_low, eps_high: ``tk.tlpo_loss`` (reference 0.04, 0.2, 0.2).
            ignore_ascii, drop_uniform: see ``LanguageChecker`` / ``build_groups``.
            impl: ``linear_vocab_stats`` implementation.
        """

        def __init__(self, model=None, args=None, *, target: Union[Target, LanguageChecker] = "ko",
                     ref_model: Optional[torch.nn.Module] = None, num_samples: int = 8,
                     sample_temperature: float = 0.6, max_new_tokens: int = 64, num_candidates: int = 16,
                     continue_tokens: int = 3, kl_beta: float = 0.04, eps_low: float = 0.2,
                     eps_high: float = 0.2, ignore_ascii: bool = True, drop_uniform: bool = True,
                     impl: str = "auto", data_collator=None, **kwargs: Any) -> None:
            if data_collator is None:
                data_collator = _prompt_collator
            if args is not None and getattr(args, "remove_unused_columns", False):
                args.remove_unused_columns = False  # the "prompt" column is not a model.forward argument
            super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
            if self.processing_class is None:
                raise ValueError("TLPOTrainer needs the tokenizer as processing_class=")
            self.checker = target if isinstance(target, LanguageChecker) else \
                LanguageChecker(target, ignore_ascii=ignore_ascii)
            self.ref_model = frozen_reference(model) if ref_model is None else ref_model
            self.ref_model.eval().requires_grad_(False)
            self.ref_model.to(self.args.device)
            self.tlpo_kwargs = dict(num_samples=num_samples, temperature=sample_temperature,
                                    max_new_tokens=max_new_tokens, num_candidates=num_candidates,
                                    continue_tokens=continue_tokens, drop_uniform=drop_uniform)
            self.loss_kwargs = dict(kl_beta=kl_beta, eps_low=eps_low, eps_high=eps_high, impl=impl)
            self.model_accepts_loss_kwargs = False
            self._tlpo_metrics: Dict[str, List[float]] = defaultdict(list)
            self.add_callback(_RefreshReference(self))

        def refresh_reference(self) -> None:
            """Copy the current policy weights into the reference (docs/methods.md §4: every epoch)."""
            policy = self.accelerator.unwrap_model(self.model)
            self.ref_model.load_state_dict(policy.state_dict())
            self.ref_model.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            policy = self.accelerator.unwrap_model(model)
            groups, stats = build_groups(policy, self.processing_class, inputs["prompts"], self.checker,
                                         **self.tlpo_kwargs)
            self._tlpo_metrics["tlpo/confusion_rate"].append(stats["confusion_rate"])
            self._tlpo_metrics["tlpo/groups"].append(stats["groups"])
            if not groups:
                loss = torch.zeros((), device=self.args.device, requires_grad=True)
                return (loss, None) if return_outputs else loss
            pad = tokenizer_pad_id(self.processing_class, default=0)
            out = tlpo_group_loss(model, self.ref_model, groups, pad_id=pad, **self.loss_kwargs)
            for name, value in out.metrics.items():
                self._tlpo_metrics[name].append(float(value))
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
