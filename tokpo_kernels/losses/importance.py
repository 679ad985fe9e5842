"""TI-DPO token-importance weights from raw attribution scores (arXiv 2505.19653, docs/methods.md §3 step 2).

The attribution pass itself (gradient of the largest last-position logit w.r.t. the input
embeddings) needs the model and lives in the integrations layer; this file is the pure per-row
post-processing: normalise, mix with a Gaussian positional prior, rescale to mean 1.
"""

from __future__ import annotations

import torch

from tokpo_kernels._validation import check_float_tensor, check_number, check_shape, check_tensor


def token_importance_weights(
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float = 0.7,
    sigma_div: float = 4.0,
) -> torch.Tensor:
    """Per-token importance weights ``w`` from attribution scores ``I`` (TI-DPO, docs/methods.md §3).

    For every row (the last dim; any leading dims are batch), over its valid span ``S`` = the
    positions where ``mask`` is true, with ``n = |S|`` and ``j`` = the rank of a position inside
    ``S`` (0, 1, …, n−1 in order; the span need not be contiguous, gaps are skipped)::

        s_j = clamp(I_j, 0) / Σ_S clamp(I, 0)
        P(j) ∝ exp(−½((j − μ)/σ)²),  μ = (n − 1)/2,  σ = max(1, n / sigma_div),  Σ_S P = 1
        w_j = λ s_j + (1 − λ) P(j),  then rescaled so that mean_S w = 1

    If ``Σ_S clamp(I, 0) = 0`` (no positive attribution) the prior alone is used; rows with
    ``n ≤ 1`` get all-zero weights; positions outside the mask are 0.

    Defaults are the paper's (``λ = 0.7``, ``σ_div = 4``); the TI-DPO reference code uses
    ``lam=0.2, sigma_div=8``. The reference code's span is every non-pad token; pass a
    response-only mask for the other option.

    Args:
        scores: ``(..., T)`` floating-point attribution scores (e.g. L1 gradient norms). Detached.
        mask: ``(..., T)`` bool (or 0/1 integer) valid-span mask, same shape as ``scores``.
        lam: mixing weight of the normalised scores, in ``[0, 1]``.
        sigma_div: divisor of the span length giving the prior's width, ``>= 1``. Below 1 the
            prior would be wider than the span itself (σ > n), i.e. nearly flat: refused with a
            ``ValueError`` rather than silently turned into uniform weights.

    Returns:
        Detached weights of ``scores``' shape, dtype ``promote(scores.dtype, float32)`` (fp32 for
        half inputs, fp64 stays fp64). Computed without host synchronisation.
    """
    scores = check_float_tensor("scores", scores)
    mask = check_tensor("mask", mask)
    if scores.dim() < 1:
        raise ValueError("scores: expected shape (..., T), got a 0-d tensor")
    check_shape("mask", mask, tuple(scores.shape), "like scores")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool (or 0/1 integer) tensor, got dtype {mask.dtype}")
    lam = check_number("lam", lam, ge=0.0, le=1.0)
    sigma_div = check_number("sigma_div", sigma_div, ge=1.0)

    dtype = torch.promote_types(scores.dtype, torch.float32)
    m = mask.to(torch.bool)
    s = scores.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=s.device)

    n = m.to(dtype).sum(-1, keepdim=True)  # span length
    j = torch.cumsum(m.to(dtype), dim=-1) - 1.0  # rank within the span (valid where m)

    pos = torch.where(m, s.clamp_min(0.0), zero)
    total = pos.sum(-1, keepdim=True)
    has_attr = total > 0
    s_norm = pos / torch.where(has_attr, total, torch.ones_like(total))

    mu = (n - 1.0) / 2.0
    sigma = (n / sigma_div).clamp_min(1.0)
    prior = torch.where(m, torch.exp(-0.5 * ((j - mu) / sigma) ** 2), zero)
    prior = prior / prior.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)

    w = torch.where(has_attr, lam * s_norm + (1.0 - lam) * prior, prior)
    w = w * (n / w.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny))  # mean 1 over the span
    return torch.where(m & (n > 1.0), w, zero)
