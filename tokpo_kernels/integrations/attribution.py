"""TI-DPO token-importance attribution (arXiv 2505.19653; docs/methods.md §3, step 1).

    I_i = ‖∂ L_target / ∂ e_i‖₁,   L_target = max_v z_{last, v}

the L1 norm over the hidden dimension of the gradient, with respect to the input token embedding
``e_i``, of the largest logit at the row's last non-pad position. One extra forward + backward
through the policy, in eval mode (dropout off; the previous training mode is restored), with
``torch.autograd.grad`` taken with respect to the embeddings only: no parameter ``.grad`` is
written or accumulated. Only the last position's logits are formed (``(rows, V)``); every other
position stays in hidden space.

:func:`importance_token_weights` turns the scores into the ``token_weights`` that
``tk.tidpo_loss`` takes, **aligned with the shifted targets**: for sequences ``input_ids (R, T)``
the loss sees ``hidden[:, :-1]`` predicting ``targets = labels[:, 1:]``; the weight of the label
token ``y_t`` (hidden position ``t``) is the importance weight of *input* position ``t + 1``,
i.e. ``token_weights = w[:, 1:]`` of shape ``(R, T − 1)``.

Rows are independent (eval mode, no batch-coupled layers), so one pass over the whole
``[chosen; rejected]`` batch yields every row's gradient: the per-row targets are summed before
the backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

import tokpo_kernels as tk
from tokpo_kernels.integrations._hf_utils import eval_mode
from tokpo_kernels.integrations.hf_hidden import causal_lm_hidden_states, gathered_lm_head, unwrap_causal_lm

__all__ = ["importance_scores", "importance_token_weights", "last_valid_index"]


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(R,)`` index of the last position with ``attention_mask == 1`` (left or right padding).

    A row without any valid position maps to 0.
    """
    m = attention_mask.to(torch.bool)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.zeros_like(positions)).amax(dim=-1)


def importance_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Attribution scores ``I (R, T)`` for every input token (docs/methods.md §3 step 1).

    Args:
        model: the policy (a ``*ForCausalLM``, PEFT-wrapped or not). Temporarily put in eval mode;
            its training flag is restored, no parameter receives a ``.grad``.
        input_ids: ``(R, T)`` token ids, any padding side.
        attention_mask: ``(R, T)``; ``None`` means every position is valid.
        **model_kwargs: extra base-model inputs (``position_ids`` …).

    Returns:
        ``(R, T)`` fp32, detached, ``≥ 0``; exactly 0 at padding positions (``attention_mask == 0``).
        Works under an outer ``torch.no_grad()`` (gradients are re-enabled locally).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inner = unwrap_causal_lm(model)
    embed = inner.get_input_embeddings()
    with eval_mode(model, grad=True):
        embeds = embed(input_ids).detach().requires_grad_(True)
        hidden = causal_lm_hidden_states(inner, None, attention_mask, inputs_embeds=embeds, **model_kwargs)
        hidden = hidden[:, -input_ids.shape[1]:]  # prompt-learning PEFT prepends virtual tokens
        last = last_valid_index(attention_mask)
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (R, D)
        with gathered_lm_head(inner) as head:
            z = head.logits(h_last)  # (R, V): the last position only
            target = z.float().amax(dim=-1).sum()
            (grad,) = torch.autograd.grad(target, embeds, allow_unused=False)
    scores = grad.detach().float().abs().sum(dim=-1)
    return torch.where(attention_mask.to(torch.bool), scores, torch.zeros_like(scores))


def importance_token_weights(
    scores: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: Optional[torch.Tensor] = None,
    *,
    lam: float = 0.7,
    sigma_div: float = 4.0,
    span: str = "all",
) -> torch.Tensor:
    """``token_weights (R, T − 1)`` for ``tk.tidpo_loss``, aligned with ``targets = labels[:, 1:]``.

    ``w = tk.token_importance_weights(scores, span_mask, lam=, sigma_div=)`` over the input positions,
    then ``w[:, 1:]``: the weight of label token ``y_t`` at hidden position ``t`` is the weight of
    input position ``t + 1`` (the token being predicted).

    Args:
        scores: ``(R, T)`` from :func:`importance_scores`.
        attention_mask: ``(R, T)`` valid (non-pad) tokens.
        completion_mask: ``(R, T)`` response tokens; needed for ``span="response"``.
        lam, sigma_div: mixing weight and prior width divisor (paper 0.7 / 4; reference code 0.2 / 8).
        span: ``"all"`` — every non-pad token (the reference code) — or ``"response"`` — response
            tokens only. Prompt positions get weight 0 in ``"response"`` mode; they are ignored by
            the loss anyway (their labels are ``ignore_index``).
    """
    if span == "all":
        mask = attention_mask.to(torch.bool)
    elif span == "response":
        if completion_mask is None:
            raise ValueError("importance_token_weights: span='response' needs completion_mask")
        mask = attention_mask.to(torch.bool) & completion_mask.to(torch.bool)
    else:
        raise ValueError(f"span: expected 'all' or 'response', got {span!r}")
    w = tk.token_importance_weights(scores, mask, lam=lam, sigma_div=sigma_div)
    return w[:, 1:]
