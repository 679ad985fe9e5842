"""Chunked PyTorch implementation of the two passes of ``linear_vocab_stats``.

Tokens are processed ``rows_per_chunk(V)`` at a time, so the largest temporaries are a few
(chunk, V) tiles instead of (N, V): extra memory is O(chunk·V + V·D), never O(N·V). Ignored rows are
dropped before any matmul. The backward recomputes the logit chunk (and the reference chunk only
when a KL gradient flows) and applies the universal gradient of METHODS.md §1:

    ∂L/∂z = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H)

Compaction uses ``nonzero`` (a host sync on CUDA); that is acceptable for this fallback path, the
Triton path compacts without one.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from tokpo_kernels._types import RawStats, StatGrads
from tokpo_kernels.numerics import transform_grad_, transform_logits
from tokpo_kernels.ops.params import StatsParams

# Logit elements per chunk: 2**21 fp32 = 8 MiB per (chunk, V) tile. A forward with a reference
# and KL keeps about five such tiles alive (z, z_ref, q and two temporaries), ~40 MiB, which stays
# far below materialised logits for any real N while each chunk matmul still has >= 16 rows at
# V = 128k (enough for BLAS to run near peak on CPU). Measured on 2 cores (bench, V=32000, D=256):
# time within a few percent of larger chunks.
CHUNK_ELEMENTS = 1 << 21


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (accumulate in fp32), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, rows.numel(), size):
        yield rows[start : start + size]


def _raw_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    raw = h @ w.t()
    if b is not None:
        raw += b
    return raw


def _up(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def chunked_forward(
    h: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    rh: Optional[torch.Tensor],
    rw: Optional[torch.Tensor],
    rb: Optional[torch.Tensor],
    targets: torch.Tensor,
    tvalid: torch.Tensor,
    row_valid: torch.Tensor,
    params: StatsParams,
) -> RawStats:
    n, j = targets.shape
    cd = compute_dtype(h.dtype)
    dev = h.device
    w_c, b_c = w.to(cd), _up(b, cd)
    has_ref = rh is not None
    rw_c, rb_c = (rw.to(cd), _up(rb, cd)) if has_ref else (None, None)

    tgt = torch.zeros(n, j, dtype=cd, device=dev)
    lse = torch.zeros(n, dtype=cd, device=dev)
    ref_tgt = torch.zeros(n, j, dtype=cd, device=dev) if has_ref else None
    ref_lse = torch.zeros(n, dtype=cd, device=dev) if has_ref else None
    kl = torch.zeros(n, dtype=cd, device=dev) if params.kl else None
    ent = torch.zeros(n, dtype=cd, device=dev) if params.entropy else None
    safe = torch.where(tvalid, targets, torch.zeros_like(targets))

    rows = row_valid.nonzero().squeeze(1)
    for idx in _chunks(rows, rows_per_chunk(w.shape[0])):
        z = transform_logits(_raw_logits(h[idx].to(cd), w_c, b_c), params.temperature, params.softcap)
        lse_c = torch.logsumexp(z, dim=-1)
        lse[idx] = lse_c
        tgt[idx] = z.gather(1, safe[idx])
        if ent is not None or kl is not None:
            z.sub_(lse_c[:, None])  # z now holds log p
        if ent is not None:
            ent[idx] = -(z.exp() * z).sum(-1)
        if has_ref:
            zr = transform_logits(_raw_logits(rh[idx].to(cd), rw_c, rb_c), params.temperature, params.softcap)
            ref_lse_c = torch.logsumexp(zr, dim=-1)
            ref_lse[idx] = ref_lse_c
            ref_tgt[idx] = zr.gather(1, safe[idx])
            if kl is not None:
                zr.sub_(ref_lse_c[:, None])  # zr now holds log q
                # KL(q || p) = Σ q (log q − log p); both logs are finite, so no NaN when q underflows.
                kl[idx] = (zr.exp() * (zr - z)).sum(-1).clamp_min_(0.0)
    return RawStats(tgt, lse, ref_tgt, ref_lse, kl, ent)


def chunked_backward(
    h: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    rh: Optional[torch.Tensor],
    rw: Optional[torch.Tensor],
    rb: Optional[torch.Tensor],
    targets: torch.Tensor,
    tvalid: torch.Tensor,
    row_valid: torch.Tensor,
    lse: torch.Tensor,
    ref_lse: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    grads: StatGrads,
    params: StatsParams,
    needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns ``(∂hidden, ∂weight, ∂bias)`` (``None`` where ``needs`` says no)."""
    need_dh, need_dw, need_db = needs
    cd = compute_dtype(h.dtype)
    w_c, b_c = w.to(cd), _up(b, cd)
    use_q = grads.g_kl is not None
    rw_c, rb_c = (rw.to(cd), _up(rb, cd)) if use_q else (None, None)
    dh = torch.zeros(h.shape, dtype=cd, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=cd, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=cd, device=w.device) if need_db else None
    safe = torch.where(tvalid, targets, torch.zeros_like(targets))

    rows = row_valid.nonzero().squeeze(1)
    for idx in _chunks(rows, rows_per_chunk(w.shape[0])):
        h_c = h[idx].to(cd)
        raw = _raw_logits(h_c, w_c, b_c)
        z = transform_logits(raw, params.temperature, params.softcap)
        z.sub_(lse[idx, None])  # log p
        p = z.exp()
        g_p = grads.g_lse[idx]
        if use_q:
            g_p = g_p + grads.g_kl[idx]
        dz = p * g_p[:, None]
        if grads.g_entropy is not None:
            # −g_H · p ⊙ (log p + H)
            z.add_(entropy[idx, None]).mul_(p).mul_(grads.g_entropy[idx, None])
            dz.sub_(z)
        del z, p
        if use_q:
            zr = transform_logits(_raw_logits(rh[idx].to(cd), rw_c, rb_c), params.temperature, params.softcap)
            q = zr.sub_(ref_lse[idx, None]).exp_()
            dz.sub_(q.mul_(grads.g_kl[idx, None]))
            del zr, q
        dz.scatter_add_(1, safe[idx], grads.g_tgt[idx].to(cd))
        transform_grad_(dz, raw, params.temperature, params.softcap)
        del raw
        if need_dh:
            dh[idx] = dz @ w_c
        if need_dw:
            dw.addmm_(dz.t(), h_c)
        if need_db:
            db += dz.sum(0)
    return (
        None if dh is None else dh.to(h.dtype),
        None if dw is None else dw.to(w.dtype),
        None if db is None else db.to(b.dtype),
    )
