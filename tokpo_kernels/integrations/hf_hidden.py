"""Final hidden states and the lm-head of a Hugging Face causal LM, without computing the logits.

The losses of this library take the lm-head *inputs* (``hidden (…, D)``, ``weight (V, D)``, ``bias``)
and never materialise ``(tokens, V)`` logits. This module gets those inputs from any
``*ForCausalLM`` of ``transformers``:

- :func:`causal_lm_hidden_states` runs the model's *base* (the decoder stack plus its final norm:
  ``LlamaModel``, ``Qwen2Model``, ``Gemma2Model``, ``GPT2Model`` …) and returns
  ``last_hidden_state (B, T, D)``. The lm-head is never called.
- :func:`lm_head_params` returns :class:`LMHead` — the output embedding's weight (tied or not), its
  bias, Gemma-2/3's ``final_logit_softcapping`` as ``softcap`` and a Cohere/Granite-style constant
  logit ``scale``. With these, ``transform(h @ weight.T + bias)`` equals the model's own logits
  (``LMHead.logits`` spells that out; tests use it as the oracle).
- :func:`gathered_lm_head` is the same inside a context that gathers a sharded lm-head weight.

Model wrappers that are unwrapped: PEFT (``PeftModel`` → the base ``*ForCausalLM``; a LoRA adapter
*on the lm-head itself* is folded into the returned weight differentiably, a ``modules_to_save``
lm-head resolves to the active copy), and any ``.module`` wrapper (DDP, FSDP1, DeepSpeed engine).
For such a distributed wrapper, and for an FSDP2 (``fully_shard``) root,
:func:`causal_lm_hidden_states` routes the call through the wrapper's own ``__call__`` (the
"forward redirection" TRL and Lightning use), so its hooks (DDP gradient sync, FSDP
unshard/reshard and post-backward, ZeRO-3 fetch) run as for an ordinary forward.

Sharded lm-head weights (what :func:`gathered_lm_head` supports):

- **FSDP2** (``fully_shard``; parameters are ``DTensor``): ``weight.full_tensor()``, an all-gather
  that is differentiable (its backward reduce-scatters), so training through the loss works. This
  is what TRL 1.16 itself does for its fused heads.
- **DeepSpeed ZeRO-3** (parameters carry ``ds_id``): ``deepspeed.zero.GatheredParameters`` for the
  duration of the ``with`` block. The weight is valid only inside the block: use it for no-grad
  work (the reference model, evaluation), or run the loss's backward inside the block as well.
- **FSDP1** (the model is a ``FullyShardedDataParallel`` instance): ``summon_full_params`` on the
  wrapper (``writeback=False``), valid only inside the block, for no-grad use as above.
- Otherwise a passthrough (plain tensors, DDP, single device). ``deepspeed`` is imported only if
  installed and only when a parameter has ``ds_id``; nothing here is a hard dependency.

Importing this module imports ``torch`` only; ``transformers``/``peft`` are looked up by duck typing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from tokpo_kernels.distributed.sharded_weights import check_shard0_on_1d_mesh, gather_data_parallel
from tokpo_kernels.integrations._hf_utils import is_peft

__all__ = [
    "LMHead",
    "causal_lm_hidden_states",
    "frozen_lm_head",
    "gathered_lm_head",
    "lm_head_params",
    "unwrap_causal_lm",
]

# Attribute names under which *ForCausalLM classes keep their base model (decoder stack + final norm).
_BASE_ATTRS = ("model", "transformer", "gpt_neox", "language_model", "decoder", "backbone")
_WRAPPER_TYPES = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


@dataclass
class LMHead:
    """The output projection of a causal LM, in the form the losses take.

    The model's logits are ``softcap·tanh(s/softcap)`` (or ``s`` when ``softcap`` is None) with
    ``s = scale · (h @ weight.T + bias)``.

    Attributes:
        weight: ``(V, D)`` output-embedding weight (the input embedding when tied). Differentiable:
            it is the parameter itself (or base + LoRA delta for a LoRA-adapted lm-head).
        bias: ``(V,)`` or ``None``.
        softcap: Gemma-2/3 ``final_logit_softcapping`` (pass as ``softcap=``), else ``None``.
        scale: constant logit multiplier (Cohere ``logit_scale``; ``1/logits_scaling`` for
            Granite), 1.0 for almost every model. Fold it into the losses' ``temperature`` with
            :meth:`temperature`.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    scale: float = 1.0

    def temperature(self, temperature: float = 1.0) -> float:
        """The ``temperature=`` to pass to a loss so that it sees ``logits / temperature``.

        Folds :attr:`scale` in (``temperature / scale``). Raises if both a scale and a softcap are
        set (no released model does that; the losses apply softcap before temperature).
        """
        if self.scale == 1.0:
            return float(temperature)
        if self.softcap is not None:
            raise NotImplementedError("an lm-head with both a logit scale and a softcap is not supported")
        return float(temperature) / float(self.scale)

    def loss_kwargs(self, temperature: float = 1.0) -> dict:
        """``dict(bias=…, softcap=…, temperature=…)`` for the policy side of a loss call."""
        return {"bias": self.bias, "softcap": self.softcap, "temperature": self.temperature(temperature)}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits from ``hidden`` (materialises them: for tests and small debugging only)."""
        z = torch.nn.functional.linear(hidden, self.weight.to(hidden.dtype),
                                       None if self.bias is None else self.bias.to(hidden.dtype))
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def _is_distributed_wrapper(model: nn.Module) -> bool:
    return type(model).__name__ in _WRAPPER_TYPES and isinstance(getattr(model, "module", None), nn.Module)


def _is_fsdp2(model: nn.Module) -> bool:
    """A module sharded in place by FSDP2's ``fully_shard`` (its class is ``FSDP<Original>``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside DDP / FSDP1 / DeepSpeed-engine / PEFT wrappers (any nesting).

    PEFT prompt-learning adapters (virtual tokens) are rejected with ``NotImplementedError``.
    """
    for _ in range(16):
        if _is_distributed_wrapper(model):
            model = model.module
        elif is_peft(model):
            active = getattr(model, "active_peft_config", None)
            if getattr(active, "is_prompt_learning", False):
                raise NotImplementedError(
                    "prompt-learning PEFT adapters (prompt/prefix/p-tuning) add virtual tokens in PeftModel.forward, "
                    "which the hidden-state path bypasses; use LoRA-style adapters"
                )
            model = model.get_base_model()
        else:
            return model
    raise RuntimeError("unwrap_causal_lm: wrapper nesting deeper than 16 levels")


def _config_value(config: Any, name: str) -> Any:
    """``config.name``, else ``config.text_config.name`` / ``get_text_config()`` (multimodal configs)."""
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is not None:
        return value
    text = getattr(config, "text_config", None)
    if text is None and callable(getattr(config, "get_text_config", None)):
        try:
            text = config.get_text_config()
        except Exception:  # pragma: no cover - exotic configs
            text = None
    if text is not None and text is not config:
        return getattr(text, name, None)
    return None


def _resolve_linear(module: nn.Module) -> tuple:
    """``(weight, bias)`` of an output projection, resolving PEFT wrappers around it."""
    # PEFT modules_to_save: the active trainable copy, or the original when adapters are disabled.
    if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        active = list(getattr(module, "active_adapters", []) or [])
        if active and not getattr(module, "disable_adapters", False) and active[0] in module.modules_to_save:
            return _resolve_linear(module.modules_to_save[active[0]])
        return _resolve_linear(module.original_module)
    # PEFT LoRA layer on the lm-head itself: W + Σ ΔW over the active, unmerged adapters.
    is_lora = hasattr(module, "base_layer") and hasattr(module, "lora_A")
    if is_lora and callable(getattr(module, "get_delta_weight", None)):
        weight, bias = _resolve_linear(module.base_layer)
        if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            return weight, bias
        for name in getattr(module, "active_adapters", []) or []:
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name, False):
                raise NotImplementedError("a DoRA adapter on the lm-head is not supported; merge it first")
            weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, bias
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"lm_head_params: the output embedding is a {type(module).__name__} without a 2-d weight; "
            "only linear output projections are supported"
        )
    return weight, getattr(module, "bias", None)


def lm_head_params(model: nn.Module) -> LMHead:
    """The lm-head of any ``*ForCausalLM`` (possibly PEFT/DDP/FSDP/DeepSpeed-wrapped) as :class:`LMHead`.

    Uses ``model.get_output_embeddings()``, so tied embeddings (GPT-2, Gemma, small Qwen/Llama)
    return the shared input-embedding parameter. The weight may be sharded (ZeRO-3: ``numel 0``;
    FSDP2: a ``DTensor``); use :func:`gathered_lm_head` when it can be.
    """
    inner = unwrap_causal_lm(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        head = getattr(inner, "lm_head", None)
    if head is None:
        raise ValueError(
            f"lm_head_params: {type(inner).__name__} has no output embedding (get_output_embeddings() is None); "
            "pass a *ForCausalLM model"
        )
    weight, bias = _resolve_linear(head)
    config = getattr(inner, "config", None)
    softcap = _config_value(config, "final_logit_softcapping")
    scale = 1.0
    logit_scale = _config_value(config, "logit_scale")  # Cohere: logits * logit_scale
    if logit_scale is not None:
        scale *= float(logit_scale)
    logits_scaling = _config_value(config, "logits_scaling")  # Granite: logits / logits_scaling
    if logits_scaling is not None:
        scale /= float(logits_scaling)
    return LMHead(weight=weight, bias=bias, softcap=None if softcap is None else float(softcap), scale=scale)


def _base_model(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack + final norm of a ``*ForCausalLM`` (``LlamaModel``, ``GPT2Model`` …)."""
    prefix = getattr(causal_lm, "base_model_prefix", None)
    candidates = ([prefix] if isinstance(prefix, str) and prefix else []) + list(_BASE_ATTRS)
    head = causal_lm.get_output_embeddings() if callable(getattr(causal_lm, "get_output_embeddings", None)) else None
    for name in candidates:
        sub = getattr(causal_lm, name, None) if name in dict(causal_lm.named_children()) else None
        if isinstance(sub, nn.Module) and sub is not head:
            return sub
    get_decoder = getattr(causal_lm, "get_decoder", None)
    if callable(get_decoder):
        sub = get_decoder()
        if isinstance(sub, nn.Module) and sub is not causal_lm:
            return sub
    raise ValueError(
        f"causal_lm_hidden_states: cannot find the base model of {type(causal_lm).__name__} "
        f"(looked for attributes {candidates} and get_decoder())"
    )


def _run_base(causal_lm: nn.Module, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
    base = _base_model(causal_lm)
    kwargs = dict(model_kwargs)
    kwargs.setdefault("use_cache", False)
    kwargs.setdefault("return_dict", True)
    for drop in ("labels", "logits_to_keep", "num_logits_to_keep", "output_hidden_states"):
        kwargs.pop(drop, None)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    out = base(**kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def causal_lm_hidden_states(
    model: nn.Module,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Final hidden states ``(B, T, D)`` (after the final norm) of a causal LM, logits never computed.

    Runs the base model (``model.model`` / ``model.transformer`` / ``base_model_prefix`` /
    ``get_decoder()``) of the unwrapped ``*ForCausalLM`` — Llama, Mistral, Qwen2/3, Gemma2/3,
    GPT-2 and any model following the ``transformers`` layout. ``hidden @ weight.T`` (with
    :func:`lm_head_params`'s bias, scale and softcap) equals the model's own logits.

    PEFT models run through their LoRA-injected layers (adapters active as in ``model(...)``). A
    distributed wrapper (DDP, FSDP1, DeepSpeed engine) or an FSDP2 (``fully_shard``) root is
    called through its own ``__call__`` with the inner module's ``forward`` temporarily
    redirected, so its hooks run.

    Args:
        model: a ``*ForCausalLM`` or a wrapper of one.
        input_ids: ``(B, T)`` token ids (or ``None`` with ``inputs_embeds=`` in ``model_kwargs``).
        attention_mask: ``(B, T)`` or ``None``.
        **model_kwargs: passed to the base model's forward (``position_ids``, ``inputs_embeds``,
            ``pixel_values`` for multimodal bases …). ``use_cache`` defaults to False; ``labels``
            and ``logits_to_keep`` are dropped.
    """
    if _is_distributed_wrapper(model) or _is_fsdp2(model):
        # Route through the wrapper's __call__ so its hooks run (DDP sync, FSDP unshard/reshard and
        # post-backward registration on the returned tensor, ZeRO-3 fetch).
        inner = model.module if _is_distributed_wrapper(model) else model
        had_instance_forward = "forward" in inner.__dict__
        original_forward = inner.forward

        def restore() -> None:
            if had_instance_forward:
                inner.forward = original_forward
            else:
                inner.__dict__.pop("forward", None)

        def redirected(*_args: Any, **_kwargs: Any) -> torch.Tensor:
            restore()  # first: the base model may call forward itself
            return _run_base(unwrap_causal_lm(inner), input_ids, attention_mask, model_kwargs)

        inner.forward = redirected
        try:
            return model()
        finally:
            restore()
    return _run_base(unwrap_causal_lm(model), input_ids, attention_mask, model_kwargs)


def _deepspeed_params(params: list) -> list:
    return [p for p in params if p is not None and hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered_lm_head(model: nn.Module) -> Iterator[LMHead]:
    """Context manager yielding :func:`lm_head_params` with a sharded weight gathered.

    - FSDP2 ``DTensor`` weight/bias: gathered by ``gather_data_parallel`` (differentiable; usable
      for training: the gather's backward reduce-scatters the gradient and averages it over the
      mesh, as FSDP2 does for the gradients it reduces itself).
    - DeepSpeed ZeRO-3 (the parameter has ``ds_id``): gathered with
      ``deepspeed.zero.GatheredParameters`` for the block (skipped when already available, e.g.
      tied embeddings inside a forward). Valid only inside the block.
    - FSDP1 (``model`` is a ``FullyShardedDataParallel``): ``summon_full_params(model,
      writeback=False)`` for the block; valid only inside it.
    - Anything else: a passthrough.

    Only no-grad use (reference model, evaluation) is supported for ZeRO-3 and FSDP1 unless the
    caller also runs the backward inside the block.
    """
    head = lm_head_params(model)
    params = [head.weight, head.bias]
    ds = _deepspeed_params(params)
    with contextlib.ExitStack() as stack:
        if ds:
            import deepspeed  # only reachable when deepspeed partitioned the parameter

            try:
                from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

                ds = [p for p in ds if getattr(p, "ds_status", None) != ZeroParamStatus.AVAILABLE]
            except ImportError:  # pragma: no cover - old deepspeed
                pass
            unique = list({id(p): p for p in ds}.values())
            if unique:
                stack.enter_context(deepspeed.zero.GatheredParameters(unique, modifier_rank=None))
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "summon_full_params"):
            stack.enter_context(type(model).summon_full_params(model, writeback=False, recurse=True))
            head = lm_head_params(model)  # re-read: views into the gathered flat parameter
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor (FSDP2)
            check_shard0_on_1d_mesh("lm-head weight", weight)
            weight = gather_data_parallel(weight)
        if bias is not None and hasattr(bias, "full_tensor"):
            check_shard0_on_1d_mesh("lm-head bias", bias)
            bias = gather_data_parallel(bias)
        yield LMHead(weight=weight, bias=bias, softcap=head.softcap, scale=head.scale)


def frozen_lm_head(model: nn.Module) -> LMHead:
    """A detached :class:`LMHead` for a frozen model (the reference), valid after the call returns.

    Gathers like :func:`gathered_lm_head`; when the weight had to be gathered by a context
    (ZeRO-3, FSDP1) it is copied out (``clone``), because the loss's backward recomputes reference
    probabilities from it after the context has re-sharded the parameter. Otherwise the detached
    parameter is returned without a copy.
    """
    raw = lm_head_params(model)
    sharded = bool(_deepspeed_params([raw.weight, raw.bias])) or type(model).__name__ == "FullyShardedDataParallel"
    with gathered_lm_head(model) as head:
        weight = head.weight.detach()
        bias = None if head.bias is None else head.bias.detach()
        if sharded:
            weight = weight.clone()
            bias = None if bias is None else bias.clone()
    return LMHead(weight=weight, bias=bias, softcap=head.softcap, scale=head.scale)
