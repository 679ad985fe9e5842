"""``impl="triton"``: the two kernels behind the backend seam (``tokpo_kernels.backends.base``).

Ignored tokens are dropped without a host sync: ``row_index`` lists valid rows first (a stable
argsort of the row mask) and ``n_valid`` stays on the device, so kernels skip the tail on their own.
Statistics and gradients are accumulated in fp32 whatever the input dtype.
"""

from __future__ import annotations

import contextlib
import threading
from typing import ContextManager, Optional, Tuple

import torch

from tokpo_kernels import _types as seam  # the backend seam's value types
from tokpo_kernels._alloc import empty_output
from tokpo_kernels._compat import triton_interpreter_enabled
from tokpo_kernels.kernels.backward import launch_backward
from tokpo_kernels.kernels.configs import backward_config, forward_config, forward_splits
from tokpo_kernels.kernels.forward_stats import NUM_PARTIALS, launch_forward_stats, merge_splits

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
    row_index = torch.argsort((~row_valid).to(torch.int32), stable=True)
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


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-row statistics and cotangents are read as contiguous fp32 by the backward kernel."""
    return None if t is None else t.float().contiguous()


def triton_forward(head: seam.HeadTensors, targets: seam.TargetRows, params: seam.ImplParams) -> seam.RawStats:
    """The forward statistics of ``Backend.forward``: one kernel launch over (row blocks, vocabulary
    splits), then the merge of the splits' statistics (``forward_stats.merge_splits``). fp32 results."""
    h, w, b, rh, rw, rb = head
    n, j = targets.ids.shape
    dev = h.device
    cfg = forward_config(h.dtype)
    splits = forward_splits(n, w.shape[0], cfg, dev)
    row_index, n_valid = _compaction(targets.row_valid)
    has_ref = rh is not None
    tgt_logit = empty_output(n, j, dtype=torch.float32, device=dev)
    ref_tgt_logit = empty_output(n, j, dtype=torch.float32, device=dev) if has_ref else None
    partials = empty_output(NUM_PARTIALS, splits, n, dtype=torch.float32, device=dev)
    upcast, precision = _kernel_flags(h.dtype)
    # The reference may be in another dtype than the policy (a bf16 reference beside an fp32
    # policy): its tile gets its own flags, so that each model's tl.dot reads its own dtype.
    ref_upcast, ref_precision = _kernel_flags(rh.dtype) if has_ref else (upcast, precision)
    with _launch_guard():
        launch_forward_stats(
            h, w, _vec(b), rh, rw, _vec(rb), targets.ids, row_index, n_valid,
            tgt_logit, ref_tgt_logit, partials,
            splits=splits, inv_temperature=1.0 / params.temperature, softcap=params.softcap,
            need_kl=params.kl, need_entropy=params.entropy, need_sum=params.logit_sum,
            upcast=upcast, dot_precision=precision, ref_upcast=ref_upcast, ref_dot_precision=ref_precision,
            block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return merge_splits(partials, tgt_logit, ref_tgt_logit, params)


def triton_backward(
    head: seam.HeadTensors, targets: seam.TargetRows, saved: seam.SavedStats, grads: seam.StatGrads,
    params: seam.ImplParams, needs: seam.GradNeeds,
) -> seam.HeadGrads:
    """The input gradients of ``Backend.backward`` from one kernel launch over (row block,
    vocabulary tile) programs, accumulated atomically into fp32 buffers (the caller casts once)."""
    h, w, b, rh, rw, rb = head
    n, d = h.shape
    v = w.shape[0]
    dev = h.device
    cfg = backward_config(h.dtype)
    row_index, n_valid = _compaction(targets.row_valid)
    # Accumulators: fp32 and zero-initialised (atomics add into them; ignored rows stay 0).
    dh = torch.zeros(n, d, dtype=torch.float32, device=dev) if needs.hidden else None
    dw = torch.zeros(v, d, dtype=torch.float32, device=dev) if needs.weight else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if needs.bias else None
    # The reference head is only recomputed when a KL gradient flows (q enters dz through g_kl only).
    use_q = grads.g_kl is not None
    use_entropy = grads.g_entropy is not None
    upcast, precision = _kernel_flags(h.dtype)
    ref_upcast, ref_precision = _kernel_flags(rh.dtype) if use_q else (upcast, precision)
    with _launch_guard():
        launch_backward(
            h, w, _vec(b), rh if use_q else None, rw if use_q else None, _vec(rb) if use_q else None,
            targets.ids, row_index, n_valid,
            _f32(saved.lse), _f32(saved.ref_lse) if use_q else None, _f32(saved.entropy) if use_entropy else None,
            _f32(grads.g_lse), _f32(grads.g_tgt), _f32(grads.g_kl), _f32(grads.g_entropy), _f32(grads.g_logit_sum),
            dh, dw, db,
            inv_temperature=1.0 / params.temperature, softcap=params.softcap,
            filter_eps=params.filter_eps,  # already resolved to None or a float by ops
            upcast=upcast, dot_precision=precision, ref_upcast=ref_upcast, ref_dot_precision=ref_precision,
            block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d, group_n=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return seam.HeadGrads(dh, dw, db)
