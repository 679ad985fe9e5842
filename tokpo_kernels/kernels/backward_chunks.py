"""The backward of both Triton strategies: per vocabulary chunk, ``∂z`` then GEMMs. No atomics.

The vocabulary is walked in windows of ``plan.window`` columns, each in sub-chunks of ``plan.sub``
(``chunking.chunk_plan``: the buffers stay within a memory budget). With ``h_c`` the compacted
valid rows::

    for each sub-chunk c of the window:
        dz_c  = ∂L/∂r of the sub-chunk             (Triton, dz_chunk.py; input dtype, into the
                                                    window's ∂z buffer)
        ∂W[c] = dz_cᵀ · h_c                        (GEMM with fp32 accumulation; these rows of ∂W
                                                    are finished by this one GEMM and written once,
                                                    in the weight's dtype: no fp32 ∂W, no zero-fill)
        ∂b[c] = Σ_rows dz_c                        (fp32 column sums of each row block, summed in
                                                    a fixed order)
    ∂h_c += dz_window · W[window]                  (one GEMM into the fp32 ∂h of the compacted rows)

The window exists for ``∂h``: its fp32 accumulator (N × D) is read and written by every GEMM that
adds into it, so one GEMM per window instead of one per sub-chunk divides that traffic by
``window / sub`` (at the Llama-3-8B shape a 268 MB accumulator per 640-column chunk would cost
more HBM time than the GEMM's tensor time).

Every sum happens in a fixed order (the GEMMs are deterministic for fixed shapes, the chunks run
in order on one stream), so two runs give the same bits. ``dz`` is rounded to the input dtype
before the GEMMs, as a bf16 lm-head's own autograd rounds its ``∂logits``.

The chunked strategy recomputes a sub-chunk's logits with a GEMM (fp32 output) and runs the
elementwise ``∂z`` kernel; the streaming one recomputes them inside its ``∂z`` kernel (``tl.dot``).
The reference's logits are recomputed only when a KL gradient flows (``q`` enters only through
``g_kl``). The GEMMs need the valid-row count on the host: it is read once per call (see
``launch.py``); the row permutation comes from the forward (``SavedStats.row_order``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from tokpo_kernels import _types as seam
from tokpo_kernels.kernels.chunking import chunk_plan
from tokpo_kernels.kernels.configs import KernelConfig
from tokpo_kernels.kernels.dz_chunk import DzInputs, dz_row_block, launch_dz_from_logits, launch_dz_recompute
from tokpo_kernels.kernels.gemm import (
    addmm_f32_,
    compact_rows,
    expand_rows,
    mm_f32,
    mm_into,
    valid_rows_first,
)
from tokpo_kernels.numerics import accum_dtype


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-row statistics and cotangents are read as contiguous fp32 by the ``∂z`` kernels."""
    return None if t is None else t.float().contiguous()


def _row_order(inputs: seam.BackwardInputs) -> torch.Tensor:
    """The forward's permutation (valid rows first), or the same one computed here when the
    forward did not return it."""
    order = inputs.saved.row_order
    if order is not None and order.numel() == inputs.targets.row_valid.shape[0]:
        return order
    return valid_rows_first(inputs.targets.row_valid)


def _dz_inputs(inputs: seam.BackwardInputs) -> DzInputs:
    head, targets, saved, grads, params = inputs.head, inputs.targets, inputs.saved, inputs.grads, inputs.params
    use_q = grads.g_kl is not None
    vec = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return DzInputs(
        bias=vec(head.bias), ref_bias=vec(head.ref_bias) if use_q else None, targets=targets.ids.contiguous(),
        lse=_f32(saved.lse), ref_lse=_f32(saved.ref_lse) if use_q else None,
        entropy=_f32(saved.entropy) if grads.g_entropy is not None else None,
        g_lse=_f32(grads.g_lse), g_tgt=_f32(grads.g_tgt), g_kl=_f32(grads.g_kl), g_entropy=_f32(grads.g_entropy),
        g_logit_sum=_f32(grads.g_logit_sum),
        inv_temperature=1.0 / params.temperature, softcap=params.softcap, filter_eps=params.filter_eps,
    )


def chunked_backward(
    inputs: seam.BackwardInputs, strategy: str, cfg: KernelConfig,
    *, upcast: bool, dot_precision: str, ref_upcast: bool, ref_dot_precision: str,
) -> seam.HeadGrads:
    """``(∂h, ∂W, ∂b)``: ``∂h`` and ``∂b`` fp32, ``∂W`` in the weight's dtype (module docstring)."""
    h, w, _b, rh, rw, _rb = inputs.head
    needs = inputs.needs
    n, d = h.shape
    v = w.shape[0]
    dev = h.device
    use_q = inputs.grads.g_kl is not None
    row_index = _row_order(inputs)
    # One host read: the GEMMs need the row count (launch.py's docstring weighs the cost).
    n_valid = int(inputs.targets.row_valid.sum().item())
    idx = row_index[:n_valid]
    h_c = compact_rows(h, idx, n)
    rh_c = compact_rows(rh, idx, n) if (use_q and strategy == "chunked") else None
    acc = accum_dtype(h.dtype)
    dh_c = torch.zeros(n_valid, d, dtype=acc, device=dev) if needs.hidden else None
    dw = torch.empty(v, d, dtype=w.dtype, device=dev) if needs.weight else None
    db = torch.empty(v, dtype=acc, device=dev) if needs.bias else None
    if n_valid == 0:
        # No valid row: every gradient is 0 (the chunk loop would run empty GEMMs).
        for g in (dw, db):
            if g is not None:
                g.zero_()
        return seam.HeadGrads(expand_rows(dh_c, idx, n), dw, db)
    dz_in = _dz_inputs(inputs)
    plan = chunk_plan(strategy, n_valid, v, d, in_bytes=h.element_size(), weight_bytes=w.element_size(),
                      has_ref=rh is not None, kl_grad=use_q, has_bias=needs.bias, budget=inputs.params.chunk_budget)
    # The Triton 3.9 interpreter converts fp32 to bf16 by truncation (an error up to 2⁻⁷ instead of
    # 2⁻⁹, always towards 0); compiled kernels round to nearest. Under the interpreter (``upcast``
    # is set exactly there for 16-bit inputs) the kernel therefore stores fp32 and torch rounds.
    dz_dtype = torch.float32 if upcast else h.dtype
    block_rows = dz_row_block(dev, cfg.block_n if strategy == "streaming" else 0)
    # One ∂z buffer for every window (the last, narrower one uses its first columns): a new buffer
    # per window would hold two windows at once while the next is allocated.
    dz_buf = torch.empty(n_valid, min(plan.window, v), dtype=dz_dtype, device=dev)
    for w0 in range(0, v, plan.window):
        w1 = min(v, w0 + plan.window)
        dz = dz_buf[:, :w1 - w0]  # the window's ∂z
        for c0 in range(w0, w1, plan.sub):
            c1 = min(w1, c0 + plan.sub)
            dz_c = dz[:, c0 - w0:c1 - w0]  # this sub-chunk's columns (row stride: the window's width)
            db_part = (torch.empty(triton.cdiv(n_valid, block_rows), c1 - c0, dtype=torch.float32, device=dev)
                       if needs.bias else None)
            if strategy == "chunked":
                z = mm_f32(h_c, w[c0:c1].t())  # [n_valid, D] @ [D, C] -> [n_valid, C] fp32 raw logits
                zr = mm_f32(rh_c, rw[c0:c1].t()) if use_q else None
                launch_dz_from_logits(z, zr, row_index, dz_in, dz_c, db_part, c0)
                del z, zr  # freed before the GEMM below allocates its output
            else:
                launch_dz_recompute(
                    h, w, rh, rw, row_index, n_valid, dz_in, dz_c, db_part, c0,
                    upcast=upcast, dot_precision=dot_precision, ref_upcast=ref_upcast,
                    ref_dot_precision=ref_dot_precision, block_n=cfg.block_n, block_v=cfg.block_v,
                    block_d=cfg.block_d, group_n=cfg.group_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )
            if dw is not None:
                # [C, n_valid] @ [n_valid, D] -> [C, D]: these rows of ∂W are finished here.
                mm_into(dw[c0:c1], dz_c.to(h.dtype).t(), h_c)
            if db is not None:
                db[c0:c1] = db_part.sum(0)
        if dh_c is not None:
            # [n_valid, W] @ [W, D] -> [n_valid, D], += in fp32: one pass over the accumulator per window.
            addmm_f32_(dh_c, dz.to(h.dtype), w[w0:w1])
    # Free the chunk buffers and the compacted copies before ∂h is scattered to all rows.
    del dz_buf, dz, dz_c, h_c, rh_c
    return seam.HeadGrads(expand_rows(dh_c, idx, n), dw, db)

