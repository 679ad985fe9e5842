"""Token-level PPO / GRPO on lm-head statistics (docs/methods.md §5).

The clipped importance-ratio objective with a k3 KL penalty to a reference and an optional entropy
bonus, with the sequence normalisations of TRL's ``GRPOTrainer`` (``grpo``, ``dapo``, ``dr_grpo``).
The policy log-probs (and the entropy) come from one ``linear_vocab_stats`` pass; the reference
log-probs either from the same pass (reference hidden states) or precomputed. No kernel is added.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import (
    check_choice,
    check_float_tensor,
    check_number,
    check_shape,
    check_tensor,
    resolve_reference,
)
from tokpo_kernels.losses._common import detached_metrics, masked_count, masked_mean, masked_sum
from tokpo_kernels.losses._options import HeadOptions, loss_function
from tokpo_kernels.losses._policy_gradient import clipped_surrogate, k3_kl, kl_coefficient, reference_logp

__all__ = ["PPO_LOSS_TYPES", "ppo_loss"]

PPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def _as_sequences(name: str, h: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """``(B, T, D)`` as is; ``(B·T, D)`` (Liger's flattened layout) reshaped to ``(B, T, D)``."""
    if h.dim() == 3 and tuple(h.shape[:2]) == (b, t):
        return h
    if h.dim() == 2 and h.shape[0] == b * t:
        return h.reshape(b, t, h.shape[1])
    raise ValueError(
        f"{name}: expected shape (B, T, D) = ({b}, {t}, D) or flattened (B*T, D) = ({b * t}, D) to match "
        f"targets (B, T) = ({b}, {t}), got {tuple(h.shape)}"
    )


@loss_function("PPOLoss", docs={"temperature": "``> 0``; divides the logits of policy and reference (as TRL does)."})
def ppo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None, ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    *,
    ref_logp: Optional[torch.Tensor] = None, beta: float = 0.04,
    eps_low: float = 0.2, eps_high: float = 0.2, entropy_coef: float = 0.0,
    loss_type: str = "grpo", max_tokens: Optional[int] = None,
    head: HeadOptions,
    kl_beta: Optional[float] = None,
) -> LossOutput:
    """Token-level clipped policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO).

    Per valid token ``t`` of sequence ``b`` (``ℓ_t = log p(y_t)``, ``m_t`` the non-ignored mask)::

        ρ_t  = exp(ℓ_t − ℓ_old,t)
        S_t  = min(ρ_t A_t, clip(ρ_t, 1 − eps_low, 1 + eps_high) A_t)
        KL_t = exp(ℓ_ref,t − ℓ_t) − (ℓ_ref,t − ℓ_t) − 1                        (k3 estimator)
        L_t  = −S_t + beta · KL_t − entropy_coef · H_t

    reduced as in TRL's ``GRPOTrainer`` / Liger's ``LigerFusedLinearGRPOLoss``:

        grpo:    (1/B) Σ_b (Σ_t m L_t) / max(Σ_t m, 1)      (fully ignored rows still count in B)
        dapo:    Σ_{b,t} m L_t / max(Σ_{b,t} m, 1)
        dr_grpo: Σ_{b,t} m L_t / (B · max_tokens)           (max_tokens defaults to T)

    Defaults: ``beta = 0.04`` (DeepSeekMath's GRPO value; Liger's default and TRL's former one —
    recent TRL defaults to 0), ``eps_low = eps_high = 0.2`` (PPO/GRPO), ``loss_type = "grpo"`` (the
    GRPO paper's per-sequence mean); the entropy bonus is off (``entropy_coef = 0``). ``old_logp=None``
    uses the detached current log-probs (TRL/Liger with one update per generation), so ``ρ ≡ 1``
    and the loss gradient is the plain policy gradient.

    Args:
        hidden: ``(B, T, D)`` policy hidden states (or flattened ``(B·T, D)``); position ``t``
            predicts ``targets[b, t]`` (the caller shifts).
        weight: ``(V, D)`` lm-head weight.
        targets: ``(B, T)`` sampled token ids; prompt/padding tokens are ``ignore_index``.
        advantages: per token ``(B, T)``, or per sequence ``(B,)`` broadcast over the tokens of the
            sequence (GRPO's group-normalised rewards). No gradient flows into them.
        old_logp: optional ``(B, T)`` log-probs of the sampling policy.
        ref_hidden, ref_weight: the reference model's ``(B, T, D_ref)`` hidden states and
            ``(V, D_ref)`` weight (no gradient), or
        ref_logp: precomputed ``(B, T)`` reference log-probs (giving both is an error).
            With ``beta > 0`` one of the two is required; with ``beta = 0`` it is optional.
        beta: KL coefficient, ``>= 0``. ``kl_beta`` (TLPO's name) is accepted as an alias.
        eps_low, eps_high: clip range ``[1 − eps_low, 1 + eps_high]`` (``>= 0``; DAPO's
            clip-higher uses ``eps_high = 0.28``).
        entropy_coef: entropy-bonus coefficient ``>= 0``; when ``> 0`` the policy entropy is computed
            in the same statistics pass (``entropy=True``) and differentiated.
        loss_type: ``"grpo"``, ``"dapo"`` or ``"dr_grpo"`` (see above).
        max_tokens: the ``dr_grpo`` constant (TRL's ``max_completion_length``), a positive int;
            defaults to ``T``. Ignored by the other loss types.
        kl_beta: alias of ``beta`` (``None``: not given); both may be given only with one value.

    Returns:
        ``LossOutput(loss, metrics)``; metrics are detached scalars averaged over all valid tokens
        of the batch (Liger's convention):

        * ``"kl"`` — mean k3 KL (only when a reference is available);
        * ``"clip_ratio"`` — fraction of tokens whose clipped branch is active
          (``clip_ratio/low``: ``ρ < 1 − eps_low`` and ``A < 0``; ``clip_ratio/high``:
          ``ρ > 1 + eps_high`` and ``A > 0``; TRL's/Liger's definition);
        * ``"clip_ratio/low"``, ``"clip_ratio/high"``;
        * ``"entropy"`` — mean policy entropy (only when ``entropy_coef > 0``).

    Raises:
        TypeError / ValueError: on bad arguments, naming expected vs received.
    """
    targets = check_tensor("targets", targets)
    hidden = check_float_tensor("hidden", hidden)
    advantages = check_float_tensor("advantages", advantages)
    if targets.dim() != 2:
        raise ValueError(f"targets: expected shape (B, T), got {tuple(targets.shape)}")
    b, t = int(targets.shape[0]), int(targets.shape[1])
    hidden = _as_sequences("hidden", hidden, b, t)
    if advantages.dim() == 1:
        check_shape("advantages", advantages, (b,), f"per sequence, or ({b}, {t}) per token")
    else:
        check_shape("advantages", advantages, (b, t), f"per token, or ({b},) per sequence")
    if old_logp is not None:
        check_shape("old_logp", check_float_tensor("old_logp", old_logp), (b, t), "like targets")
    if ref_logp is not None:
        check_shape("ref_logp", check_float_tensor("ref_logp", ref_logp), (b, t), "like targets")
    beta = kl_coefficient("beta", beta, 0.04, "kl_beta", kl_beta)
    eps_low = check_number("eps_low", eps_low, ge=0.0)
    eps_high = check_number("eps_high", eps_high, ge=0.0)
    entropy_coef = check_number("entropy_coef", entropy_coef, ge=0.0)
    loss_type = check_choice("loss_type", loss_type, PPO_LOSS_TYPES)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens: expected a positive int (or None for T={t}), got {max_tokens!r}")
    source = resolve_reference("ppo_loss", ref_hidden, ref_weight, ref_logp,
                               required=f"beta={beta} > 0" if beta > 0 else None,
                               hint="use beta=0.0 to train without the KL penalty")
    if ref_hidden is not None:
        ref_hidden = _as_sequences("ref_hidden", check_float_tensor("ref_hidden", ref_hidden), b, t)

    use_entropy = entropy_coef > 0
    stats = head.stats(hidden, weight, targets, ref_hidden, ref_weight, entropy=use_entropy)
    logp = stats.logp
    mask = stats.mask
    dt = logp.dtype
    adv = advantages.detach().to(dt)
    if adv.dim() == 1:
        adv = adv[:, None].expand(b, t)
    adv = torch.where(mask, adv, logp.new_zeros(()))
    surrogate = clipped_surrogate(logp, old_logp, adv, mask, eps_low, eps_high)
    per_token = -surrogate.value
    ref = reference_logp(source, stats, ref_logp)
    kl = None if ref is None else k3_kl(logp, ref, mask)
    if kl is not None and beta != 0.0:
        per_token = per_token + beta * kl
    if use_entropy:
        per_token = per_token - entropy_coef * stats.entropy

    count = masked_count(mask, None, dt)
    denom = count.clamp_min(1.0)
    if loss_type == "grpo":
        per_seq = masked_mean(per_token, mask, -1)
        loss = per_seq.sum() / max(b, 1)
    elif loss_type == "dapo":
        loss = masked_sum(per_token, mask, None) / denom
    else:  # dr_grpo
        loss = masked_sum(per_token, mask, None) / float(max(b * (t if max_tokens is None else max_tokens), 1))

    low, high = surrogate.clipped_low, surrogate.clipped_high
    items = [] if kl is None else [("kl", masked_mean(kl, mask, None))]
    items += [
        ("clip_ratio", masked_mean((low | high).to(dt), mask, None)),
        ("clip_ratio/low", masked_mean(low.to(dt), mask, None)),
        ("clip_ratio/high", masked_mean(high.to(dt), mask, None)),
    ]
    if use_entropy:
        items.append(("entropy", masked_mean(stats.entropy, mask, None)))
    return LossOutput(loss=loss, metrics=detached_metrics(items))
