"""Forward statistics kernel: per-token lse, target logits, entropy and KL(ref || policy).

Grid: (row blocks, vocabulary splits). Each program streams the vocabulary tiles of its split for
BLOCK_N compacted rows, computing ``h·Wᵀ`` (and ``h_ref·W_refᵀ``) tile by tile in fp32 and folding
them into online accumulators (``_tl_numerics``); only O(rows) numbers reach memory. Splitting the
vocabulary keeps the GPU busy when there are few rows (TLPO groups, short batches); the per-split
partial accumulators are merged by ``combine_partials`` in PyTorch (O(splits·N) work).

Rows come through ``row_index`` (valid rows first) and ``n_valid`` lives on the device, so ignored
tokens are skipped without a host sync: programs past ``n_valid`` return before any load.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tokpo_kernels.kernels.configs import autotune_enabled, tuning_space
from tokpo_kernels.numerics import max_shift
from tokpo_kernels.kernels._tl_numerics import (
    compacted_rows,
    logit_tile,
    online_kl_step,
    online_softmax_step,
    store_target_logits,
    transform_logits,
)

# Row of each statistic in the (NUM_PARTIALS, splits, N) partials buffer: Python ints for the
# host code, tl.constexpr twins because a compiled kernel may only read constexpr globals.
_M, _S, _E, _MR, _SR, _A = range(6)
P_M, P_S, P_E, P_MR, P_SR, P_A = (tl.constexpr(i) for i in range(6))
NUM_PARTIALS = 6


@triton.jit(do_not_specialize=["N"])
def _forward_stats_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr,
    tgt_ptr, row_index_ptr, n_valid_ptr,
    tgt_logit_ptr, ref_tgt_logit_ptr, part_ptr,
    N, V, D, D_REF, J, NUM_SPLITS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    stride_tn, stride_tj,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NEED_KL: tl.constexpr, NEED_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    rows, row_mask = compacted_rows(row_index_ptr, start, n_valid, BLOCK_N)
    # Splits own whole tiles; with a BLOCK_V chosen by the autotuner the last split may be empty
    # (then its accumulators stay at their neutral values and combine_partials gives it weight 0).
    v_per_split = tl.cdiv(tl.cdiv(V, NUM_SPLITS), BLOCK_V) * BLOCK_V
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    neg_inf = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m, s, e = neg_inf, zero, zero
    mr, sr, a = neg_inf, zero, zero
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_hi
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, D,
                       stride_hn, stride_hd, stride_wv, stride_wd,
                       HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z = transform_logits(z, inv_temperature, softcap, HAS_SOFTCAP)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        store_target_logits(z, tgt_ptr, tgt_logit_ptr, rows, row_mask, offs_v, col_mask, J, stride_tn, stride_tj)
        m, s, e, dm = online_softmax_step(m, s, e, z, NEED_ENTROPY)
        if HAS_REF:
            zr = logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_mask, offs_v, col_mask, D_REF,
                            stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                            HAS_REF_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            zr = transform_logits(zr, inv_temperature, softcap, HAS_SOFTCAP)
            zr = tl.where(col_mask[None, :], zr, float("-inf"))
            store_target_logits(zr, tgt_ptr, ref_tgt_logit_ptr, rows, row_mask, offs_v, col_mask, J,
                                stride_tn, stride_tj)
            if NEED_KL:
                mr, sr, a = online_kl_step(mr, sr, a, zr, z, m, dm)
            else:
                mr, sr, a, _ = online_softmax_step(mr, sr, a, zr, False)

    split_base = part_ptr + pid_s * N + rows
    plane = tl.num_programs(1) * N
    tl.store(split_base + P_M * plane, m, mask=row_mask)
    tl.store(split_base + P_S * plane, s, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(split_base + P_E * plane, e, mask=row_mask)
    if HAS_REF:
        tl.store(split_base + P_MR * plane, mr, mask=row_mask)
        tl.store(split_base + P_SR * plane, sr, mask=row_mask)
        if NEED_KL:
            tl.store(split_base + P_A * plane, a, mask=row_mask)


def launch_forward_stats(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
    rh: Optional[torch.Tensor], rw: Optional[torch.Tensor], rb: Optional[torch.Tensor],
    targets: torch.Tensor, row_index: torch.Tensor, n_valid: torch.Tensor,
    tgt_logit: torch.Tensor, ref_tgt_logit: Optional[torch.Tensor], partials: torch.Tensor,
    *, splits: int, inv_temperature: float, softcap: Optional[float],
    need_kl: bool, need_entropy: bool, upcast: bool, dot_precision: str,
    block_n: int, block_v: int, block_d: int, num_warps: int, num_stages: int,
) -> None:
    """Launch the forward kernel; every output buffer is written for the valid rows only."""
    n, d = h.shape
    v = w.shape[0]
    has_ref = rh is not None
    dummy = h  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    if autotune_enabled() and h.is_cuda:
        kernel, blocks = _autotuned_forward(h.dtype), {}
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    else:
        kernel = _forward_stats_kernel
        blocks = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
        grid = (triton.cdiv(n, block_n), splits)
    kernel[grid](
        h, w, b if b is not None else dummy,
        rh if has_ref else dummy, rw if has_ref else dummy, rb if rb is not None else dummy,
        targets, row_index, n_valid,
        tgt_logit, ref_tgt_logit if has_ref else tgt_logit, partials,
        n, v, d, rh.shape[1] if has_ref else d, targets.shape[1], splits,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        rh.stride(0) if has_ref else 0, rh.stride(1) if has_ref else 0,
        rw.stride(0) if has_ref else 0, rw.stride(1) if has_ref else 0,
        targets.stride(0), targets.stride(1),
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_REF=has_ref, HAS_REF_BIAS=rb is not None,
        HAS_SOFTCAP=softcap is not None, NEED_KL=need_kl, NEED_ENTROPY=need_entropy,
        UPCAST=upcast, DOT_PRECISION=dot_precision, **blocks,
    )


@functools.lru_cache(maxsize=None)
def _autotuned_forward(dtype: torch.dtype):
    """The forward kernel under ``triton.autotune`` (built on first use, ``TOKPO_AUTOTUNE=1`` only).

    Every output is fully rewritten by each trial, so no buffer needs resetting between trials.
    """
    configs = [
        triton.Config(dict(BLOCK_N=c.block_n, BLOCK_V=c.block_v, BLOCK_D=c.block_d),
                      num_warps=c.num_warps, num_stages=c.num_stages)
        for c in tuning_space("fwd", dtype)
    ]
    return triton.autotune(configs=configs, key=["V", "D", "D_REF", "J"])(_forward_stats_kernel)


def _rebase(m: torch.Tensor, s: torch.Tensor):
    """One distribution's per-split ``(m_s, s_s)`` on the global max ``M``: returns the weights
    ``exp(m_s − M)``, the shifts ``M − m_s``, ``Σ w_s s_s``, its log and ``lse = M + log Σ w_s s_s``."""
    # A row with no finite logit at all (a fully masked vocabulary shard) keeps lse = -inf.
    big = max_shift(m.max(0).values)
    wgt = torch.exp(m - big)
    # An empty split (possible with autotuned blocks) has m = -inf and s = 0: its shift M − m = inf
    # must not meet s = 0. Key on emptiness, not on a vanishing weight: a split whose policy max is
    # far below M still carries reference mass in the KL term.
    shift = torch.where(s > 0, big - m, torch.zeros_like(m))
    total = (wgt * s).sum(0)
    log_total = torch.log(total)
    return wgt, shift, total, log_total, big + log_total


def combine_partials(partials: torch.Tensor, has_ref: bool, need_kl: bool, need_entropy: bool):
    """Merge per-split accumulators into ``(lse, ref_lse, kl, entropy)`` (``None`` when absent).

    With per-split maxima ``m_s`` and ``M = max_s m_s`` (``w_s = exp(m_s − M)``)::

        s = Σ w_s s_s,   e = Σ w_s (e_s − (M − m_s) s_s)
        a = Σ α_s (a_s + s_r,s((M − m_s) − (M_r − m_r,s))),   α_s = exp(m_r,s − M_r)

    which re-bases each split's terms on the global maxima (same algebra as the in-kernel update).
    """
    s = partials[_S]
    wgt, shift, s_tot, log_s, lse = _rebase(partials[_M], s)
    entropy = ref_lse = kl = None
    if need_entropy:
        e_tot = (wgt * (partials[_E] - shift * s)).sum(0)
        entropy = log_s - e_tot / s_tot
    if has_ref:
        sr = partials[_SR]
        alpha, shift_r, sr_tot, log_sr, ref_lse = _rebase(partials[_MR], sr)
        if need_kl:
            a_tot = (alpha * (partials[_A] + sr * (shift - shift_r))).sum(0)
            # Rounding can leave a tiny negative where KL is 0 mathematically; KL >= 0 by definition.
            kl = (a_tot / sr_tot + log_s - log_sr).clamp_min(0.0)
    return lse, ref_lse, kl, entropy
