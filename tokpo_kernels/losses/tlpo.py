"""TLPO: token-level policy optimisation against language confusion (docs/methods.md §4).

TLPO (arXiv 2604.26553, ACL 2026) updates the policy at one position ``u`` per *group* (the logits
that predicted the first language-confused token of a sampled response) on K explored candidate
tokens ``t_i`` with advantages ``A_i``. Every candidate of a group shares the same logits, so a
group is ONE hidden row with K target ids: ``linear_vocab_stats`` gathers all K log-probs from a
single pass over the vocabulary (``targets`` of shape ``(G, K)``), instead of K sequences.

The loss is a few lines of PyTorch on those ``(G, K)`` log-probs; it adds no kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import (
    check_float_tensor,
    check_int,
    check_number,
    check_shape,
    check_tensor,
    resolve_reference,
)
from tokpo_kernels.losses._common import detached_metrics, masked_count, masked_mean, masked_sum
from tokpo_kernels.losses._options import HeadOptions, loss_function
from tokpo_kernels.losses._policy_gradient import clipped_surrogate, k3_kl, kl_coefficient, reference_logp

__all__ = ["tlpo_advantages", "tlpo_loss"]


def tlpo_advantages(
    probs: torch.Tensor,
    rewards: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Probability-weighted, L1-normalised candidate advantages (docs/methods.md §4 step 4).

    Per group (one row)::

        μ   = Σ_i π_i R_i / Σ_i π_i
        w_i = π_i (R_i − μ)
        A_i = w_i / Σ_j |w_j|

    so ``Σ_i A_i = 0`` and ``Σ_i |A_i| = 1`` whenever the rewards of a group differ; a group whose
    (valid) rewards are all equal gets exactly zero advantages (detected by comparing rewards, not
    by a rounding-sensitive ``Σ|w| == 0``). This is the TLPO reference code's rule (rewards ``±1``
    from the greedy-continuation confusion check; ``π_i`` the detached top-K probabilities at
    temperature 1, not renormalised over the K candidates — the normalisations cancel anyway).

    Args:
        probs: ``(G, K)`` or ``(K,)`` candidate probabilities ``π_i`` (data: no gradient is intended).
        rewards: same shape, ``R_i`` (float, integer or bool).
        mask: optional bool, same shape: ``True`` for real candidates, ``False`` for padding.
            Padded entries are excluded from ``μ`` and ``Σ|w|`` and get advantage 0.

    Returns:
        Advantages of ``probs``' shape, dtype ``promote(probs.dtype, float32)``. No host sync.
    """
    probs = check_float_tensor("probs", probs)
    rewards = check_tensor("rewards", rewards)
    if rewards.dtype.is_complex:
        raise TypeError(f"rewards: expected a real tensor, got dtype {rewards.dtype}")
    if probs.dim() not in (1, 2):
        raise ValueError(f"probs: expected shape (G, K) or (K,), got {tuple(probs.shape)}")
    check_shape("rewards", rewards, tuple(probs.shape), "like probs")
    if mask is not None:
        mask = check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = real candidate), got dtype {mask.dtype}")
        check_shape("mask", mask, tuple(probs.shape), "like probs")
    single = probs.dim() == 1
    dtype = torch.promote_types(probs.dtype, torch.float32)
    p = probs.to(dtype)
    r = rewards.to(dtype)
    if single:
        p, r = p[None], r[None]
        mask = None if mask is None else mask[None]
    valid = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
    zero = p.new_zeros(())
    p = torch.where(valid, p, zero)
    r = torch.where(valid, r, zero)
    psum = p.sum(-1, keepdim=True)
    has_mass = psum > 0
    mu = torch.where(has_mass, (p * r).sum(-1, keepdim=True) / torch.where(has_mass, psum, 1.0), zero)
    w = torch.where(valid, p * (r - mu), zero)
    denom = w.abs().sum(-1, keepdim=True)
    inf = torch.full((), float("inf"), dtype=dtype, device=p.device)
    r_hi = torch.where(valid, r, -inf).amax(-1, keepdim=True)
    r_lo = torch.where(valid, r, inf).amin(-1, keepdim=True)
    varied = r_hi > r_lo  # False for constant rewards and for groups without valid candidates
    ok = varied & (denom > 0)
    adv = torch.where(ok, w / torch.where(ok, denom, 1.0), zero)
    return adv[0] if single else adv


@loss_function("TLPOLoss", docs={"ignore_index": "the padding id of ``candidates``."})
def tlpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, candidates: torch.Tensor, advantages: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
    *,
    old_logp: Optional[torch.Tensor] = None, kl_beta: float = 0.04,
    eps_low: float = 0.2, eps_high: float = 0.2,
    ref_logp: Optional[torch.Tensor] = None,
    head: HeadOptions,
    beta: Optional[float] = None,
) -> LossOutput:
    """TLPO loss: PPO-clip on K candidate tokens per confusion point, with a k3 KL penalty.

    With ``ℓ = log softmax(z_u)`` at the group's hidden row and candidates ``t_i``::

        ρ_i  = exp(ℓ[t_i] − ℓ_old[t_i])
        S_i  = min(ρ_i A_i, clip(ρ_i, 1 − eps_low, 1 + eps_high) A_i)
        KL_i = exp(ℓ_ref[t_i] − ℓ[t_i]) − (ℓ_ref[t_i] − ℓ[t_i]) − 1          (k3 estimator)
        loss = −(1/N) Σ_i (S_i − kl_beta · KL_i)

    where the mean runs over the ``N`` valid (non-``ignore_index``) candidates of the whole batch
    (``N = 0`` gives loss 0). At ``ρ = 1`` the gradient is
    ``∂L/∂z_u = −(1/N) Σ_i c_i (e_{t_i} − p_u)``, ``c_i = A_i − kl_beta (1 − exp(ℓ_ref[t_i] − ℓ[t_i]))``.

    Defaults are the TLPO reference configuration: ``kl_beta = 0.04``, ``eps_low = eps_high = 0.2``.
    ``old_logp=None`` uses the detached current log-probs, exactly like the reference code (which
    resets ``ℓ_old`` before every forward), so ``ρ ≡ 1`` and the clip never activates; pass the
    log-probs of the sampling policy for genuine multi-epoch PPO reuse.

    Args:
        hidden: ``(G, D)`` policy hidden state at each group's update position ``u`` (any leading
            shape ``(..., D)`` works; candidates then are ``(..., K)``).
        weight: ``(V, D)`` lm-head weight.
        candidates: ``(G, K)`` candidate token ids, padded with ``ignore_index``.
        advantages: ``(G, K)`` float advantages (see :func:`tlpo_advantages`); no gradient flows into
            them, padded entries are ignored.
        ref_hidden, ref_weight: the frozen reference model's ``(G, D_ref)`` hidden rows and
            ``(V, D_ref)`` weight; the reference candidate log-probs come from the same
            ``linear_vocab_stats`` pass. Never receive gradient.
        old_logp: optional ``(G, K)`` log-probs of the candidates under the sampling policy.
        kl_beta: KL coefficient ``β_KL >= 0``. With ``kl_beta > 0`` a reference is required
            (``ref_hidden``/``ref_weight`` or ``ref_logp``); with ``kl_beta = 0`` it is optional
            (if given, the ``"kl"`` metric is still reported).
        eps_low, eps_high: clip range ``[1 − eps_low, 1 + eps_high]``, both ``>= 0``.
        ref_logp: ``(G, K)`` precomputed reference log-probs of the candidates, instead of
            ``ref_hidden``/``ref_weight`` (giving both is an error). Detached.
        beta: alias of ``kl_beta`` (PPO's name; ``None``: not given); both may be given only with one value.

    Returns:
        ``LossOutput(loss, metrics)``; every metric is a detached scalar averaged over the valid
        candidates:

        * ``"policy_loss"`` — ``−mean_i S_i`` (the loss without the KL term);
        * ``"kl"`` — ``mean_i KL_i`` (only when a reference is available);
        * ``"clip_fraction"`` — fraction of candidates whose clipped branch is active
          (``ρ < 1 − eps_low`` with ``A < 0``, or ``ρ > 1 + eps_high`` with ``A > 0``; TRL's
          "clip region" definition);
        * ``"ratio/mean"`` — ``mean_i ρ_i``;
        * ``"logps/candidates"`` — ``mean_i ℓ[t_i]``;
        * ``"advantages/abs_mean"`` — ``mean_i |A_i|``;
        * ``"num_candidates"`` — ``N`` (float).

    Raises:
        TypeError / ValueError: on bad arguments, naming expected vs received.
    """
    hidden = check_float_tensor("hidden", hidden)
    candidates = check_tensor("candidates", candidates)
    check_int("candidates", candidates)
    advantages = check_float_tensor("advantages", advantages)
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape (G, D), got {tuple(hidden.shape)}")
    cand_shape = tuple(candidates.shape)
    if candidates.dim() != hidden.dim() or cand_shape[:-1] != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"candidates: expected shape (G, K) with G matching hidden {tuple(hidden.shape)}, i.e. "
            f"{tuple(hidden.shape[:-1])} + (K,), got {cand_shape}"
        )
    check_shape("advantages", advantages, cand_shape, "one advantage per candidate, like candidates")
    if old_logp is not None:
        check_shape("old_logp", check_float_tensor("old_logp", old_logp), cand_shape, "like candidates")
    if ref_logp is not None:
        check_shape("ref_logp", check_float_tensor("ref_logp", ref_logp), cand_shape, "like candidates")
    kl_beta = kl_coefficient("kl_beta", kl_beta, 0.04, "beta", beta)
    eps_low = check_number("eps_low", eps_low, ge=0.0)
    eps_high = check_number("eps_high", eps_high, ge=0.0)
    source = resolve_reference("tlpo_loss", ref_hidden, ref_weight, ref_logp,
                               required=f"kl_beta={kl_beta} > 0" if kl_beta > 0 else None,
                               hint="use kl_beta=0.0 to train without the KL penalty")

    stats = head.stats(hidden, weight, candidates, ref_hidden, ref_weight)
    logp = stats.logp
    dt = logp.dtype
    valid = candidates != head.ignore_index
    adv = torch.where(valid, advantages.detach().to(dt), logp.new_zeros(()))
    surrogate = clipped_surrogate(logp, old_logp, adv, valid, eps_low, eps_high)
    per_candidate = surrogate.value
    ref = reference_logp(source, stats, ref_logp)
    kl = None if ref is None else k3_kl(logp, ref, valid)
    if kl is not None and kl_beta != 0.0:
        per_candidate = per_candidate - kl_beta * kl

    count = masked_count(valid, None, dt)
    loss = -masked_sum(per_candidate, valid, None) / count.clamp_min(1.0)
    is_clipped = surrogate.clipped_low | surrogate.clipped_high
    items = [
        ("policy_loss", -masked_mean(surrogate.value, valid, None)),
        ("clip_fraction", masked_mean(is_clipped.to(dt), valid, None)),
        ("ratio/mean", masked_mean(surrogate.ratio, valid, None)),
        ("logps/candidates", masked_mean(logp, valid, None)),
        ("advantages/abs_mean", masked_mean(adv.abs(), valid, None)),
        ("num_candidates", count),
    ]
    if kl is not None:
        items.insert(1, ("kl", masked_mean(kl, valid, None)))
    return LossOutput(loss=loss, metrics=detached_metrics(items))
