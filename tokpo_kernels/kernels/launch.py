"""The Triton strategies behind the backend seam (``tokpo_kernels.backends.base``).

Forward, *streaming*: one fused kernel (``forward_stats.py``) plus the gathered target logits
(``target_logits.py``); ignored tokens are dropped without a host sync (``row_index`` lists valid
rows first, a stable argsort of the row mask, and ``n_valid`` stays on the device).

Forward, *chunked*: per vocabulary chunk a GEMM into fp32 logits of the compacted rows, then the
row-statistics kernel (``row_stats.py``). A GEMM needs its row count on the host: the valid-row
count is read once (one device-to-host copy, which waits for the work queued before it: tens of
microseconds of idle GPU per call, against running the ignored rows through every GEMM, which
costs their share of 2·N·D·V FLOPs — a third of the step when a third of the tokens are prompt).

Backward, both strategies (``backward_chunks.py``): per chunk a ``∂z`` kernel, then GEMMs for ``∂W``
and ``∂h``; the forward's row permutation is reused (``RawStats.row_order``), the valid-row count
read once. Statistics and gradients are accumulated in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import threading
from typing import ContextManager, Optional, Tuple

import torch

from tokpo_kernels import _types as seam  # the backend seam's value types
from tokpo_kernels._alloc import empty_output
from tokpo_kernels._compat import triton_interpreter_enabled
from tokpo_kernels.kernels.backward_chunks import chunked_backward
from tokpo_kernels.kernels.chunking import check_environment, chunk_plan
from tokpo_kernels.kernels.configs import backward_config, forward_config, forward_splits
from tokpo_kernels.kernels.forward_stats import MAX_PLANES, NUM_PARTIALS, launch_forward_stats, merge_splits
from tokpo_kernels.kernels.gemm import compact_rows, expand_rows, mm_f32, valid_rows_first
from tokpo_kernels.kernels.row_stats import launch_row_stats
from tokpo_kernels.kernels.target_logits import launch_target_logits

# tl.dot's input precision for fp32 operands under each torch.get_float32_matmul_precision(), so
# that the kernels follow the same switch as torch's own fp32 matmuls: "highest" (torch's default)
# keeps true fp32 products; "high" / "medium" allow TF32 tensor cores, as cuBLAS uses them. (None
# of Triton's fp32 modes is torch's single-pass bf16 "medium"; TF32, which "medium" also permits, is
# the closest.)
_FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


# Triton's interpreter is not thread-safe: a launch swaps interpreter versions into the
# triton.language module for its duration and keeps the current program id in one global, so two
# threads launching at once fail inside Triton (e.g. "Did you forget to add @triton.jit ?") or
# leave triton.language patched. Interpreted launches therefore take this lock; compiled (CUDA)
# launches never do.
_INTERPRETER_LOCK = threading.Lock()


def _launch_guard() -> ContextManager[object]:
    """The interpreter lock under ``TRITON_INTERPRET=1``, else nothing."""
    return _INTERPRETER_LOCK if triton_interpreter_enabled() else contextlib.nullcontext()


def _compaction(row_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(row_index, n_valid)``: valid rows first, and their count as a device scalar."""
    row_index = valid_rows_first(row_valid)
    n_valid = row_valid.sum(dtype=torch.int32).reshape(1)
    return row_index, n_valid


def _kernel_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    """(upcast operands to fp32 before tl.dot, tl.dot input precision)."""
    upcast = triton_interpreter_enabled() and dtype in (torch.bfloat16, torch.float16)
    if dtype != torch.float32:
        # The precision only affects fp32 operands. bf16/fp16 ones multiply exactly into fp32 on
        # tensor cores, and the interpreter's upcast operands must stay exact too: "ieee".
        return upcast, "ieee"
    return upcast, _FP32_DOT_PRECISION[torch.get_float32_matmul_precision()]


def _vec(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Biases are read with unit stride by the kernels."""
    return None if bias is None else bias.contiguous()


def triton_forward(
    head: seam.HeadTensors, targets: seam.TargetRows, params: seam.ImplParams, strategy: str
) -> seam.RawStats:
    """The forward statistics of ``Backend.forward`` by ``strategy`` (``"streaming"`` or
    ``"chunked"``), fp32, with the row permutation for the backward."""
    h, w, b, rh, rw, rb = head
    n, j = targets.ids.shape
    check_environment()  # the chunk variables, before any kernel (the streaming forward sizes no chunk)
    row_index, n_valid = _compaction(targets.row_valid)
    tgt_logit, ref_tgt_logit = _target_logits(head, targets, params)
    if strategy == "streaming":
        raw = _streaming_stats(head, row_index, n_valid, params, n)
    else:
        raw = _chunked_stats(head, row_index, int(n_valid.item()), params, n)
    return raw._replace(tgt_logit=tgt_logit, ref_tgt_logit=ref_tgt_logit, row_order=row_index)


def _target_logits(
    head: seam.HeadTensors, targets: seam.TargetRows, params: seam.ImplParams
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The transformed logits at the owned target ids (policy, reference), by the gathered dot."""
    h, w, b, rh, rw, rb = head
    n, j = targets.ids.shape
    ids = targets.ids.contiguous()
    out = []
    for hid, wt, bias in ((h, w, b), (rh, rw, rb)):
        if hid is None:
            out.append(None)
            continue
        logits = empty_output(n, j, dtype=torch.float32, device=h.device)
        with _launch_guard():
            launch_target_logits(hid, wt, _vec(bias), ids, logits,
                                 inv_temperature=1.0 / params.temperature, softcap=params.softcap)
        out.append(logits)
    return out[0], out[1]


def _streaming_stats(
    head: seam.HeadTensors, row_index: torch.Tensor, n_valid: torch.Tensor, params: seam.ImplParams, n: int
) -> seam.RawStats:
    """One fused kernel over (row blocks × vocabulary splits), then the merge of the splits."""
    h, w, b, rh, rw, rb = head
    cfg = forward_config(h.dtype)
    splits = forward_splits(n, w.shape[0], cfg, h.device)
    partials = empty_output(NUM_PARTIALS, splits, n, dtype=torch.float32, device=h.device)
    upcast, precision = _kernel_flags(h.dtype)
    # The reference may be in another dtype than the policy (a bf16 reference beside an fp32
    # policy): its tile gets its own flags, so that each model's tl.dot reads its own dtype.
    ref_upcast, ref_precision = _kernel_flags(rh.dtype) if rh is not None else (upcast, precision)
    with _launch_guard():
        launch_forward_stats(
            h, w, _vec(b), rh, rw, _vec(rb), row_index, n_valid, partials,
            splits=splits, inv_temperature=1.0 / params.temperature, softcap=params.softcap,
            need_kl=params.kl, need_entropy=params.entropy, need_sum=params.logit_sum,
            upcast=upcast, dot_precision=precision, ref_upcast=ref_upcast, ref_dot_precision=ref_precision,
            block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return _merged(partials, rh is not None, params)


def _merged(partials: torch.Tensor, has_ref: bool, params: seam.ImplParams) -> seam.RawStats:
    """The merged per-row statistics of ``partials`` (target logits filled in by the caller)."""
    placeholder = partials.new_empty(0)
    return merge_splits(partials, placeholder, placeholder if has_ref else None, params)


def _chunked_stats(
    head: seam.HeadTensors, row_index: torch.Tensor, n_valid: int, params: seam.ImplParams, n: int
) -> seam.RawStats:
    """Per vocabulary chunk: fp32 logits of the compacted rows by a GEMM, folded into the running
    row statistics by ``row_stats``; the state is one "split" for the merge, scattered back to N rows."""
    h, w, b, rh, rw, rb = head
    v = w.shape[0]
    idx = row_index[:n_valid]
    h_c, rh_c = compact_rows(h, idx, n), compact_rows(rh, idx, n)
    state = torch.zeros(NUM_PARTIALS, 1, n_valid, dtype=torch.float32, device=h.device)
    state[list(MAX_PLANES)] = float("-inf")  # neutral running maxima: the first chunk's max wins
    cols = chunk_plan("chunked", n_valid, v, h.shape[1], in_bytes=h.element_size(), weight_bytes=w.element_size(),
                      has_ref=rh is not None, budget=params.chunk_budget).forward
    if n_valid:
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            z = mm_f32(h_c, w[c0:c1].t())  # [n_valid, D] @ [D, C] -> [n_valid, C] fp32
            zr = mm_f32(rh_c, rw[c0:c1].t()) if rh is not None else None
            with _launch_guard():
                launch_row_stats(z, zr, _vec(b), _vec(rb), state[:, 0], c0,
                                 inv_temperature=1.0 / params.temperature, softcap=params.softcap,
                                 need_kl=params.kl, need_entropy=params.entropy, need_sum=params.logit_sum)
            del z, zr  # before the next chunk's GEMM allocates: one chunk alive at a time
    raw = _merged(state, rh is not None, params)
    scatter = lambda x: expand_rows(x, idx, n)  # noqa: E731
    return raw._replace(lse=scatter(raw.lse), ref_lse=scatter(raw.ref_lse), kl=scatter(raw.kl),
                        entropy=scatter(raw.entropy), max_logit=scatter(raw.max_logit),
                        logit_sum=scatter(raw.logit_sum))


def triton_backward(inputs: seam.BackwardInputs, strategy: str) -> seam.HeadGrads:
    """The input gradients of ``Backend.backward``: per vocabulary chunk a ``∂z`` kernel and two
    GEMMs (``backward_chunks.py``), with the ``tl.dot`` flags of this module."""
    h, rh = inputs.head.hidden, inputs.head.ref_hidden
    upcast, precision = _kernel_flags(h.dtype)
    ref_upcast, ref_precision = _kernel_flags(rh.dtype) if rh is not None else (upcast, precision)
    with _launch_guard():
        return chunked_backward(
            inputs, strategy, backward_config(h.dtype),
            upcast=upcast, dot_precision=precision, ref_upcast=ref_upcast, ref_dot_precision=ref_precision,
        )
