"""``impl="torch"``: the two passes in chunked PyTorch (the CPU path and the non-CUDA fallback).

Valid (non-ignored) rows are gathered once, then processed ``rows_per_chunk(V)`` at a time, so
the largest temporaries are at most three (chunk, V) tiles instead of (N, V): extra memory is
O(chunk·V + N·D), never O(N·V). The backward recomputes the logit chunk (and the reference chunk
only when a KL gradient flows) and applies the universal gradient (``numerics.universal_dz_``).

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

from typing import Iterator, Optional, Tuple

import torch

from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, StatGrads, TargetRows
from tokpo_kernels.backends.registry import BackendEntry, register_backend
from tokpo_kernels.numerics import accum_dtype, max_shift, transform_grad_, transform_logits, universal_dz_

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


def _logits(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], params: ImplParams
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(raw, z)``; ``z`` is ``raw`` itself (no copy) when there is no transform."""
    raw = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    if not params.transformed:
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

    def __init__(self, targets: TargetRows):
        self.rows = targets.row_valid.nonzero().squeeze(1)
        self.all_valid = self.rows.numel() == targets.row_valid.numel()
        self.safe_ids = self.take(targets.safe_ids())

    def take(self, t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t if self.all_valid else t[self.rows]
        return t if dtype is None else t.to(dtype)

    def chunks(self, vocab: int) -> Iterator[slice]:
        size = rows_per_chunk(vocab)
        for start in range(0, self.rows.numel(), size):
            yield slice(start, start + size)

    def scatter(self, x: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
        """Back to all ``n`` rows (rows that are not valid get 0)."""
        if x is None or self.all_valid:
            return x
        out = x.new_zeros((n,) + tuple(x.shape[1:]))
        out[self.rows] = x
        return out


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class ChunkedBackend:
    """Both passes, chunked over rows; accumulation in ``numerics.accum_dtype`` of the inputs."""

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        h, w, b, rh, rw, rb = head
        n, j = targets.ids.shape
        acc = accum_dtype(h.dtype)
        dev = h.device
        c = _Compact(targets)
        w_c, b_c = w.to(acc), _cast(b, acc)
        has_ref = rh is not None
        rw_c, rb_c = (rw.to(acc), _cast(rb, acc)) if has_ref else (None, None)
        h_v, rh_v = c.take(h), c.take(rh)
        nv = c.rows.numel()

        def new(*shape: int, when: bool = True) -> Optional[torch.Tensor]:
            return torch.zeros(*shape, dtype=acc, device=dev) if when else None

        tgt, lse = new(nv, j), new(nv)
        ref_tgt, ref_lse = new(nv, j, when=has_ref), new(nv, when=has_ref)
        kl, ent = new(nv, when=params.kl), new(nv, when=params.entropy)
        zmax, zsum = new(nv, when=params.max_logit), new(nv, when=params.logit_sum)

        for sl in c.chunks(w.shape[0]):
            safe = c.safe_ids[sl]
            _, z = _logits(h_v[sl].to(acc), w_c, b_c, params)
            tgt[sl] = z.gather(1, safe)
            if zmax is not None:
                zmax[sl] = z.amax(dim=-1)
            if zsum is not None:
                zsum[sl] = z.sum(dim=-1)
            m, e, s = _shifted_exp(z, finite=params.entropy or params.kl)  # z now holds z − m
            log_s = s.log()
            lse[sl] = m + log_s
            if ent is not None:
                ent[sl] = log_s - _rowdot(e, z) / s
            del e
            if has_ref:
                _, zr = _logits(rh_v[sl].to(acc), rw_c, rb_c, params)
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
        return RawStats(*(c.scatter(x, n) for x in (tgt, lse, ref_tgt, ref_lse, kl, ent, zmax, zsum)))

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        (h, w, b, rh, rw, rb), targets, saved, grads, params, needs = inputs
        acc = accum_dtype(h.dtype)
        c = _Compact(targets)
        w_c, b_c = w.to(acc), _cast(b, acc)
        use_q = grads.g_kl is not None
        rw_c, rb_c = (rw.to(acc), _cast(rb, acc)) if use_q else (None, None)
        h_v = c.take(h)
        rh_v = c.take(rh) if use_q else None
        lse_v = c.take(saved.lse, acc)
        ref_lse_v = c.take(saved.ref_lse, acc) if use_q else None
        ent_v = c.take(saved.entropy, acc) if grads.g_entropy is not None else None
        grads_v = StatGrads(*(c.take(g, acc) for g in grads))
        dh_v = torch.empty(h_v.shape, dtype=acc, device=h.device) if needs.hidden else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if needs.weight else None
        db = torch.zeros(w.shape[0], dtype=acc, device=w.device) if needs.bias else None

        for sl in c.chunks(w.shape[0]):
            h_c = h_v[sl].to(acc)
            raw, z = _logits(h_c, w_c, b_c, params)
            logq = None
            if use_q:
                _, zr = _logits(rh_v[sl].to(acc), rw_c, rb_c, params)
                logq = zr.sub_(ref_lse_v[sl, None])
            dz = universal_dz_(
                z.sub_(lse_v[sl, None]),  # ℓ = log p, in place
                StatGrads(*(None if g is None else g[sl] for g in grads_v)),
                c.safe_ids[sl],
                entropy=None if ent_v is None else ent_v[sl],
                ref_logq=logq,
            )
            del logq
            if params.transformed:
                transform_grad_(dz, raw, params.temperature, params.softcap)
            del raw, z
            if needs.hidden:
                torch.mm(dz, w_c, out=dh_v[sl])
            if needs.weight:
                dw.addmm_(dz.t(), h_c)
            if needs.bias:
                db += dz.sum(0)
        return HeadGrads(c.scatter(dh_v, h.shape[0]) if needs.hidden else None, dw, db)


register_backend(
    BackendEntry(
        name="torch",
        load=ChunkedBackend,
        auto_devices=("cpu", "cuda"),
        auto_priority=10,
        summary="chunked PyTorch: runs anywhere, O(chunk·V) extra memory",
    )
)
