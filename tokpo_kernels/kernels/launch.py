"""``impl="triton"``: the two kernels behind the implementation interface used by ``ops``.

Ignored tokens are dropped without a host sync: ``row_index`` lists valid rows first (a stable
argsort of the row mask) and ``n_valid`` stays on the device, so kernels skip the tail on their own.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from tokpo_kernels._alloc import empty_output
from tokpo_kernels._compat import triton_interpreter_enabled
from tokpo_kernels._types import RawStats, StatGrads
from tokpo_kernels.kernels.backward import launch_backward
from tokpo_kernels.kernels.configs import backward_config, forward_config, forward_splits
from tokpo_kernels.kernels.forward_stats import NUM_PARTIALS, combine_partials, launch_forward_stats
from tokpo_kernels.ops.params import StatsParams


def _compaction(row_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    row_index = torch.argsort((~row_valid).to(torch.int32), stable=True)
    n_valid = row_valid.sum(dtype=torch.int32).reshape(1)
    return row_index, n_valid


def _kernel_flags(dtype: torch.dtype) -> Tuple[bool, str]:
    """(upcast operands to fp32 before tl.dot, tl.dot input precision)."""
    upcast = triton_interpreter_enabled() and dtype in (torch.bfloat16, torch.float16)
    # fp32 inputs get true fp32 products ("ieee"), matching torch's default matmul precision;
    # the flag has no effect on bf16/fp16 operands.
    return upcast, "ieee"


def _ids(targets: torch.Tensor) -> torch.Tensor:
    return targets if targets.dtype in (torch.int32, torch.int64) else targets.long()


def _vec(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Biases are read with unit stride by the kernels."""
    return None if bias is None else bias.contiguous()


def triton_forward(h, w, b, rh, rw, rb, targets, tvalid, row_valid, params: StatsParams) -> RawStats:
    n, j = targets.shape
    dev = h.device
    cfg = forward_config(h.dtype)
    splits = forward_splits(n, w.shape[0], cfg, dev)
    row_index, n_valid = _compaction(row_valid)
    has_ref = rh is not None
    tgt_logit = empty_output(n, j, dtype=torch.float32, device=dev)
    ref_tgt_logit = empty_output(n, j, dtype=torch.float32, device=dev) if has_ref else None
    partials = empty_output(NUM_PARTIALS, splits, n, dtype=torch.float32, device=dev)
    upcast, precision = _kernel_flags(h.dtype)
    launch_forward_stats(
        h, w, _vec(b), rh, rw, _vec(rb), _ids(targets), row_index, n_valid,
        tgt_logit, ref_tgt_logit, partials,
        splits=splits, inv_temperature=1.0 / params.temperature,
        softcap=params.softcap, need_kl=params.kl, need_entropy=params.entropy,
        upcast=upcast, dot_precision=precision,
        block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    lse, ref_lse, kl, entropy = combine_partials(partials, has_ref, params.kl, params.entropy)
    return RawStats(tgt_logit, lse, ref_tgt_logit, ref_lse, kl, entropy)


def triton_backward(
    h, w, b, rh, rw, rb, targets, tvalid, row_valid, lse, ref_lse, entropy,
    grads: StatGrads, params: StatsParams, needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    need_dh, need_dw, need_db = needs
    n, d = h.shape
    v = w.shape[0]
    dev = h.device
    cfg = backward_config(h.dtype)
    row_index, n_valid = _compaction(row_valid)
    # Accumulators: fp32 and zero-initialised (atomics add into them; ignored rows stay 0).
    dh = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(v, d, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    use_q = grads.g_kl is not None
    upcast, precision = _kernel_flags(h.dtype)
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    launch_backward(
        h, w, _vec(b), rh if use_q else None, rw if use_q else None, _vec(rb) if use_q else None,
        _ids(targets), row_index, n_valid,
        f32(lse), f32(ref_lse) if use_q else None, f32(entropy) if grads.g_entropy is not None else None,
        f32(grads.g_lse), f32(grads.g_tgt), f32(grads.g_kl), f32(grads.g_entropy),
        dh, dw, db,
        inv_temperature=1.0 / params.temperature, softcap=params.softcap,
        filter_eps=params.filter_eps,  # already resolved to None or a float by ops
        upcast=upcast, dot_precision=precision,
        block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d, group_n=cfg.group_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # fp32 accumulators: the caller sums them over ranks (vocabulary-parallel) and casts once.
    return dh, dw, db
