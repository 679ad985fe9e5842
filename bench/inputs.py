"""Synthetic lm-head inputs whose softmax looks like a trained model's, shared by every operation.

Why not plain ``randn``: with ``h ~ N(0, 1)`` and ``W ~ N(0, 1/D)`` the logits have unit variance
and the softmax over 32k-256k ids is almost uniform (entropy ~ log V ~ 10-12 nats). Real heads put
most mass on a few ids (entropy of a few nats). Speed is nearly independent of the values, but an
implementation that exploits sparsity (skipping backward tiles whose ``|dz|`` is below the dtype's
resolution, DESIGN.md) would look far better or worse on unrealistic inputs, and a near-uniform
softmax hides numerical trouble. So the weight scale is calibrated, by bisection on a sample of
rows, to a target mean entropy, and the entropy actually obtained is measured and reported.

The reference model is the policy plus a small perturbation of both hidden states and weights,
which gives a realistic KL(ref || policy) of a few hundredths to tenths of a nat per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from bench.registry import Shape

TARGET_ENTROPY = 2.0  # nats; the brief asks for 1-3
CALIBRATION_ROWS = 64
MEASURE_ROWS = 512  # entropy/KL are measured on the first this-many valid tokens: a mean over 512
# rows is accurate to ~1% and costs little next to the benchmarked step at any shape
REF_PERTURBATION = 0.05  # relative size of the reference model's difference from the policy
IGNORE_INDEX = -100


@dataclass
class HeadInputs:
    hidden: torch.Tensor  # (rows, seq, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    targets: torch.Tensor  # (rows, seq) long, IGNORE_INDEX on the ignored prefix
    ref_hidden: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    extra: Dict[str, float]


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _calibrate_logit_std(unit_logits: torch.Tensor, target: float) -> float:
    """The scale ``s`` such that ``softmax(s * unit_logits)`` has mean entropy ``target``.

    Entropy decreases monotonically with the scale, so bisection in log space converges.
    """
    lo, hi = 0.1, 100.0
    for _ in range(24):  # the bracket is 1000x wide: 24 halvings in log space give ~1e-6 relative
        mid = math.sqrt(lo * hi)
        if float(_entropy(unit_logits * mid).mean()) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _chunked_stats(
    h: torch.Tensor, w: torch.Tensor, rh: Optional[torch.Tensor], rw: Optional[torch.Tensor]
) -> Dict[str, float]:
    """Mean entropy (and KL(ref || policy)) over the given rows, a few rows at a time."""
    step = max(1, (1 << 22) // w.shape[0])
    ent_sum, kl_sum = 0.0, 0.0
    for s in range(0, h.shape[0], step):
        logp = torch.log_softmax((h[s : s + step] @ w.t()).float(), dim=-1)
        ent_sum += float(-(logp.exp() * logp).sum())
        if rh is not None:
            logq = torch.log_softmax((rh[s : s + step] @ rw.t()).float(), dim=-1)
            kl_sum += float((logq.exp() * (logq - logp)).sum())
    n = h.shape[0]
    out = {"mean_entropy_nats": ent_sum / n, "entropy_measured_on_tokens": n}
    if rh is not None:
        out["mean_kl_nats"] = kl_sum / n
    return out


@torch.no_grad()
def make_head_inputs(
    shape: Shape, dtype: torch.dtype, device: torch.device, *, reference: bool, seed: int = 0
) -> HeadInputs:
    """Deterministic (seeded) inputs; identical across implementations of one case."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    B, T, D, V = shape.rows, shape.seq, shape.dim, shape.vocab

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32)

    # The head first: it then depends on (V, D, seed) only, so cases that differ in N share one
    # weight, and the calibration rows (a prefix of the hidden states) are shared too.
    unit_w = randn(V, D) / math.sqrt(D)  # logits of unit variance per id for |h|^2 ~ D
    hidden = randn(B, T, D)
    sample = hidden.reshape(-1, D)[: CALIBRATION_ROWS]
    scale = _calibrate_logit_std(sample @ unit_w.t(), TARGET_ENTROPY)
    weight = unit_w.mul_(scale)

    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    targets[:, : shape.ignored_prefix] = IGNORE_INDEX

    ref_hidden = ref_weight = None
    if reference:
        ref_hidden = hidden + REF_PERTURBATION * randn(B, T, D)
        ref_weight = weight + (REF_PERTURBATION * scale / math.sqrt(D)) * randn(V, D)

    # Measure on the inputs as the implementations will see them (after the cast to dtype).
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if reference:
        ref_hidden, ref_weight = ref_hidden.to(dtype), ref_weight.to(dtype)
    valid = hidden[:, shape.ignored_prefix :].reshape(-1, D)[:MEASURE_ROWS]
    rvalid = None if ref_hidden is None else ref_hidden[:, shape.ignored_prefix :].reshape(-1, D)[:MEASURE_ROWS]
    extra = {"logit_std": scale, "target_entropy_nats": TARGET_ENTROPY}
    extra.update(_chunked_stats(valid, weight, rvalid, ref_weight))

    return HeadInputs(
        hidden=hidden.requires_grad_(True),
        weight=weight.requires_grad_(True),
        targets=targets,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        extra=extra,
    )


def random_cotangents(like: torch.Tensor, count: int, seed: int = 1) -> list:
    """Fixed random fp32 cotangents (not ``.sum()``: a constant cotangent hides sign/index bugs and
    lets an implementation specialise on it)."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    return [torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32) for _ in range(count)]
