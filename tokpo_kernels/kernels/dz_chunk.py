"""``∂L/∂r`` of one vocabulary chunk, written in the input dtype: the backward's only Triton work.

The backward of both strategies runs, per vocabulary chunk ``c`` of ``C`` columns::

    dz_c  = ∂L/∂r on the chunk's logits            (this module, (n, C) in the input dtype)
    ∂W[c] = dz_cᵀ · h_c                            (one GEMM, fp32 accumulation: every row finished)
    ∂h   += dz_c · W[c]                            (one GEMM into the fp32 ∂h accumulator)

so no atomic and no fp32 ``∂W`` buffer exist, and the result is the same bit for bit run to run
(``kernels/backward_chunks.py`` orders the chunks). Two kernels write ``dz_c``:

* ``_dz_from_logits_kernel`` (chunked strategy): an elementwise pass over the chunk's raw fp32
  logits, which a GEMM has just recomputed (and the reference's, when a KL gradient flows);
* ``_dz_recompute_kernel`` (streaming strategy): recomputes the logit tiles itself with ``tl.dot``
  (the reference's only when a KL gradient flows) and never holds the fp32 chunk.

Both finish a tile with ``_finish_dz``: with ``p = softmax(z)``, ``ℓ = log p``, ``q`` the reference's
softmax and the per-row cotangents of ``lse``, the target logits, KL, entropy and ``Σ_v z_v`` (derived
above ``_tl_numerics.dz_tile``, ``docs/methods.md`` §1)::

    ∂L/∂z = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H) + g_Σ

and through ``z = c·tanh(r/c)/T`` of the raw logits ``r = h·Wᵀ + b``:
``∂L/∂r = ∂L/∂z · (1 − tanh²(r/c)) / T``. ``∂b`` is the column sum of ``∂L/∂r``: each program writes
its tile's column sums (fp32, before the cast) to a per-row-block partial, which the host sums in a
fixed order.

``filter_eps`` (opt-in approximation) zeroes a tile whose every ``p`` (and ``q``) is below it and
that holds no target: the same gradient as the former atomic kernel, which skipped such tiles.
It no longer saves time (the GEMMs run over whole chunks); it is kept for its numerics contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from tokpo_kernels.kernels._tl_numerics import (
    compacted_rows,
    dz_tile,
    logit_tile,
    tanh_f32,
    target_grad_tile,
    transform_logits,
)


@triton.jit
def _finish_dz(
    raw, zr_raw, pos, rows, row_mask, offs_c, col_mask, col0, pid_n, C,
    b_ptr, rb_ptr, tgt_ptr, lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr, g_sum_ptr,
    dz_ptr, db_part_ptr, J, stride_tn, stride_tj, stride_dzn,
    inv_temperature, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    USE_Q: tl.constexpr, USE_ENTROPY: tl.constexpr, USE_SUM: tl.constexpr, FILTER: tl.constexpr,
    NEED_DB: tl.constexpr,
):
    """From the raw fp32 logit tile (and the reference's) to the stored ``∂L/∂r`` tile and its
    column sums (module docstring). ``pos``: compacted positions (rows of the chunk buffers);
    ``rows``: original row ids (per-row statistics, cotangents and targets)."""
    offs_v = col0 + offs_c  # vocabulary ids of the tile's columns
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        raw += tl.load(b_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    z = transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP)
    logp = z - tl.load(lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
    # Rows past the valid count load 0 for every per-row input, so their dz is 0 before the mask.
    g_p = tl.load(g_lse_ptr + rows, mask=row_mask, other=0.0)
    g_kl = g_p  # placeholder operands of disabled terms: dz_tile never reads them
    logq = logp
    ent = g_p
    g_ent = g_p
    g_sum = g_p
    if USE_Q:
        g_kl = tl.load(g_kl_ptr + rows, mask=row_mask, other=0.0)
        g_p = g_p + g_kl
        if HAS_REF_BIAS:
            zr_raw += tl.load(rb_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        zr = transform_logits(zr_raw, inv_temperature, softcap, HAS_SOFTCAP)
        logq = zr - tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if USE_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
    if USE_SUM:
        g_sum = tl.load(g_sum_ptr + rows, mask=row_mask, other=0.0)
    dz, peak = dz_tile(logp, g_p, ent, g_ent, logq, g_kl, g_sum, tile_mask, USE_ENTROPY, USE_Q, USE_SUM)
    dz, hits = target_grad_tile(dz, tgt_ptr, g_tgt_ptr, rows, row_mask, offs_v, J, stride_tn, stride_tj)
    if FILTER:
        # Opt-in approximation (module docstring); never combined with USE_SUM (see the launcher).
        dz = tl.where((peak < filter_eps) & (hits == 0), 0.0, dz)
    if HAS_SOFTCAP:
        t = tanh_f32(raw / softcap)
        dz = dz * (1.0 - t * t)
    dz = tl.where(tile_mask, dz * inv_temperature, 0.0)
    tl.store(dz_ptr + pos[:, None] * stride_dzn + offs_c[None, :], dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_DB:
        tl.store(db_part_ptr + pid_n.to(tl.int64) * C + offs_c, tl.sum(dz, 0), mask=col_mask)


@triton.jit
def _dz_from_logits_kernel(
    z_ptr, zr_ptr, row_index_ptr,
    b_ptr, rb_ptr, tgt_ptr, lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr, g_sum_ptr,
    dz_ptr, db_part_ptr,
    N_ROWS, C, col0, J, stride_zn, stride_zrn, stride_tn, stride_tj, stride_dzn,
    inv_temperature, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    USE_Q: tl.constexpr, USE_ENTROPY: tl.constexpr, USE_SUM: tl.constexpr, FILTER: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: (row blocks, column tiles of the chunk); a memory-bound pass, any order is as good.
    pid_n = tl.program_id(0)
    start = pid_n * BLOCK_N
    rows, row_mask = compacted_rows(row_index_ptr, start, N_ROWS, BLOCK_N)
    pos = start.to(tl.int64) + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_c < C
    tile_mask = row_mask[:, None] & col_mask[None, :]
    raw = tl.load(z_ptr + pos[:, None] * stride_zn + offs_c[None, :], mask=tile_mask, other=0.0)
    zr_raw = raw  # placeholder when no KL gradient flows (never read)
    if USE_Q:
        zr_raw = tl.load(zr_ptr + pos[:, None] * stride_zrn + offs_c[None, :], mask=tile_mask, other=0.0)
    _finish_dz(raw, zr_raw, pos, rows, row_mask, offs_c, col_mask, col0, pid_n, C,
               b_ptr, rb_ptr, tgt_ptr, lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr,
               g_sum_ptr, dz_ptr, db_part_ptr, J, stride_tn, stride_tj, stride_dzn,
               inv_temperature, softcap, filter_eps,
               HAS_BIAS, HAS_REF_BIAS, HAS_SOFTCAP, USE_Q, USE_ENTROPY, USE_SUM, FILTER, NEED_DB)


@triton.jit(do_not_specialize=["N_ROWS"])
def _dz_recompute_kernel(
    h_ptr, w_ptr, rh_ptr, rw_ptr, row_index_ptr,
    b_ptr, rb_ptr, tgt_ptr, lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr, g_sum_ptr,
    dz_ptr, db_part_ptr,
    N_ROWS, C, col0, D, D_REF, J,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_tn, stride_tj, stride_dzn,
    inv_temperature, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    USE_Q: tl.constexpr, USE_ENTROPY: tl.constexpr, USE_SUM: tl.constexpr, FILTER: tl.constexpr,
    NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, REF_UPCAST: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped program order: GROUP_N row blocks sweep the chunk's column tiles together, so a W
    # tile is reused from L2 by GROUP_N neighbouring programs instead of being re-read from HBM.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_ROWS, BLOCK_N)
    num_c = tl.cdiv(C, BLOCK_V)
    per_group = GROUP_N * num_c
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_c = (pid % per_group) // group_size
    start = pid_n * BLOCK_N
    rows, row_mask = compacted_rows(row_index_ptr, start, N_ROWS, BLOCK_N)
    pos = start.to(tl.int64) + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_c < C
    offs_v = col0 + offs_c
    # The bias is added by _finish_dz (HAS_BIAS=False here), as for the GEMM-computed chunks.
    raw = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, D,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     False, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    zr_raw = raw  # placeholder when no KL gradient flows (never read)
    if USE_Q:
        zr_raw = logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_mask, offs_v, col_mask, D_REF,
                            stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                            False, REF_UPCAST, REF_DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    _finish_dz(raw, zr_raw, pos, rows, row_mask, offs_c, col_mask, col0, pid_n, C,
               b_ptr, rb_ptr, tgt_ptr, lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr,
               g_sum_ptr, dz_ptr, db_part_ptr, J, stride_tn, stride_tj, stride_dzn,
               inv_temperature, softcap, filter_eps,
               HAS_BIAS, HAS_REF_BIAS, HAS_SOFTCAP, USE_Q, USE_ENTROPY, USE_SUM, FILTER, NEED_DB)


def _per_row_args(stats: "DzInputs") -> Tuple[torch.Tensor, ...]:
    """The per-row pointer arguments shared by both kernels (absent ones replaced by ``lse``,
    never dereferenced: their flags are off)."""
    dummy = stats.lse
    pick = lambda t: t if t is not None else dummy  # noqa: E731
    return (pick(stats.bias), pick(stats.ref_bias), stats.targets, stats.lse, pick(stats.ref_lse),
            pick(stats.entropy), stats.g_lse, stats.g_tgt, pick(stats.g_kl), pick(stats.g_entropy),
            pick(stats.g_logit_sum))


@dataclass(frozen=True)
class DzInputs:
    """Everything per row (and the biases) that ``∂z`` needs, in the layouts the kernels read:
    per-row vectors fp32 contiguous by original row id, ``targets (N, J)`` int64 (−1 where ignored
    or not owned), ``g_tgt (N, J)`` fp32 contiguous, biases contiguous. ``None``: the term is off."""

    bias: Optional[torch.Tensor]
    ref_bias: Optional[torch.Tensor]
    targets: torch.Tensor
    lse: torch.Tensor
    ref_lse: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    g_lse: torch.Tensor
    g_tgt: torch.Tensor
    g_kl: Optional[torch.Tensor]
    g_entropy: Optional[torch.Tensor]
    g_logit_sum: Optional[torch.Tensor]
    inv_temperature: float
    softcap: Optional[float]
    filter_eps: Optional[float]

    def __post_init__(self) -> None:
        # A logit-sum cotangent puts g_Σ on every column however small p is: no tile is
        # negligible, so the filter would drop real gradient. Exact mode then.
        if self.g_logit_sum is not None or not self.filter_eps:
            object.__setattr__(self, "filter_eps", None)

    def flags(self, need_db: bool) -> Dict[str, bool]:
        """The constexpr feature flags of ``_finish_dz``."""
        return dict(
            HAS_BIAS=self.bias is not None, HAS_REF_BIAS=self.g_kl is not None and self.ref_bias is not None,
            HAS_SOFTCAP=self.softcap is not None, USE_Q=self.g_kl is not None,
            USE_ENTROPY=self.g_entropy is not None, USE_SUM=self.g_logit_sum is not None,
            FILTER=self.filter_eps is not None, NEED_DB=need_db,
        )

    def scalars(self) -> Tuple[float, float, float]:
        """``(inv_temperature, softcap, filter_eps)`` as kernel arguments (1.0 / 0.0 when off)."""
        return (self.inv_temperature, self.softcap if self.softcap is not None else 1.0,
                self.filter_eps if self.filter_eps is not None else 0.0)


# dz-from-logits on CUDA: 16 rows × 256 columns at 8 warps, 16 fp32 logits per thread (16-byte
# loads, 8-byte bf16 stores). 32 rows compiled to 255 registers in the heaviest variant (one CTA
# per SM: too few warps to keep a memory-bound pass streaming). Interpreter: tiny tiles.
_ELEMENTWISE_CUDA = dict(BLOCK_N=16, BLOCK_V=256, num_warps=8)
_ELEMENTWISE_INTERPRETER = dict(BLOCK_N=16, BLOCK_V=32, num_warps=1)


def dz_row_block(device: torch.device, recompute_block_n: int) -> int:
    """Rows per program of the dz kernel that will run (sizes the ``∂b`` partial buffer)."""
    if recompute_block_n:
        return recompute_block_n
    return (_ELEMENTWISE_CUDA if device.type == "cuda" else _ELEMENTWISE_INTERPRETER)["BLOCK_N"]


def launch_dz_from_logits(
    z: torch.Tensor, zr: Optional[torch.Tensor], row_index: torch.Tensor, inputs: DzInputs,
    dz: torch.Tensor, db_part: Optional[torch.Tensor], col0: int,
) -> None:
    """``dz (n, C)`` from the raw fp32 logit chunk ``z (n, C)`` (``zr``: the reference's, needed
    exactly when a KL gradient flows) of vocabulary columns ``col0 .. col0 + C``; compacted row
    ``k`` is original row ``row_index[k]``."""
    n, c = z.shape
    blocks = _ELEMENTWISE_CUDA if z.is_cuda else _ELEMENTWISE_INTERPRETER
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(c, blocks["BLOCK_V"]))
    _dz_from_logits_kernel[grid](
        z, zr if zr is not None else z, row_index, *_per_row_args(inputs),
        dz, db_part if db_part is not None else z,
        n, c, col0, inputs.targets.shape[1], z.stride(0), zr.stride(0) if zr is not None else 0,
        inputs.targets.stride(0), inputs.targets.stride(1), dz.stride(0),
        *inputs.scalars(), **inputs.flags(db_part is not None), **blocks,
    )


def launch_dz_recompute(
    h: torch.Tensor, w: torch.Tensor, rh: Optional[torch.Tensor], rw: Optional[torch.Tensor],
    row_index: torch.Tensor, n_rows: int, inputs: DzInputs, dz: torch.Tensor, db_part: Optional[torch.Tensor],
    col0: int, *, upcast: bool, dot_precision: str, ref_upcast: bool, ref_dot_precision: str,
    block_n: int, block_v: int, block_d: int, group_n: int, num_warps: int, num_stages: int,
) -> None:
    """``dz (n_rows, C)`` for vocabulary columns ``col0 .. col0 + C`` of ``w``, recomputing the logit
    tiles of ``h[row_index[:n_rows]]`` (and the reference's when a KL gradient flows)."""
    c = dz.shape[1]
    use_q = inputs.g_kl is not None
    grid = (triton.cdiv(n_rows, block_n) * triton.cdiv(c, block_v),)
    _dz_recompute_kernel[grid](
        h, w, rh if use_q else h, rw if use_q else w, row_index, *_per_row_args(inputs),
        dz, db_part if db_part is not None else inputs.lse,
        n_rows, c, col0, h.shape[1], rh.shape[1] if use_q else h.shape[1], inputs.targets.shape[1],
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        rh.stride(0) if use_q else 0, rh.stride(1) if use_q else 0,
        rw.stride(0) if use_q else 0, rw.stride(1) if use_q else 0,
        inputs.targets.stride(0), inputs.targets.stride(1), dz.stride(0),
        *inputs.scalars(), **inputs.flags(db_part is not None),
        UPCAST=upcast, DOT_PRECISION=dot_precision, REF_UPCAST=ref_upcast, REF_DOT_PRECISION=ref_dot_precision,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_N=group_n,
        num_warps=num_warps, num_stages=num_stages,
    )
