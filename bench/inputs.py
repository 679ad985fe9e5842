"""Synthetic lm-head inputs whose softmax looks like a trained model's, shared by every operation.

Why not plain ``randn``: with ``h ~ N(0, 1)`` and ``W ~ N(0, 1/D)`` the logits have unit variance
and the softmax over 32k-256k ids is almost uniform (entropy ~ log V ~ 10-12 nats). Real heads put
most mass on a few ids (entropy of a few nats). Speed is nearly independent of the values, but an
implementation that exploits sparsity (skipping backward tiles whose ``|dz|`` is below the dtype's
resolution, ``filter_eps``: docs/numerics.md) would look far better or worse on unrealistic inputs, and a near-uniform
softmax hides numerical trouble. So the weight scale is calibrated, by bisection on a sample of
rows, to a target mean entropy, and the entropy actually obtained is measured and reported.

Labels are drawn from the policy's own softmax (as generated text is, and as a trained model's
training text roughly is: log-probs of a few nats, not the ~-20 nats of a uniform random id), so
DPO/TDPO log-ratios, PPO importance ratios and TLPO's top-K candidates all have realistic sizes.

The reference model is the policy plus a small perturbation of both hidden states and weights,
which gives a realistic KL(ref || policy) of a few hundredths to tenths of a nat per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from bench.registry import Shape

TARGET_ENTROPY = 2.0  # nats; the brief asks for 1-3
CALIBRATION_ROWS = 64
MEASURE_ROWS = 512  # entropy/KL are measured on the first this-many valid tokens: a mean over 512
# rows is accurate to ~1% and costs little next to the benchmarked step at any shape
REF_PERTURBATION = 0.05  # relative size of the reference model's difference from the policy
IGNORE_INDEX = -100
LOGIT_CHUNK_ELEMENTS = 1 << 26  # rows x V logits materialised at a time while building inputs (256 MiB fp32)


@dataclass
class Head:
    """The policy's (and the reference's) lm-head, and the generator every later draw uses."""

    weight: torch.Tensor  # (V, D) in the benchmark dtype, no grad yet
    ref_weight: Optional[torch.Tensor]
    scale: float  # logit std the calibration chose
    gen: torch.Generator
    dtype: torch.dtype

    def randn(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=self.gen, device=self.weight.device, dtype=torch.float32)


@dataclass
class HeadInputs:
    hidden: torch.Tensor  # (rows, seq, D), requires grad
    weight: torch.Tensor  # (V, D), requires grad
    targets: torch.Tensor  # (rows, seq) long, IGNORE_INDEX on the ignored prefix
    raw_targets: torch.Tensor  # the same ids without the ignore mask (for peers that take a separate mask)
    logp: torch.Tensor  # (rows, seq) fp32 log p(target) under the policy when built (0 on the prefix), no grad
    ref_hidden: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    head: Head
    extra: Dict[str, float]

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(z.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _calibrate_logit_std(unit_logits: torch.Tensor, target: float) -> float:
    """The scale ``s`` such that ``softmax(s * unit_logits)`` has mean entropy ``target``.

    Entropy decreases monotonically with the scale, so bisection in log space converges.
    """
    lo, hi = 0.1, 100.0
    for _ in range(16):  # the bracket is 1000x wide: 16 halvings in log space give ~1e-4 relative
        mid = math.sqrt(lo * hi)
        if float(_entropy(unit_logits * mid).mean()) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def _log_softmax_chunks(h: torch.Tensor, w: torch.Tensor) -> Iterator[Tuple[slice, torch.Tensor]]:
    """fp32 log-softmax of ``h @ w.T`` (matmul in the inputs' dtype, as a model's head runs),
    a bounded number of rows at a time, so building inputs never needs N x V memory."""
    step = max(1, LOGIT_CHUNK_ELEMENTS // w.shape[0])
    for s in range(0, h.shape[0], step):
        sl = slice(s, s + step)
        yield sl, torch.log_softmax((h[sl] @ w.t()).float(), dim=-1)


def _measure(h: torch.Tensor, w: torch.Tensor, rh: Optional[torch.Tensor],
             rw: Optional[torch.Tensor]) -> Dict[str, float]:
    """Mean entropy (and KL(ref || policy)) over the given rows."""
    ent_sum, kl_sum = 0.0, 0.0
    ref_chunks = _log_softmax_chunks(rh, rw) if rh is not None else None
    for _, logp in _log_softmax_chunks(h, w):
        ent_sum += float(-(logp.exp() * logp).sum())
        if ref_chunks is not None:
            _, logq = next(ref_chunks)
            kl_sum += float((logq.exp() * (logq - logp)).sum())
    n = max(1, h.shape[0])
    out = {"mean_entropy_nats": ent_sum / n, "entropy_measured_on_tokens": h.shape[0]}
    if rh is not None:
        out["mean_kl_nats"] = kl_sum / n
    return out


@torch.no_grad()
def make_head(vocab: int, dim: int, dtype: torch.dtype, device: torch.device, *, reference: bool,
              seed: int = 0) -> Head:
    """A calibrated lm-head; deterministic in ``(vocab, dim, seed)``, so every case of one head
    (different N, different operations) shares it."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    unit_w = torch.randn(vocab, dim, generator=g, device=device) / math.sqrt(dim)  # unit-variance logits for |h|^2 ~ D
    sample = torch.randn(CALIBRATION_ROWS, dim, generator=g, device=device)
    scale = _calibrate_logit_std(sample @ unit_w.t(), TARGET_ENTROPY)
    weight = unit_w.mul_(scale)
    ref_weight = None
    if reference:
        ref_weight = weight + (REF_PERTURBATION * scale / math.sqrt(dim)) * torch.randn(
            vocab, dim, generator=g, device=device)
        ref_weight = ref_weight.to(dtype)
    return Head(weight=weight.to(dtype), ref_weight=ref_weight, scale=scale, gen=g, dtype=dtype)


@torch.no_grad()
def sample_labels(hidden2d: torch.Tensor, weight: torch.Tensor,
                  gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One id per row drawn from ``softmax(h Wᵀ)``, and its log-probability (fp32)."""
    ids = torch.empty(hidden2d.shape[0], dtype=torch.long, device=hidden2d.device)
    logp = torch.empty(hidden2d.shape[0], dtype=torch.float32, device=hidden2d.device)
    for sl, lp in _log_softmax_chunks(hidden2d, weight):
        ids[sl] = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
        logp[sl] = lp.gather(1, ids[sl, None]).squeeze(1)
    return ids, logp


@torch.no_grad()
def top_k_labels(hidden2d: torch.Tensor, weight: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable ids per row and their probabilities (TLPO's candidate exploration)."""
    ids = torch.empty(hidden2d.shape[0], k, dtype=torch.long, device=hidden2d.device)
    probs = torch.empty(hidden2d.shape[0], k, dtype=torch.float32, device=hidden2d.device)
    for sl, lp in _log_softmax_chunks(hidden2d, weight):
        top = lp.topk(k, dim=-1)
        ids[sl], probs[sl] = top.indices, top.values.exp()
    return ids, probs


@torch.no_grad()
def label_logp(hidden2d: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 ``log softmax(h Wᵀ)`` at ``ids`` ``(N, K)`` (e.g. a reference model's log-probs of the
    labels, precomputed once per batch as GRPO trainers do)."""
    out = torch.empty(ids.shape, dtype=torch.float32, device=ids.device)
    for sl, lp in _log_softmax_chunks(hidden2d, weight):
        out[sl] = lp.gather(1, ids[sl])
    return out


@torch.no_grad()
def make_rows(head: Head, rows: int, seq: int, ignored_prefix: int, *, measure: bool = True) -> HeadInputs:
    """Hidden states for ``rows x seq`` tokens of ``head`` (and the reference's, when the head has
    one), labels sampled from the policy, the first ``ignored_prefix`` of every row ignored."""
    D = head.weight.shape[1]
    hidden = head.randn(rows, seq, D)
    ref_hidden = None
    if head.ref_weight is not None:
        ref_hidden = (hidden + REF_PERTURBATION * head.randn(rows, seq, D)).to(head.dtype)
    hidden = hidden.to(head.dtype)
    ids, logp = sample_labels(hidden.reshape(-1, D), head.weight, head.gen)
    raw_targets = ids.view(rows, seq)
    targets = raw_targets.clone()
    targets[:, :ignored_prefix] = IGNORE_INDEX
    logp = logp.view(rows, seq)
    logp[:, :ignored_prefix] = 0.0

    extra: Dict[str, float] = {"logit_std": head.scale, "target_entropy_nats": TARGET_ENTROPY}
    if measure:
        # Measured on the inputs as the implementations see them (after the cast to dtype).
        valid = hidden[:, ignored_prefix:].reshape(-1, D)[:MEASURE_ROWS]
        rvalid = None if ref_hidden is None else ref_hidden[:, ignored_prefix:].reshape(-1, D)[:MEASURE_ROWS]
        extra.update(_measure(valid, head.weight, rvalid, head.ref_weight))
        extra["mean_label_logp"] = float(logp[:, ignored_prefix:].mean()) if seq > ignored_prefix else 0.0
    return HeadInputs(hidden=hidden, weight=head.weight, targets=targets, raw_targets=raw_targets, logp=logp,
                      ref_hidden=ref_hidden, ref_weight=head.ref_weight, head=head, extra=extra)


def make_head_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, *, reference: bool,
                     seed: int = 0) -> HeadInputs:
    """Deterministic (seeded) inputs for ``shape``; identical across implementations of one case.
    ``hidden`` and ``weight`` are returned as leaves that require grad."""
    head = make_head(shape.vocab, shape.dim, dtype, device, reference=reference, seed=seed)
    inp = make_rows(head, shape.rows, shape.seq, shape.ignored_prefix)
    inp.hidden.requires_grad_(True)
    inp.weight.requires_grad_(True)
    return inp


def random_cotangents(like: torch.Tensor, count: int, seed: int = 1) -> list:
    """Fixed random fp32 cotangents (not ``.sum()``: a constant cotangent hides sign/index bugs and
    lets an implementation specialise on it)."""
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    return [torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32) for _ in range(count)]


def loss_cotangent(device: torch.device) -> torch.Tensor:
    """The fixed cotangent of a scalar loss: a gradient-accumulation-style scale, not 1.0 (1.0
    takes shortcuts in some peers, e.g. Liger skips its rescale when ``grad_output == 1``)."""
    return torch.tensor(0.73, device=device)
