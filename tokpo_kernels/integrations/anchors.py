"""TI-DPO anchors: a response sampled from the current policy for each prompt (METHODS.md §3).

The triplet term compares the chosen and rejected responses with an *anchor*: a fresh sample of
the policy for the same prompt. Defaults are the TI-DPO reference code's: top-k 50, top-p 0.95,
temperature 0.8, at most 64 new tokens. :func:`generate_anchors` returns the anchor sequences
right-padded, like TRL's preference batches, with labels ready for ``tk.tidpo_loss``::

    hidden = causal_lm_hidden_states(policy, a.input_ids, a.attention_mask)[:, :-1]
    tk.tidpo_loss(..., anchor_hidden=hidden, anchor_targets=a.labels[:, 1:], ...)

Prompt and padding labels are ``ignore_index``; generated tokens up to and including the first
EOS are labels; tokens after it are padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["AnchorBatch", "generate_anchors", "prompts_from_preference_batch"]


@dataclass
class AnchorBatch:
    """Right-padded anchor sequences ``[prompt | sampled response]``, one row per prompt.

    Attributes:
        input_ids: ``(B, T_a)`` long.
        attention_mask: ``(B, T_a)`` long, 1 on prompt and response tokens.
        labels: ``(B, T_a)`` long, the token id on response tokens, ``ignore_index`` elsewhere.
            Shift before the loss: ``targets = labels[:, 1:]`` for ``hidden[:, :-1]``.
        completion_mask: ``(B, T_a)`` long, 1 on response tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    completion_mask: torch.Tensor


def prompts_from_preference_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> list:
    """The prompts of a TRL 1.x preference batch (``[chosen; rejected]`` rows, right-padded).

    A prompt is the valid prefix of the chosen row before its first completion token (TRL builds
    both rows of a pair from the same ``prompt_ids``). Returns ``B`` 1-d long tensors.
    """
    pairs = input_ids.shape[0] // 2
    prompts = []
    for b in range(pairs):
        comp = completion_mask[b].nonzero()
        end = int(comp[0]) if comp.numel() else int(attention_mask[b].sum())
        valid = attention_mask[b, :end].to(torch.bool)
        prompts.append(input_ids[b, :end][valid])
    return prompts


def _eos_ids(model: nn.Module, eos_token_id: Union[int, Sequence[int], None]) -> list:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def generate_anchors(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    *,
    pad_token_id: int,
    eos_token_id: Union[int, Sequence[int], None] = None,
    max_new_tokens: int = 64,
    top_k: int = 50,
    top_p: float = 0.95,
    temperature: float = 0.8,
    do_sample: bool = True,
    ignore_index: int = -100,
    generation_kwargs: Optional[dict] = None,
) -> AnchorBatch:
    """Sample one response per prompt from ``model`` and return the right-padded :class:`AnchorBatch`.

    Prompts are left-padded for ``model.generate`` (the model is put in eval mode and under
    ``torch.no_grad()`` for the call; its training flag is restored), then every row is repacked
    as ``[prompt tokens | response tokens]`` and right-padded, so that positions match an ordinary
    unpadded forward.

    Args:
        model: the policy (``*ForCausalLM`` or ``PeftModel``; must have ``.generate``).
        prompts: ``B`` 1-d long tensors of prompt ids (no padding), e.g. from
            :func:`prompts_from_preference_batch`.
        pad_token_id: padding id of the tokenizer.
        eos_token_id: stop id(s); default the model's ``generation_config.eos_token_id``.
        max_new_tokens, top_k, top_p, temperature, do_sample: sampling (METHODS.md defaults).
        ignore_index: label of prompt and padding positions.
        generation_kwargs: extra keyword arguments for ``generate``.
    """
    if len(prompts) == 0:
        raise ValueError("generate_anchors: no prompts")
    device = prompts[0].device
    lengths = [int(p.numel()) for p in prompts]
    width = max(lengths)
    batch = len(prompts)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        if lengths[b]:
            ids[b, width - lengths[b]:] = p.to(device=device, dtype=torch.long)
            mask[b, width - lengths[b]:] = 1
    eos = _eos_ids(model, eos_token_id)

    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id, use_cache=True,
    )
    if do_sample:
        kwargs.update(top_k=top_k, top_p=top_p, temperature=temperature)
    if eos:
        kwargs["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    kwargs.update(generation_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        model.train(was_training)
    new = out[:, width:]

    rows, comp_lens = [], []
    for b in range(batch):
        gen = new[b]
        keep = gen.numel()
        if eos:
            hit = torch.isin(gen, torch.tensor(eos, device=gen.device)).nonzero()
            if hit.numel():
                keep = int(hit[0]) + 1  # keep the first EOS, drop what follows
        gen = gen[:keep]
        rows.append(torch.cat([prompts[b].to(device=device, dtype=torch.long), gen]))
        comp_lens.append(int(gen.numel()))
    total = max(int(r.numel()) for r in rows)
    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    completion_mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        n = int(r.numel())
        input_ids[b, :n] = r
        attention_mask[b, :n] = 1
        completion_mask[b, lengths[b]:n] = 1
    labels = input_ids.masked_fill(completion_mask == 0, ignore_index)
    return AnchorBatch(input_ids, attention_mask, labels, completion_mask)
