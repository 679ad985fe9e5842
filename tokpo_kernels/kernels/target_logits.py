"""Target logits by a gathered dot: ``z[i, j] = transform(h[i] · W[y_ij] (+ b[y_ij]))``.

Both strategies take the target logits out of the vocabulary loop: gathering them inside it
(comparing every tile against every target id) cost the streaming kernel 125 registers and made
every larger tile spill on sm_90. Here one program reads ``BLOCK_R`` (row, target) pairs, the
hidden rows and the gathered weight rows, and forms the dot products in fp32: ``2·N·J·D`` FLOPs
and ``N·J·D`` weight elements read, noise next to the ``2·N·D·V`` of the logits.

The result differs from the logit the vocabulary loop sees only by the order of the fp32
accumulation (a few ulp); the statistics and ``logp = z_y − lse`` stay within the fp32 contract.
Pairs whose id is negative (ignored, or owned by another rank of a vocabulary-parallel head)
are not written: the caller masks them, as it always did.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tokpo_kernels.kernels._tl_numerics import transform_logits


@triton.jit
def _target_logits_kernel(
    h_ptr, w_ptr, b_ptr, ids_ptr, out_ptr,
    PAIRS, J, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Pair p = i·J + j of the contiguous (N, J) ids: row i = p // J.
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = offs_p < PAIRS
    ids = tl.load(ids_ptr + offs_p, mask=in_range, other=-1)
    valid = in_range & (ids >= 0)
    rows = offs_p // J
    safe_ids = tl.where(valid, ids, 0).to(tl.int64)  # int64: id·stride passes 2³¹ on large heads
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = valid[:, None] & (offs_d < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd, mask=mask, other=0.0)
        w = tl.load(w_ptr + safe_ids[:, None] * stride_wv + offs_d[None, :] * stride_wd, mask=mask, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + safe_ids, mask=valid, other=0.0).to(tl.float32)
    z = transform_logits(acc, inv_temperature, softcap, HAS_SOFTCAP)
    tl.store(out_ptr + offs_p, z, mask=valid)


# Pairs per program and hidden step on CUDA: 32 × 128 bf16 elements = 8 KiB of each operand per
# step, 16-byte vector loads per thread at 4 warps; under the interpreter smaller blocks keep tiny
# shapes cheap.
_CUDA_BLOCKS = dict(BLOCK_R=32, BLOCK_D=128, num_warps=4)
_INTERPRETER_BLOCKS = dict(BLOCK_R=16, BLOCK_D=32, num_warps=1)


def launch_target_logits(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], ids: torch.Tensor, out: torch.Tensor,
    *, inv_temperature: float, softcap: Optional[float],
) -> None:
    """Write the transformed target logits of every non-negative id of ``ids (N, J)`` (contiguous)
    into ``out (N, J)`` (fp32, contiguous); other entries are left untouched."""
    n, j = ids.shape
    pairs = n * j
    if pairs == 0:
        return
    blocks = _CUDA_BLOCKS if h.is_cuda else _INTERPRETER_BLOCKS
    grid = (triton.cdiv(pairs, blocks["BLOCK_R"]),)
    _target_logits_kernel[grid](
        h, w, b if b is not None else out, ids, out,
        pairs, j, h.shape[1],
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None,
        **blocks,
    )
