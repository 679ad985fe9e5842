"""Backward kernel: ``∂hidden``, ``∂weight``, ``∂bias`` from per-token cotangents, no (N, V) tensor.

Per token, the cotangents ``g_lse, g_j, g_kl, g_H, g_Σ`` of ``lse``, the target logits ``z_{y_j}``,
``KL(ref || policy)``, the entropy and ``Σ_v z_v`` give the universal gradient (``docs/methods.md``
§1; derived above ``_tl_numerics.dz_tile``)::

    dz = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H) + g_Σ

and through the logit transform ``z = c·tanh(r/c)/T`` of the raw logits ``r = h Wᵀ + b``:
``dr = dz·(1 − tanh²(r/c))/T``. Finally ``∂h = dr·W``, ``∂W = drᵀ·h``, ``∂b = Σ_rows dr``.
(``logp_j = z_{y_j} − lse`` is handled by the caller, which folds ``−Σ_j g_logp_j`` into ``g_lse``.)

Grid: one program per (row block, vocabulary tile). Each recomputes its logit tile (and the
reference tile only when ``g_kl`` flows), forms ``dr`` in registers, then sweeps the hidden
dimension adding ``dr·W`` into the fp32 ``∂h`` rows and ``drᵀ·h`` into the fp32 ``∂W`` tile with
atomics (fp32 accumulation of ``∂W`` across row blocks; cast once by the caller).

Cost note (to be measured on a GPU): exact mode issues N·D·⌈V/BLOCK_V⌉ fp32 atomics into ``∂h``
and V·D·⌈N/BLOCK_N⌉ into ``∂W`` — at N = 16k with a Llama-3 head about 67G and 134G adds,
comparable to the matmul time. ``filter_eps`` (opt-in) skips tiles whose softmax mass is below
the dtype's resolution, which removes most of them for a peaked softmax.
"""

from __future__ import annotations

import functools
from typing import Optional

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
from tokpo_kernels.kernels.configs import autotune_enabled, tuning_space


@triton.jit(do_not_specialize=["N"])
def _backward_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr,
    tgt_ptr, row_index_ptr, n_valid_ptr,
    lse_ptr, ref_lse_ptr, ent_ptr, g_lse_ptr, g_tgt_ptr, g_kl_ptr, g_ent_ptr, g_sum_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D, D_REF, J,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_tn, stride_tj,
    inv_temperature, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    USE_Q: tl.constexpr, USE_ENTROPY: tl.constexpr, USE_SUM: tl.constexpr, FILTER: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, REF_UPCAST: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped program order: GROUP_N row blocks sweep the vocabulary together, so a W tile is
    # reused from L2 by GROUP_N neighbouring programs instead of being re-read from HBM.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    rows, row_mask = compacted_rows(row_index_ptr, start, n_valid, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    raw = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, D,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    z = transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    logp = z - lse[:, None]
    # Rows past n_valid load 0 for every per-row input below, so their dz is 0 before the final mask.
    g_p = tl.load(g_lse_ptr + rows, mask=row_mask, other=0.0)
    g_kl = g_p  # placeholder operands of disabled terms: dz_tile never reads them
    logq = logp
    ent = g_p
    g_ent = g_p
    g_sum = g_p
    if USE_Q:
        g_kl = tl.load(g_kl_ptr + rows, mask=row_mask, other=0.0)
        g_p = g_p + g_kl
        zr = logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_mask, offs_v, col_mask, D_REF,
                        stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                        HAS_REF_BIAS, REF_UPCAST, REF_DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        zr = transform_logits(zr, inv_temperature, softcap, HAS_SOFTCAP)
        logq = zr - tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if USE_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
    if USE_SUM:
        g_sum = tl.load(g_sum_ptr + rows, mask=row_mask, other=0.0)
    dz, peak = dz_tile(logp, g_p, ent, g_ent, logq, g_kl, g_sum, tile_mask, USE_ENTROPY, USE_Q, USE_SUM)
    dz, hits = target_grad_tile(dz, tgt_ptr, g_tgt_ptr, rows, row_mask, offs_v, J, stride_tn, stride_tj)
    if FILTER:
        # Opt-in approximation: a tile where every p (and q) is below filter_eps and that holds no
        # target contributes only terms below the dtype's resolution relative to the row's
        # gradient mass; skip its two matmuls and all of its atomics. (Never combined with USE_SUM:
        # see launch_backward.)
        if (peak < filter_eps) & (hits == 0):
            return
    if HAS_SOFTCAP:
        t = tanh_f32(raw / softcap)
        dz = dz * (1.0 - t * t)
    dz = tl.where(tile_mask, dz * inv_temperature, 0.0)

    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, 0), mask=col_mask)
    if UPCAST:
        dz_op = dz
    else:
        # Tensor cores take both operands in the input dtype (bf16/fp16; fp32 stays fp32).
        dz_op = dz.to(h_ptr.dtype.element_ty)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_cols = w_ptr + offs_v[:, None].to(tl.int64) * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # int64: d·stride may pass 2³¹ (see _tl_numerics)
        d_mask = offs_d < D
        if NEED_DH:
            w = tl.load(w_cols + offs_d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            # [BLOCK_N, BLOCK_V] @ [BLOCK_V, BLOCK_D] -> [BLOCK_N, BLOCK_D]
            dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_ptr + rows[:, None] * D + offs_d[None, :], dh,
                          mask=row_mask[:, None] & d_mask[None, :])
        if NEED_DW:
            h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            # [BLOCK_V, BLOCK_N] @ [BLOCK_N, BLOCK_D] -> [BLOCK_V, BLOCK_D]
            dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + offs_v[:, None].to(tl.int64) * D + offs_d[None, :], dw,
                          mask=col_mask[:, None] & d_mask[None, :])


def launch_backward(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
    rh: Optional[torch.Tensor], rw: Optional[torch.Tensor], rb: Optional[torch.Tensor],
    targets: torch.Tensor, row_index: torch.Tensor, n_valid: torch.Tensor,
    lse: torch.Tensor, ref_lse: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
    g_lse: torch.Tensor, g_tgt: torch.Tensor, g_kl: Optional[torch.Tensor], g_entropy: Optional[torch.Tensor],
    g_logit_sum: Optional[torch.Tensor],
    dh: Optional[torch.Tensor], dw: Optional[torch.Tensor], db: Optional[torch.Tensor],
    *, inv_temperature: float, softcap: Optional[float], filter_eps: Optional[float], upcast: bool,
    dot_precision: str, ref_upcast: bool, ref_dot_precision: str,
    block_n: int, block_v: int, block_d: int, group_n: int, num_warps: int, num_stages: int,
) -> None:
    """Accumulate into the zero-initialised fp32 buffers ``dh (N, D)``, ``dw (V, D)``, ``db (V,)``.

    ``filter_eps`` (None: exact) skips tiles with every probability below it and no target; it is
    ignored when ``g_logit_sum`` is given. ``upcast`` / ``dot_precision`` are the policy's ``tl.dot``
    flags, ``ref_upcast`` / ``ref_dot_precision`` those of the recomputed reference tile.
    """
    # A logit-sum cotangent puts g_Σ on every column, however small p is there, so no tile is
    # ever negligible: the filter would drop real gradient. Exact mode then.
    use_filter = bool(filter_eps) and g_logit_sum is None
    n, d = h.shape
    v = w.shape[0]
    use_q = g_kl is not None
    dummy = lse  # stands in for absent input pointers; never dereferenced (constexpr-guarded)
    # Absent accumulators get their own scratch: the autotuner zeroes every accumulator argument
    # between trials, which must never reach an input such as lse.
    scratch = torch.zeros(1, dtype=torch.float32, device=h.device)
    if autotune_enabled() and h.is_cuda:
        kernel, blocks = _autotuned_backward(h.dtype), {}
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
    else:
        kernel = _backward_kernel
        blocks = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
        grid = (triton.cdiv(n, block_n) * triton.cdiv(v, block_v),)
    kernel[grid](
        h, w, b if b is not None else dummy,
        rh if use_q else h, rw if use_q else w, rb if (use_q and rb is not None) else dummy,
        targets, row_index, n_valid,
        lse, ref_lse if use_q else dummy, entropy if g_entropy is not None else dummy,
        g_lse, g_tgt, g_kl if use_q else dummy, g_entropy if g_entropy is not None else dummy,
        g_logit_sum if g_logit_sum is not None else dummy,
        dh if dh is not None else scratch, dw if dw is not None else scratch, db if db is not None else scratch,
        n, v, d, rh.shape[1] if use_q else d, targets.shape[1],
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        rh.stride(0) if use_q else 0, rh.stride(1) if use_q else 0,
        rw.stride(0) if use_q else 0, rw.stride(1) if use_q else 0,
        targets.stride(0), targets.stride(1),
        inv_temperature, softcap if softcap is not None else 1.0, filter_eps if use_filter else 0.0,
        HAS_BIAS=b is not None, HAS_REF_BIAS=use_q and rb is not None, HAS_SOFTCAP=softcap is not None,
        USE_Q=use_q, USE_ENTROPY=g_entropy is not None, USE_SUM=g_logit_sum is not None, FILTER=use_filter,
        NEED_DH=dh is not None, NEED_DW=dw is not None, NEED_DB=db is not None,
        UPCAST=upcast, DOT_PRECISION=dot_precision, REF_UPCAST=ref_upcast, REF_DOT_PRECISION=ref_dot_precision,
        GROUP_N=group_n, **blocks,
    )


@functools.lru_cache(maxsize=None)
def _autotuned_backward(dtype: torch.dtype):
    """The backward kernel under ``triton.autotune`` (``TOKPO_AUTOTUNE=1`` only); the atomically
    accumulated buffers are zeroed before every trial so only the final run's sums remain."""
    configs = [
        triton.Config(dict(BLOCK_N=c.block_n, BLOCK_V=c.block_v, BLOCK_D=c.block_d),
                      num_warps=c.num_warps, num_stages=c.num_stages)
        for c in tuning_space("bwd", dtype)
    ]
    return triton.autotune(configs=configs, key=["V", "D", "D_REF", "J"],
                           reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])(_backward_kernel)
