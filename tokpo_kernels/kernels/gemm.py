"""The GEMMs of the Triton strategies: fp32 output (fp32 accumulation) for every input dtype.

On CUDA, bf16/fp16 operands go to cuBLAS with ``out_dtype=torch.float32`` (torch ≥ 2.9:
``aten::mm.dtype`` / ``aten::addmm.dtype``), so products and sums are fp32 and the output is never
rounded to 16 bits. The in-place accumulating form ``addmm(acc, a, b, out_dtype=fp32, out=acc)``
is checked once per device and dtype against a float64 product before it is relied on (a torch
issue reports ``addmm(..., out=, out_dtype=)`` misbehaving with a 1-D bias; the 2-D ``self is out``
case is what is used here); if the check fails, or the overload is missing, the sum goes through a
temporary (``acc.add_(mm(a, b))``), which costs one ``acc``-sized buffer and one more pass over it.

On CPU (the Triton interpreter's tests, and tiny shapes) there is no ``mm.dtype`` kernel: 16-bit
operands are upcast to fp32 first, which gives the same exact products and fp32 sums. fp32 inputs
use plain fp32 GEMMs (TF32 under ``torch.set_float32_matmul_precision("high")``, as every fp32
matmul of torch); fp64 stays fp64.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch

from tokpo_kernels.numerics import accum_dtype

_HALF = (torch.bfloat16, torch.float16)


def _cuda_half(a: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype in _HALF


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with products and sums in fp32 (fp64 for fp64) and an fp32 (fp64) result."""
    if _cuda_half(a) and _has_out_dtype(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    acc = accum_dtype(a.dtype)
    return torch.mm(a.to(acc), b.to(acc))  # a no-op cast for fp32 / fp64 operands


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32 (fp64 for fp64 operands); returns ``acc``."""
    if _cuda_half(a) and _has_out_dtype(a.device, a.dtype):
        if _inplace_addmm_ok(acc.device, a.dtype):
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with fp32 accumulation, ``out`` in the operands' dtype.

    16-bit results go through an fp32 product that is rounded once (cuBLAS's own 16-bit output
    may accumulate in reduced precision when ``allow_bf16_reduced_precision_reduction`` is on).
    """
    if out.dtype == a.dtype == b.dtype == accum_dtype(a.dtype):  # fp32 / fp64: straight into ``out``
        return torch.mm(a, b, out=out)
    return out.copy_(mm_f32(a, b))


@functools.lru_cache(maxsize=None)
def _has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has ``mm(..., out_dtype=torch.float32)`` for ``dtype`` on ``device`` (added
    in torch 2.9; the package supports torch ≥ 2.5). Without it the operands are upcast to fp32:
    the same exact products and fp32 sums, at the fp32 GEMM rate — correct but several times slower,
    so it is said once."""
    a = torch.ones(16, 16, device=device, dtype=dtype)
    try:
        ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        ok = False
    if not ok:
        warnings.warn(
            f"torch {torch.__version__} has no mm(..., out_dtype=torch.float32) for {dtype} on {device.type}: "
            "the Triton strategies' GEMMs run on fp32 copies of their operands (exact, but slower); "
            "torch >= 2.9 runs them on the tensor cores",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


@functools.lru_cache(maxsize=None)
def _inplace_addmm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``addmm(acc, a, b, out_dtype=fp32, out=acc)`` accumulates correctly here: one
    64 × 96 × 80 product against float64 (run once per device and dtype)."""
    a, b, acc = _probe(device, dtype)
    want = acc.double() + a.double() @ b.double()
    try:
        got = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    # fp32 accumulation of 96 exact products: a few ulp of the largest partial sum.
    return bool(((got.double() - want).abs().max() <= 1e-5 * want.abs().max()).item())


def _probe(device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(64, 96, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(96, 80, generator=gen).to(device=device, dtype=dtype)
    acc = torch.randn(64, 80, generator=gen).to(device=device)
    return a, b, acc


def valid_rows_first(row_valid: torch.Tensor) -> torch.Tensor:
    """The stable permutation that lists the valid rows first (int64, (N,)), computed on the device
    without a host sync: the row order of every GEMM operand ``compact_rows`` builds."""
    return torch.argsort((~row_valid).to(torch.int32), stable=True)


def compact_rows(x: Optional[torch.Tensor], idx: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """``x[idx]`` as a contiguous GEMM operand (``x`` itself when all ``n`` rows are kept: the
    stable valid-rows-first permutation is then the identity)."""
    if x is None:
        return None
    return x.contiguous() if idx.shape[0] == n else x.index_select(0, idx)


def expand_rows(x: Optional[torch.Tensor], idx: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """The inverse of ``compact_rows``: rows of ``x`` back at rows ``idx`` of an ``n``-row result,
    0 on the others (ignored rows, which every caller masks or wants at 0)."""
    if x is None or idx.shape[0] == n:
        return x
    return x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, idx, x)
