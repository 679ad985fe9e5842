"""Chunked PyTorch implementation of the two passes of ``linear_vocab_stats``.

Valid (non-ignored) rows are gathered once, then processed ``rows_per_chunk(V)`` at a time, so
the largest temporaries are at most three (chunk, V) tiles instead of (N, V): extra memory is
O(chunk·V + N·D), never O(N·V). The backward recomputes the logit chunk (and the reference chunk
only when a KL gradient flows) and applies the universal gradient of METHODS.md §1:

    ∂L/∂z = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H)

Statistics are formed from max-shifted logits ``zs = z − m`` and ``e = exp(zs)``, ``s = Σ e``::

    lse = m + log s,   H = log s − Σ e·zs / s,
    KL  = Σ e_r·(zs_r − zs) / s_r + log s − log s_r

so nothing is computed as ``log(softmax)`` (no NaN when a probability underflows) and logits of
magnitude 1e4 lose nothing to cancellation. Row-wise dot products use ``einsum`` (a batched
GEMV), which avoids a (chunk, V) temporary per product.

Compaction uses ``nonzero`` (a host sync on CUDA); acceptable for this fallback path, the Triton
path compacts without one.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from tokpo_kernels._types import RawStats, StatGrads
from tokpo_kernels.numerics import accum_dtype, max_shift, transform_grad_, transform_logits
from tokpo_kernels.ops.params import StatsParams

# Logit elements per chunk: 2**23 fp32 = 32 MiB per (chunk, V) tile, at most three alive (~96 MiB).
# Measured on 2 CPU cores at V = 32000, D = 256: matmuls run at ~13-15 GFLOP/s with 64-row chunks
# and ~21-30 GFLOP/s with 256 rows (vs ~24-34 for one 2048-row matmul), so the budget targets
# >= 256 rows at V = 32k while staying >= 8x below materialised logits for any N >= 2k.
CHUNK_ELEMENTS = 1 << 23


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` without materialising ``a * b``."""
    return torch.einsum("ij,ij->i", a, b)


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], params: StatsParams) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(raw, z)``; ``z`` is ``raw`` itself (no copy) when there is no transform."""
    raw = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    if params.softcap is None and params.temperature == 1.0:
        return raw, raw
    return raw, transform_logits(raw, params.temperature, params.softcap)


def _shifted_exp(z: torch.Tensor, finite: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place ``z ← z − max``; returns ``(max, e = exp(z − max), s = Σ e)``.

    Masked logits (``−inf``, e.g. a ``−inf`` bias on padded vocabulary rows) have ``e = 0``. A row
    whose logits are all ``−inf`` (a fully masked vocabulary shard) is shifted by 0 and gets
    ``s = 0``, ``lse = −inf``. With ``finite`` the shifted ``−inf`` entries are then clamped to the
    dtype's lowest finite value, so that products ``e·z`` used by entropy and KL are 0 there
    instead of ``0·(−inf) = NaN``.
    """
    m = max_shift(z.amax(dim=-1))
    z.sub_(m[:, None])
    e = torch.exp(z)
    if finite:
        z.clamp_min_(torch.finfo(z.dtype).min)
    return m, e, e.sum(-1)


class _Compact:
    """The valid rows of every per-token input, gathered once (O(N·D), not O(N·V))."""

    def __init__(self, row_valid: torch.Tensor, targets: torch.Tensor, tvalid: torch.Tensor, cd: torch.dtype):
        self.rows = row_valid.nonzero().squeeze(1)
        self.all_valid = self.rows.numel() == row_valid.numel()
        self.cd = cd
        self.safe = self.take(torch.where(tvalid, targets, torch.zeros_like(targets)))

    def take(self, t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t if self.all_valid else t[self.rows]
        return t if dtype is None else t.to(dtype)

    def chunks(self, vocab: int):
        size = rows_per_chunk(vocab)
        for start in range(0, self.rows.numel(), size):
            yield slice(start, start + size)


def _up(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def chunked_forward(h, w, b, rh, rw, rb, targets, tvalid, row_valid, params: StatsParams) -> RawStats:
    n, j = targets.shape
    cd = accum_dtype(h.dtype)
    dev = h.device
    c = _Compact(row_valid, targets, tvalid, cd)
    w_c, b_c = w.to(cd), _up(b, cd)
    has_ref = rh is not None
    rw_c, rb_c = (rw.to(cd), _up(rb, cd)) if has_ref else (None, None)
    h_v, rh_v = c.take(h), c.take(rh)
    nv = c.rows.numel()

    tgt = torch.zeros(nv, j, dtype=cd, device=dev)
    lse = torch.zeros(nv, dtype=cd, device=dev)
    ref_tgt = torch.zeros(nv, j, dtype=cd, device=dev) if has_ref else None
    ref_lse = torch.zeros(nv, dtype=cd, device=dev) if has_ref else None
    kl = torch.zeros(nv, dtype=cd, device=dev) if params.kl else None
    ent = torch.zeros(nv, dtype=cd, device=dev) if params.entropy else None

    for sl in c.chunks(w.shape[0]):
        safe = c.safe[sl]
        _, z = _logits(h_v[sl].to(cd), w_c, b_c, params)
        tgt[sl] = z.gather(1, safe)
        m, e, s = _shifted_exp(z, finite=params.entropy or params.kl)  # z now holds z − m
        log_s = s.log()
        lse[sl] = m + log_s
        if ent is not None:
            ent[sl] = log_s - _rowdot(e, z) / s
        del e
        if has_ref:
            _, zr = _logits(rh_v[sl].to(cd), rw_c, rb_c, params)
            ref_tgt[sl] = zr.gather(1, safe)
            mr, er, sr = _shifted_exp(zr, finite=params.kl)
            log_sr = sr.log()
            ref_lse[sl] = mr + log_sr
            if kl is not None:
                # Σ q (ℓ_r − ℓ) = Σ e_r (zs_r − zs) / s_r + log s − log s_r: one row-dot of a
                # difference, so bitwise-equal logits give exactly 0.
                kl[sl] = (_rowdot(er, zr.sub_(z)) / sr + log_s - log_sr).clamp_min_(0.0)
            del zr, er
        del z
    return RawStats(*(_scatter(x, c, n) for x in (tgt, lse, ref_tgt, ref_lse, kl, ent)))


def _scatter(x: Optional[torch.Tensor], c: _Compact, n: int) -> Optional[torch.Tensor]:
    """Back to all N rows (ignored rows 0)."""
    if x is None or c.all_valid:
        return x
    out = x.new_zeros((n,) + tuple(x.shape[1:]))
    out[c.rows] = x
    return out


def chunked_backward(
    h, w, b, rh, rw, rb, targets, tvalid, row_valid, lse, ref_lse, entropy,
    grads: StatGrads, params: StatsParams, needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns ``(∂hidden, ∂weight, ∂bias)`` in the compute dtype (``None`` where ``needs`` says no)."""
    need_dh, need_dw, need_db = needs
    cd = accum_dtype(h.dtype)
    c = _Compact(row_valid, targets, tvalid, cd)
    w_c, b_c = w.to(cd), _up(b, cd)
    use_q = grads.g_kl is not None
    use_ent = grads.g_entropy is not None
    rw_c, rb_c = (rw.to(cd), _up(rb, cd)) if use_q else (None, None)
    h_v = c.take(h)
    rh_v = c.take(rh) if use_q else None
    lse_v, g_p = c.take(lse, cd), c.take(grads.g_lse, cd)
    g_tgt = c.take(grads.g_tgt, cd)
    if use_q:
        g_kl, ref_lse_v = c.take(grads.g_kl, cd), c.take(ref_lse, cd)
        g_p = g_p + g_kl
    if use_ent:
        g_ent, ent_v = c.take(grads.g_entropy, cd), c.take(entropy, cd)
    dh_v = torch.empty(h_v.shape, dtype=cd, device=h.device) if need_dh else None
    dw = torch.zeros(w.shape, dtype=cd, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=cd, device=w.device) if need_db else None
    transformed = params.softcap is not None or params.temperature != 1.0

    for sl in c.chunks(w.shape[0]):
        h_c = h_v[sl].to(cd)
        raw, z = _logits(h_c, w_c, b_c, params)
        dz = z.sub_(lse_v[sl, None])  # ℓ = log p, in place
        if use_ent:
            # dz = p ⊙ (g_p − g_H(ℓ + H))
            p = torch.exp(dz)
            dz.add_(ent_v[sl, None]).mul_(-g_ent[sl, None]).add_(g_p[sl, None]).mul_(p)
            # A masked logit (ℓ = −inf, p = 0) contributes nothing, not 0·inf = NaN.
            dz.masked_fill_(p == 0, 0.0)
            del p
        else:
            dz.exp_().mul_(g_p[sl, None])
        if use_q:
            _, zr = _logits(rh_v[sl].to(cd), rw_c, rb_c, params)
            dz.sub_(zr.sub_(ref_lse_v[sl, None]).exp_().mul_(g_kl[sl, None]))
            del zr
        dz.scatter_add_(1, c.safe[sl], g_tgt[sl])
        if transformed:
            transform_grad_(dz, raw, params.temperature, params.softcap)
        del raw, z
        if need_dh:
            torch.mm(dz, w_c, out=dh_v[sl])
        if need_dw:
            dw.addmm_(dz.t(), h_c)
        if need_db:
            db += dz.sum(0)
    dh = None
    if need_dh:
        dh = dh_v if c.all_valid else _scatter(dh_v, c, h.shape[0])
    # Accumulation precision (fp32, or fp64 for fp64 inputs): the caller sums over ranks and casts.
    return dh, dw, db
