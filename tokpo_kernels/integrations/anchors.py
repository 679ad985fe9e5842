"""TI-DPO anchors: a response sampled from the current policy for each prompt (docs/methods.md §3).

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

from tokpo_kernels.integrations._hf_utils import IGNORE_INDEX, eos_ids, eval_mode, pad_left, pad_right

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
    ignore_index: int = IGNORE_INDEX,
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
        max_new_tokens, top_k, top_p, temperature, do_sample: sampling (docs/methods.md defaults).
        ignore_index: label of prompt and padding positions.
        generation_kwargs: extra keyword arguments for ``generate``.
    """
    if len(prompts) == 0:
        raise ValueError("generate_anchors: no prompts")
    device = prompts[0].device
    lengths = [int(p.numel()) for p in prompts]
    ids, mask = pad_left(prompts, pad_token_id, device)
    width = ids.shape[1]
    eos = eos_ids(model, eos_token_id)

    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id, use_cache=True,
    )
    if do_sample:
        kwargs.update(top_k=top_k, top_p=top_p, temperature=temperature)
    if eos:
        kwargs["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    kwargs.update(generation_kwargs or {})
    with eval_mode(model):
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out[:, width:]

    rows = []
    for b in range(len(prompts)):
        gen = new[b]
        keep = gen.numel()
        if eos:
            hit = torch.isin(gen, torch.tensor(eos, device=gen.device)).nonzero()
            if hit.numel():
                keep = int(hit[0]) + 1  # keep the first EOS, drop what follows
        gen = gen[:keep]
        rows.append(torch.cat([prompts[b].to(device=device, dtype=torch.long), gen]))
    input_ids, attention_mask = pad_right(rows, pad_token_id, device)
    completion_mask = attention_mask.clone()
    for b, n in enumerate(lengths):
        completion_mask[b, :n] = 0  # the prompt
    labels = input_ids.masked_fill(completion_mask == 0, ignore_index)
    return AnchorBatch(input_ids, attention_mask, labels, completion_mask)
