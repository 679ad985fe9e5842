"""The *streaming* strategy's forward kernel: per-token lse, entropy, KL(ref || policy), row max and
row sum of the logits, with no logits in memory.

Grid: one program per (row block, vocabulary split), split index fastest. Each program streams the
vocabulary tiles of its split for BLOCK_N compacted rows, computing ``h·Wᵀ`` (and ``h_ref·W_refᵀ``)
tile by tile in fp32 and folding them into online accumulators (``_tl_numerics``); only O(rows)
numbers reach memory. Each split's accumulators become that split's local statistics
(``split_stats``), which the one merge of per-part statistics (``tokpo_kernels.partials``) turns
into global ones in PyTorch (O(splits·N)).

Program order (L2): with the split index varying fastest, the programs resident at one time work
on few row blocks (``#SMs / NUM_SPLITS`` of them), so each ``h`` block is read from HBM once and
then served from L2 to the ``NUM_SPLITS`` programs that share it, while programs of the same split
walk the same ``W`` tiles in step. (Row blocks fastest, as before, made the 132 resident programs
hold 132 distinct ``h`` blocks, 66 MB at the Llama-3-8B shape: more than the L2.)

The target logits are not gathered here: ``target_logits.py`` computes them with a separate
gathered dot, which keeps this kernel's per-tile epilogue to the softmax updates (the in-loop
gather cost 125 registers and made every tile larger than 64 × 128 spill on sm_90).

Rows come through ``row_index`` (valid rows first) and ``n_valid`` lives on the device, so ignored
tokens are skipped without a host sync: programs past ``n_valid`` return before any load.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tokpo_kernels._types import ImplParams, RawStats
from tokpo_kernels.kernels._tl_numerics import (
    compacted_rows,
    fold_policy_tile,
    fold_reference_tile,
    logit_tile,
    transform_logits,
)
from tokpo_kernels.kernels.configs import autotune_enabled, tuning_space
from tokpo_kernels.partials import AxisReducer, merge_local_stats

# Plane of each accumulator in the (NUM_PARTIALS, splits, N) partials buffer: Python ints for the
# host code, tl.constexpr twins because a compiled kernel may only read constexpr globals.
_M, _S, _E, _MR, _SR, _A, _ZSUM = range(7)
P_M, P_S, P_E, P_MR, P_SR, P_A, P_ZSUM = (tl.constexpr(i) for i in range(7))
NUM_PARTIALS = 7
# The planes whose neutral value is −inf (running maxima); every other plane starts at 0.
MAX_PLANES = (_M, _MR)


@triton.jit(do_not_specialize=["N"])
def _forward_stats_kernel(
    h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr,
    row_index_ptr, n_valid_ptr, part_ptr,
    N, V, D, D_REF, NUM_SPLITS,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NEED_KL: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SUM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, REF_UPCAST: tl.constexpr, REF_DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Split index fastest (module docstring: programs resident together share h blocks in L2).
    pid = tl.program_id(0)
    pid_n = pid // NUM_SPLITS
    pid_s = pid % NUM_SPLITS
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start >= n_valid:
        return
    rows, row_mask = compacted_rows(row_index_ptr, start, n_valid, BLOCK_N)
    # Splits own whole tiles; with a BLOCK_V chosen by the autotuner the last split may be empty
    # (then its accumulators stay at their neutral values and the merge gives it weight 0).
    v_per_split = tl.cdiv(tl.cdiv(V, NUM_SPLITS), BLOCK_V) * BLOCK_V
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    neg_inf = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m, s, e = neg_inf, zero, zero
    mr, sr, a = neg_inf, zero, zero
    # Σ z over the split's columns, a plain fp32 sum: it is linear in z, so unlike the exponential
    # sums it needs no max shift. Columns past the split's end add 0.
    zsum = zero
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_hi
        z = logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, D,
                       stride_hn, stride_hd, stride_wv, stride_wd,
                       HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z = transform_logits(z, inv_temperature, softcap, HAS_SOFTCAP)
        m, s, e, zsum, z, dm = fold_policy_tile(m, s, e, zsum, z, col_mask, NEED_ENTROPY, NEED_SUM)
        if HAS_REF:
            zr = logit_tile(rh_ptr, rw_ptr, rb_ptr, rows, row_mask, offs_v, col_mask, D_REF,
                            stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                            HAS_REF_BIAS, REF_UPCAST, REF_DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            zr = transform_logits(zr, inv_temperature, softcap, HAS_SOFTCAP)
            mr, sr, a = fold_reference_tile(mr, sr, a, zr, z, m, dm, col_mask, NEED_KL)

    # int64: NUM_PARTIALS·splits·N may pass 2³¹ (rows is int64 already).
    plane = N.to(tl.int64) * NUM_SPLITS  # N is never specialised (NUM_SPLITS may be a constexpr 1)
    store_planes(part_ptr + pid_s.to(tl.int64) * N + rows, plane, row_mask, m, s, e, mr, sr, a, zsum,
                 HAS_REF, NEED_KL, NEED_ENTROPY, NEED_SUM)


@triton.jit
def store_planes(base, plane, row_mask, m, s, e, mr, sr, a, zsum,
                 HAS_REF: tl.constexpr, NEED_KL: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SUM: tl.constexpr):
    """Write the accumulators of a row block to ``base + P_* · plane`` (this kernel's partials, the
    chunked forward's running state). Only the planes the flags ask for are written;
    ``split_stats`` reads exactly those."""
    tl.store(base + P_M * plane, m, mask=row_mask)
    tl.store(base + P_S * plane, s, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(base + P_E * plane, e, mask=row_mask)
    if HAS_REF:
        tl.store(base + P_MR * plane, mr, mask=row_mask)
        tl.store(base + P_SR * plane, sr, mask=row_mask)
        if NEED_KL:
            tl.store(base + P_A * plane, a, mask=row_mask)
    if NEED_SUM:
        tl.store(base + P_ZSUM * plane, zsum, mask=row_mask)


def launch_forward_stats(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
    rh: Optional[torch.Tensor], rw: Optional[torch.Tensor], rb: Optional[torch.Tensor],
    row_index: torch.Tensor, n_valid: torch.Tensor, partials: torch.Tensor,
    *, splits: int, inv_temperature: float, softcap: Optional[float],
    need_kl: bool, need_entropy: bool, need_sum: bool, upcast: bool, dot_precision: str,
    ref_upcast: bool, ref_dot_precision: str,
    block_n: int, block_v: int, block_d: int, num_warps: int, num_stages: int,
) -> None:
    """Launch the forward kernel; ``partials`` is written for the valid rows only, in the planes the
    flags ask for. ``upcast`` / ``dot_precision`` are the
    policy's ``tl.dot`` flags, ``ref_upcast`` / ``ref_dot_precision`` the reference's: each model's
    logits come from its own dtype."""
    n, d = h.shape
    v = w.shape[0]
    has_ref = rh is not None
    dummy = h  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    if autotune_enabled() and h.is_cuda:
        kernel, blocks = _autotuned_forward(h.dtype), {}
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)  # noqa: E731
    else:
        kernel = _forward_stats_kernel
        blocks = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
        grid = (triton.cdiv(n, block_n) * splits,)
    kernel[grid](
        h, w, b if b is not None else dummy,
        rh if has_ref else dummy, rw if has_ref else dummy, rb if rb is not None else dummy,
        row_index, n_valid, partials,
        n, v, d, rh.shape[1] if has_ref else d, splits,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        rh.stride(0) if has_ref else 0, rh.stride(1) if has_ref else 0,
        rw.stride(0) if has_ref else 0, rw.stride(1) if has_ref else 0,
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_REF=has_ref, HAS_REF_BIAS=rb is not None,
        HAS_SOFTCAP=softcap is not None, NEED_KL=need_kl, NEED_ENTROPY=need_entropy, NEED_SUM=need_sum,
        UPCAST=upcast, DOT_PRECISION=dot_precision, REF_UPCAST=ref_upcast, REF_DOT_PRECISION=ref_dot_precision,
        **blocks,
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
    return triton.autotune(configs=configs, key=["V", "D", "D_REF"])(_forward_stats_kernel)


def split_stats(partials: torch.Tensor, has_ref: bool, params: ImplParams) -> RawStats:
    """Each split's accumulators as that split's local statistics, stacked on dim 0 (no target
    logits: the kernel writes those directly). Reads only the planes the kernel wrote.

    From the accumulators of ``_tl_numerics`` (all relative to the split's maxima ``m``, ``m_r``)::

        lse_s = m + log s        H_s = log s − e/s
        lse_q,s = m_r + log s_r  KL_s = a/s_r + log s − log s_r
        max_s = m                Σ_s z = zsum

    An empty split (``m = −inf``, ``s = 0``) gets ``lse_s = −inf`` and NaN entropy/KL, which the
    merge selects away. The conversion runs in float64: ``lse_s`` carries the magnitude of the logits
    while the merge works on differences ``lse_s − max_s lse_s``; in fp32 rounding each ``lse_s`` to
    ``|lse_s|·2⁻²⁴`` (6e-4 at logits of 1e4) would add an error of the size of the kernel's own to
    entropy and KL. In float64 the merge adds nothing measurable, at O(splits·N) cost.
    """

    def plane(i: int) -> torch.Tensor:
        return partials[i].double()

    m, s = plane(_M), plane(_S)
    log_s = s.log()
    entropy = log_s - plane(_E) / s if params.entropy else None
    ref_lse = kl = None
    if has_ref:
        s_r = plane(_SR)
        log_sr = s_r.log()
        ref_lse = plane(_MR) + log_sr
        if params.kl:
            kl = plane(_A) / s_r + log_s - log_sr
    return RawStats(
        None, m + log_s, None, ref_lse, kl, entropy,
        # The policy's row max is its running max m: max_logit costs nothing extra.
        max_logit=m if params.max_logit else None,
        logit_sum=plane(_ZSUM) if params.logit_sum else None,
    )


def merge_splits(
    partials: torch.Tensor, tgt_logit: torch.Tensor, ref_tgt_logit: Optional[torch.Tensor], params: ImplParams,
) -> RawStats:
    """The global fp32 statistics of the kernel's output: every split's local statistics merged by
    ``tokpo_kernels.partials.merge_local_stats`` (target logits pass through; a reference is present
    exactly when ``ref_tgt_logit`` is)."""
    local = split_stats(partials, ref_tgt_logit is not None, params)
    merged = merge_local_stats(local, AxisReducer())
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    return RawStats(tgt_logit, f32(merged.lse), ref_tgt_logit, f32(merged.ref_lse), f32(merged.kl),
                    f32(merged.entropy), f32(merged.max_logit), f32(merged.logit_sum))
