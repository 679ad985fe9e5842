"""Row statistics of one fp32 logit chunk (the *chunked* strategy's forward pass).

The chunked forward computes each vocabulary chunk's raw logits with a GEMM
(``z_c = h_c · W_cᵀ``, fp32 output, compacted rows) and then runs this memory-bound kernel once
over the chunk: it reads every logit once, applies the bias and the logit transform, and folds the
chunk into per-row running accumulators kept in a ``(NUM_PARTIALS, n)`` fp32 state buffer — the
same online accumulators as the streaming kernel (``_tl_numerics``: max, sum-exp, entropy sum, the
reference's max and sum-exp, the KL sum, the plain logit sum). Each program owns ``BLOCK_N`` rows,
so successive chunk launches update the state without atomics; after the last chunk the state is
one "split" for ``forward_stats.split_stats``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tokpo_kernels.kernels._tl_numerics import fold_policy_tile, fold_reference_tile, transform_logits
from tokpo_kernels.kernels.forward_stats import P_A, P_E, P_M, P_MR, P_S, P_SR, P_ZSUM, store_planes


@triton.jit
def _load_logits(z_ptr, b_ptr, pos, row_mask, offs_c, col_mask, col0, stride_zn,
                 inv_temperature, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The transformed (BLOCK_N, BLOCK_V) tile of a raw logit chunk; −inf outside the chunk."""
    raw = tl.load(z_ptr + pos[:, None] * stride_zn + offs_c[None, :],
                  mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    if HAS_BIAS:
        raw += tl.load(b_ptr + col0 + offs_c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP)


@triton.jit
def _row_stats_kernel(
    z_ptr, zr_ptr, b_ptr, rb_ptr, state_ptr,
    N_ROWS, C, col0, stride_zn, stride_zrn,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_KL: tl.constexpr, NEED_ENTROPY: tl.constexpr, NEED_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = pos < N_ROWS
    # The state rows of this program: read, fold the chunk in, write back (no other program
    # touches them, and chunk launches run in order on one stream).
    m = tl.load(state_ptr + P_M * N_ROWS + pos, mask=row_mask, other=float("-inf"))
    s = tl.load(state_ptr + P_S * N_ROWS + pos, mask=row_mask, other=0.0)
    e = s
    mr, sr, a, zsum = m, s, s, s
    if NEED_ENTROPY:
        e = tl.load(state_ptr + P_E * N_ROWS + pos, mask=row_mask, other=0.0)
    if HAS_REF:
        mr = tl.load(state_ptr + P_MR * N_ROWS + pos, mask=row_mask, other=float("-inf"))
        sr = tl.load(state_ptr + P_SR * N_ROWS + pos, mask=row_mask, other=0.0)
        if NEED_KL:
            a = tl.load(state_ptr + P_A * N_ROWS + pos, mask=row_mask, other=0.0)
    if NEED_SUM:
        zsum = tl.load(state_ptr + P_ZSUM * N_ROWS + pos, mask=row_mask, other=0.0)
    for c0 in range(0, C, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        col_mask = offs_c < C
        z = _load_logits(z_ptr, b_ptr, pos, row_mask, offs_c, col_mask, col0, stride_zn,
                         inv_temperature, softcap, HAS_BIAS, HAS_SOFTCAP)
        m, s, e, zsum, z, dm = fold_policy_tile(m, s, e, zsum, z, col_mask, NEED_ENTROPY, NEED_SUM)
        if HAS_REF:
            zr = _load_logits(zr_ptr, rb_ptr, pos, row_mask, offs_c, col_mask, col0, stride_zrn,
                              inv_temperature, softcap, HAS_REF_BIAS, HAS_SOFTCAP)
            mr, sr, a = fold_reference_tile(mr, sr, a, zr, z, m, dm, col_mask, NEED_KL)
    store_planes(state_ptr + pos, N_ROWS, row_mask, m, s, e, mr, sr, a, zsum, HAS_REF, NEED_KL, NEED_ENTROPY, NEED_SUM)


# CUDA: 16 rows × 256 fp32 columns per step at 8 warps = 16 logits per thread, read as 16-byte
# vectors (the chunk's row stride is a multiple of 128 columns, see chunking.COLUMN_QUANTUM), and
# N/16 programs (1024 at N = 16k) keep every SM streaming. (At 4 warps the heaviest variant took
# 230 registers per thread.) Interpreter: small tiles, tiny shapes.
_CUDA_BLOCKS = dict(BLOCK_N=16, BLOCK_V=256, num_warps=8)
_INTERPRETER_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, num_warps=1)


def launch_row_stats(
    z: torch.Tensor, zr: Optional[torch.Tensor], b: Optional[torch.Tensor], rb: Optional[torch.Tensor],
    state: torch.Tensor, col0: int,
    *, inv_temperature: float, softcap: Optional[float], need_kl: bool, need_entropy: bool, need_sum: bool,
) -> None:
    """Fold the raw logit chunk ``z (n, C)`` (fp32, unit column stride; ``zr`` the reference's)
    of vocabulary columns ``col0 .. col0 + C`` into ``state (NUM_PARTIALS, n)``."""
    n, c = z.shape
    if n == 0:
        return
    blocks = _CUDA_BLOCKS if z.is_cuda else _INTERPRETER_BLOCKS
    has_ref = zr is not None
    grid = (triton.cdiv(n, blocks["BLOCK_N"]),)
    _row_stats_kernel[grid](
        z, zr if has_ref else z, b if b is not None else z, rb if rb is not None else z, state,
        n, c, col0, z.stride(0), zr.stride(0) if has_ref else 0,
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_REF=has_ref, HAS_REF_BIAS=rb is not None, HAS_SOFTCAP=softcap is not None,
        NEED_KL=need_kl, NEED_ENTROPY=need_entropy, NEED_SUM=need_sum,
        **blocks,
    )
