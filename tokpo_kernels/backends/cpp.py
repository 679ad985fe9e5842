"""``impl="cpp"``: the two passes in C++ for CPU tensors (``csrc/``, built on first use).

Each thread takes blocks of token rows (forward) or a range of the vocabulary (backward) and walks
the vocabulary in cache-sized tiles: one GEMM with fp32 output per tile (bf16/fp16 operands on the
CPU's matrix instructions where it has them), then the statistics or ``∂z`` over whole vectors of
tokens. No (N, V) tensor exists and no tile is larger than ``block_rows × block_cols`` fp32 values
per thread; the backward owns ``∂W`` rows per thread (no atomics) and sums per-thread ``∂h``
partials in a fixed order, so results are bitwise reproducible for a given thread count.

float64 inputs take the chunked PyTorch path (``impl="torch"``) unchanged: the extension computes
in fp32 tiles, and fp64 is a reference precision where speed matters little.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from tokpo_kernels import cpp_extension
from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, TargetRows
from tokpo_kernels.backends.chunked import ChunkedBackend
from tokpo_kernels.backends.registry import BackendEntry, register_backend

# Tile shape: token rows per block x vocabulary columns per tile. A (rows x cols) fp32 tile of
# 64 x 512 is 128 KiB, and the forward holds two (policy and reference) beside the gathered hidden
# rows, inside a per-core L2 of 512 KiB-2 MiB. Measured on 2 cores (bench/results/cpp-tiles.txt).
BLOCK_ROWS = 64
BLOCK_COLS = 512
# The per-thread ∂h partials of the backward together stay within this many bytes; larger token
# counts are processed in groups of rows (each group re-reads the weight once).
PARTIAL_BYTES = 64 << 20


def _block_shape() -> Tuple[int, int]:
    """``$TOKPO_CPP_BLOCK`` ("rows,cols") overrides the tile shape, for tuning."""
    env = os.environ.get("TOKPO_CPP_BLOCK")
    if not env:
        return BLOCK_ROWS, BLOCK_COLS
    try:
        rows, cols = (int(x) for x in env.split(","))
    except ValueError:
        raise ValueError(f"$TOKPO_CPP_BLOCK: expected 'rows,cols' (two positive integers), got {env!r}") from None
    if rows <= 0 or cols <= 0:
        raise ValueError(f"$TOKPO_CPP_BLOCK: expected 'rows,cols' (two positive integers), got {env!r}")
    return rows, cols


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _opt(t: torch.Tensor, wanted: bool) -> Optional[torch.Tensor]:
    """The extension returns an empty tensor for a statistic not asked for."""
    return t if wanted else None


def _rows_and_ids(targets: TargetRows) -> Tuple[torch.Tensor, torch.Tensor]:
    """The valid rows (int64 indices) and the owned ids (``-1`` elsewhere), as the kernels read them."""
    rows = targets.row_valid.nonzero().squeeze(1).contiguous()
    ids = torch.where(targets.owned, targets.ids, torch.full_like(targets.ids, -1)).to(torch.int64).contiguous()
    return rows, ids


def _is_fp64(head: HeadTensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in (head.hidden, head.ref_hidden))


class CppBackend:
    """Both passes through ``torch.ops.tokpo_cpp`` (fp32 statistics and gradients)."""

    def __init__(self) -> None:
        reason = cpp_extension.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"impl='cpp': {reason}")
        self._fp64 = ChunkedBackend()

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        if _is_fp64(head):
            return self._fp64.forward(head, targets, params)
        h, w, b, rh, rw, rb = head
        rows, ids = _rows_and_ids(targets)
        block_rows, block_cols = _block_shape()
        out = torch.ops.tokpo_cpp.forward(
            h.contiguous(), w.contiguous(), _f32(b), _contig(rh), _contig(rw), _f32(rb), rows, ids,
            float(params.temperature), None if params.softcap is None else float(params.softcap),
            params.kl, params.entropy, params.max_logit, params.logit_sum, block_rows, block_cols,
        )
        tgt, lse, ref_tgt, ref_lse, kl, ent, zmax, zsum = out
        has_ref = rh is not None
        return RawStats(
            tgt, lse, _opt(ref_tgt, has_ref), _opt(ref_lse, has_ref), _opt(kl, params.kl),
            _opt(ent, params.entropy), _opt(zmax, params.max_logit), _opt(zsum, params.logit_sum),
        )

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        head, targets, saved, grads, params, needs = inputs
        if _is_fp64(head):
            return self._fp64.backward(inputs)
        h, w, b, rh, rw, rb = head
        rows, ids = _rows_and_ids(targets)
        block_rows, block_cols = _block_shape()
        use_q = grads.g_kl is not None
        use_h = grads.g_entropy is not None
        dh, dw, db = torch.ops.tokpo_cpp.backward(
            h.contiguous(), w.contiguous(), _f32(b),
            _contig(rh) if use_q else None, _contig(rw) if use_q else None, _f32(rb) if use_q else None,
            rows, ids, _f32(saved.lse), _f32(saved.ref_lse) if use_q else None,
            _f32(saved.entropy) if use_h else None,
            _f32(grads.g_lse), _f32(grads.g_tgt), _f32(grads.g_kl), _f32(grads.g_entropy), _f32(grads.g_logit_sum),
            float(params.temperature), None if params.softcap is None else float(params.softcap),
            needs.hidden, needs.weight, needs.bias, block_rows, block_cols, PARTIAL_BYTES,
        )
        return HeadGrads(_opt(dh, needs.hidden), _opt(dw, needs.weight), _opt(db, needs.bias))


def _unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"runs CPU tensors only, got device {device}"
    return cpp_extension.unavailable_reason()


register_backend(
    BackendEntry(
        name="cpp",
        load=CppBackend,
        unavailable=_unavailable,
        auto_devices=("cpu",),
        auto_priority=20,
        summary="C++ on CPU (csrc/, built on first use): cache-sized tiles, fp32 statistics, no N×V tensor",
        warn_on_fallback=True,
    )
)
