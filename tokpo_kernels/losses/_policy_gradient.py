"""The policy-gradient pieces shared by ``ppo_loss`` and ``tlpo_loss`` (docs/methods.md §4–5).

One copy each of the PPO-clip surrogate, the k3 KL estimator, the choice of reference log-probs
and the KL-coefficient alias (``beta`` in PPO, ``kl_beta`` in TLPO: both accept both names).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from tokpo_kernels._types import VocabStats
from tokpo_kernels._validation import REFERENCE_LOGP, REFERENCE_MODEL, check_number


class Surrogate(NamedTuple):
    """``value = min(ρA, clip(ρ, 1 − eps_low, 1 + eps_high) A)`` per entry, the ratio ``ρ`` and
    where the clipped branch is active below (``ρ < 1 − eps_low``, ``A < 0``) and above
    (``ρ > 1 + eps_high``, ``A > 0``): TRL's and Liger's clip-ratio definition."""

    value: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> Surrogate:
    """The PPO-clip surrogate of ``logp`` (``ρ = exp(ℓ − ℓ_old)``, ``ℓ_old = sg(ℓ)`` when ``old_logp`` is None).

    ``advantages`` are already detached and zero off ``mask``; off ``mask`` the log-ratio is taken
    as 0, so a NaN/inf in ``old_logp`` at an ignored entry never reaches the loss or its gradient.
    """
    zero = logp.new_zeros(())
    old = logp.detach() if old_logp is None else old_logp.detach().to(logp.dtype)
    ratio = torch.exp(torch.where(mask, logp - old, zero))
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    value = torch.minimum(ratio * advantages, clipped * advantages)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return Surrogate(value, ratio, low, high)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π ‖ π_ref) at the sampled entries: ``e^δ − δ − 1``, ``δ = ℓ_ref − ℓ``.

    Non-negative and unbiased for samples drawn from π; ``δ`` is 0 off ``mask`` (so is the result).
    """
    delta = torch.where(mask, ref_logp - logp, logp.new_zeros(()))
    return torch.exp(delta) - delta - 1.0


def reference_logp(
    source: str, stats: VocabStats, ref_logp: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """The reference log-probs at the targets for a ``resolve_reference`` result: from the statistics
    pass (``"model"``), the caller's detached ``ref_logp`` (``"logp"``), or ``None``."""
    if source == REFERENCE_MODEL:
        return stats.ref_logp
    if source == REFERENCE_LOGP:
        return ref_logp.detach().to(stats.logp.dtype)
    return None


def kl_coefficient(name: str, value: float, default: float, alias: str, alias_value: Optional[float]) -> float:
    """The KL coefficient given as ``name`` or as its ``alias`` (``None`` = not given), checked ``>= 0``.

    Both names may be given only with the same value; a different ``name`` that is still its
    ``default`` counts as not given, so ``alias`` alone always wins.
    """
    value = check_number(name, value, ge=0.0)
    if alias_value is None:
        return value
    alias_value = check_number(alias, alias_value, ge=0.0)
    if value != default and value != alias_value:
        raise ValueError(
            f"{name} and {alias} are two names of the KL coefficient: got {name}={value} and {alias}={alias_value}; "
            "pass one of them"
        )
    return alias_value
