"""Fused linear cross-entropy (SFT / NLL) on lm-head statistics (docs/methods.md §5).

Matches ``torch.nn.functional.linear_cross_entropy`` (PyTorch >= 2.13) where the options overlap
(``reduction``, ``ignore_index``, ``label_smoothing``, a ``(V,)`` bias) and adds a PaLM-style
z-loss, per-token weights and the library's logit transform (temperature, softcap).

Label smoothing needs ``(1/V) Σ_v z_v`` per token, which is not one of the streamed statistics.
Without softcap the logit transform is affine, so that mean is exact and cheap without a
vocabulary loop::

    (1/V) Σ_v z_v = (h · W̄ + b̄) / temperature,     W̄ = (1/V) Σ_v W_v,  b̄ = (1/V) Σ_v b_v

— one O(V·D) column mean of the weight (fp32 accumulation) and an O(N·D)
matrix-vector product, differentiable through autograd. With a softcap ``tanh`` makes the mean
non-linear in the logits, so ``label_smoothing > 0`` together with ``softcap`` is rejected.
Vocabulary-parallel, ``W̄`` and ``b̄`` take one more all-reduce of ``D + 2`` numbers.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import check_choice, check_float_tensor, check_number, check_shape, check_tensor
from tokpo_kernels.distributed.sharded_weights import resolve_sharded_weights
from tokpo_kernels.distributed.vocab_parallel import vocab_mean
from tokpo_kernels.losses._common import detached_metrics, masked_count, masked_sum
from tokpo_kernels.losses._options import HeadOptions, loss_function

__all__ = ["linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
WEIGHT_NORMALIZATIONS = ("tokens", "weights")


# PyTorch's order: bias and ignore_index come first, so this loss places them itself (keyword order
# is part of the public signature); ref_bias has no meaning without a reference.
@loss_function("LinearCrossEntropyLoss", exclude=("ref_bias",))
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
    token_weights: Optional[torch.Tensor] = None,
    head: HeadOptions,
    weight_normalization: str = "tokens",
) -> LossOutput:
    """Cross-entropy of ``z = transform(h Wᵀ + b)`` against ``targets``, without materialising logits.

    Per valid (non-``ignore_index``) token, with ``ε = label_smoothing``::

        nll_t    = lse_t − z_t[y_t]
        smooth_t = lse_t − (1/V) Σ_v z_t,v                 (cross-entropy against the uniform)
        L_t      = w_t · ((1 − ε) nll_t + ε smooth_t + z_loss · lse_t²)

    ``ε`` mixes in the uniform distribution exactly as ``torch.nn.functional.cross_entropy``
    (Szegedy et al., 2016); the z-loss is PaLM's auxiliary ``1e-4 · lse²`` (Chowdhery et al., 2022;
    Liger's ``lse_square_scale``), off by default. ``w_t`` are the optional ``token_weights``
    (default 1). Reductions: ``"none"`` returns ``L_t`` shaped like ``targets`` (0 at ignored
    tokens), ``"sum"`` returns ``Σ_t L_t``, ``"mean"`` returns ``Σ_t L_t / N_valid``
    (``weight_normalization="tokens"``, the default: the weights scale each token's contribution
    and the denominator stays the token count, so uniformly rescaled weights rescale the loss) or
    ``Σ_t L_t / Σ_valid w_t`` (``"weights"``: PyTorch's convention for its per-*class* ``weight``,
    which Liger's ``ce_weight`` follows; Liger has no per-token weights). Defaults match PyTorch:
    ``ignore_index=-100``, ``reduction="mean"``, ``label_smoothing=0``.

    Differences from PyTorch: a mean over zero valid tokens is 0 here (PyTorch returns NaN);
    no per-class ``weight``; ``temperature``/``softcap`` are extra.

    Args:
        hidden: ``(..., D)`` hidden states (PyTorch's ``input``).
        weight: ``(V, D)`` lm-head weight (PyTorch's ``linear_weight``).
        targets: ``(...)`` class ids (PyTorch's ``target``); ``ignore_index`` marks ignored tokens.
        bias: optional ``(V,)`` bias (PyTorch's ``linear_bias``).
        ignore_index, reduction, label_smoothing: as PyTorch (``label_smoothing`` in ``[0, 1]``).
        z_loss: z-loss coefficient ``>= 0`` (PaLM uses ``1e-4``).
        token_weights: optional float ``(...)`` weights shaped like ``targets`` (no gradient flows
            into them; their values at ignored tokens are irrelevant).
        weight_normalization: ``"tokens"`` or ``"weights"``, the ``"mean"`` denominator with
            ``token_weights`` (see above); without weights both are the valid-token count.

    Returns:
        ``LossOutput(loss, metrics)`` with detached scalar metrics:

        * ``"nll"`` — unweighted, unsmoothed mean NLL over valid tokens (``exp`` of it is the
          perplexity);
        * ``"z_loss"`` — the z-loss part of ``loss`` (``Σ_t w_t z_loss lse_t²`` reduced like the
          loss for ``"mean"``/``"sum"``; the ``"mean"`` value for ``"none"``), only when
          ``z_loss > 0``;
        * ``"num_tokens"`` — ``N_valid`` (float).

    Raises:
        TypeError / ValueError: on bad arguments (including ``label_smoothing > 0`` with
        ``softcap``), naming expected vs received.
    """
    hidden = check_float_tensor("hidden", hidden)
    weight = check_float_tensor("weight", weight)
    targets = check_tensor("targets", targets)
    if hidden.dim() < 1:
        raise ValueError(f"hidden: expected shape (..., D), got {tuple(hidden.shape)}")
    check_shape("targets", targets, tuple(hidden.shape[:-1]), f"one id per row of hidden {tuple(hidden.shape)}")
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    weight_normalization = check_choice("weight_normalization", weight_normalization, WEIGHT_NORMALIZATIONS)
    label_smoothing = check_number("label_smoothing", label_smoothing, ge=0.0, le=1.0)
    z_loss = check_number("z_loss", z_loss, ge=0.0)
    if token_weights is not None:
        token_weights = check_float_tensor("token_weights", token_weights)
        check_shape("token_weights", token_weights, tuple(targets.shape), "one weight per token, like targets")
    if label_smoothing > 0 and head.softcap is not None:
        raise ValueError(
            f"label_smoothing={label_smoothing} > 0 is not supported together with softcap={head.softcap}: the "
            "smoothing term needs the vocabulary mean of the logits, which is exact only for an affine logit "
            "transform (temperature); use softcap=None or label_smoothing=0"
        )

    # Sharded heads are resolved here once: the smoothing term below reads the weight itself.
    (hidden, weight, bias, *_), process_group = resolve_sharded_weights(
        hidden, weight, bias, None, None, None, head.process_group
    )
    stats = head._replace(bias=bias, process_group=process_group).stats(hidden, weight, targets)
    mask = stats.mask
    dt = stats.lse.dtype
    zero = stats.lse.new_zeros(())
    nll = -stats.logp
    per_token = nll
    if label_smoothing > 0:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        # (D,) accumulated in fp32 (fp64 stays fp64); over all ranks' rows when vocabulary-parallel.
        w_bar, b_bar = vocab_mean(weight, bias, process_group, acc)
        mean_z = torch.matmul(hidden.to(acc), w_bar)
        if b_bar is not None:
            mean_z = mean_z + b_bar
        mean_z = (mean_z / float(head.temperature)).to(dt)
        smooth = stats.lse - mean_z
        per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    zl = None
    if z_loss > 0:
        zl = z_loss * stats.lse * stats.lse
        per_token = per_token + zl
    w = None
    if token_weights is not None:
        w = torch.where(mask, token_weights.detach().to(dt), zero)
        per_token = per_token * w
        if zl is not None:
            zl = zl * w
    per_token = torch.where(mask, per_token, zero)

    count = masked_count(mask, None, dt)
    if w is not None and weight_normalization == "weights":
        wsum = w.sum()
        mean_denom = torch.where(wsum != 0, wsum, torch.ones_like(wsum))
    else:
        mean_denom = count.clamp_min(1.0)
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / mean_denom

    items = [("nll", masked_sum(nll, mask, None) / count.clamp_min(1.0))]
    if zl is not None:
        zsum = masked_sum(zl, mask, None)
        items.append(("z_loss", zsum if reduction == "sum" else zsum / mean_denom))
    items.append(("num_tokens", count))
    return LossOutput(loss=loss, metrics=detached_metrics(items))
