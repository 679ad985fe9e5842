"""The backward of both Triton strategies: per vocabulary chunk, ``∂z`` then two GEMMs. No atomics.

For chunk ``c`` of ``C`` columns (``chunking.chunk_columns``: the chunk buffers stay within a memory
budget) and the compacted valid rows ``h_c``::

    dz_c  = ∂L/∂r of the chunk                    (Triton, dz_chunk.py; input dtype)
    ∂W[c] = dz_cᵀ · h_c                           (GEMM with fp32 accumulation; each row of ∂W is
                                                   finished by this one GEMM and written once, in
                                                   the weight's dtype: no fp32 ∂W, no zero-fill)
    ∂h_c += dz_c · W[c]                           (GEMM accumulating into the fp32 ∂h of the
                                                   compacted rows, in chunk order)
    ∂b[c] = Σ_rows dz_c                           (fp32 column sums of each row block, summed in
                                                   a fixed order)

Every sum happens in a fixed order (the GEMMs are deterministic for fixed shapes, the chunks run
in order on one stream), so two runs give the same bits. ``dz_c`` is rounded to the input dtype
before the GEMMs, as a bf16 lm-head's own autograd rounds its ``∂logits``.

The chunked strategy recomputes the chunk's logits with a GEMM (fp32 output) and runs the
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
from tokpo_kernels.kernels.chunking import chunk_columns
from tokpo_kernels.kernels.configs import KernelConfig
from tokpo_kernels.kernels.dz_chunk import DzInputs, dz_row_block, launch_dz_from_logits, launch_dz_recompute
from tokpo_kernels.kernels.gemm import accum_dtype, addmm_f32_, compact_rows, expand_rows, mm_f32, mm_into


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-row statistics and cotangents are read as contiguous fp32 by the ``∂z`` kernels."""
    return None if t is None else t.float().contiguous()


def _row_order(inputs: seam.BackwardInputs) -> torch.Tensor:
    """The forward's permutation (valid rows first), or the same one computed here when the
    forward did not return it."""
    order = inputs.saved.row_order
    if order is not None and order.numel() == inputs.targets.row_valid.shape[0]:
        return order
    return torch.argsort((~inputs.targets.row_valid).to(torch.int32), stable=True)


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
    cols = chunk_columns(strategy, n_valid, v, d, in_bytes=h.element_size(), weight_bytes=w.element_size(),
                         has_ref=use_q, budget=inputs.params.chunk_budget)
    # The Triton 3.9 interpreter converts fp32 to bf16 by truncation (an error up to 2⁻⁷ instead of
    # 2⁻⁹, always towards 0); compiled kernels round to nearest. Under the interpreter (``upcast``
    # is set exactly there for 16-bit inputs) the kernel therefore stores fp32 and torch rounds.
    dz_dtype = torch.float32 if upcast else h.dtype
    block_rows = dz_row_block(dev, cfg.block_n if strategy == "streaming" else 0)
    for c0 in range(0, v, cols):
        c1 = min(v, c0 + cols)
        dz = torch.empty(n_valid, c1 - c0, dtype=dz_dtype, device=dev)
        db_part = (torch.empty(triton.cdiv(n_valid, block_rows), c1 - c0, dtype=torch.float32, device=dev)
                   if needs.bias else None)
        if strategy == "chunked":
            z = mm_f32(h_c, w[c0:c1].t())  # [n_valid, D] @ [D, C] -> [n_valid, C] fp32 raw logits
            zr = mm_f32(rh_c, rw[c0:c1].t()) if use_q else None
            launch_dz_from_logits(z, zr, row_index, dz_in, dz, db_part, c0)
            del z, zr  # freed before the GEMMs below allocate their outputs
        else:
            launch_dz_recompute(
                h, w, rh, rw, row_index, n_valid, dz_in, dz, db_part, c0,
                upcast=upcast, dot_precision=dot_precision, ref_upcast=ref_upcast, ref_dot_precision=ref_dot_precision,
                block_n=cfg.block_n, block_v=cfg.block_v, block_d=cfg.block_d, group_n=cfg.group_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        dz = dz.to(h.dtype)  # no-op except under the interpreter (see dz_dtype)
        if dw is not None:
            mm_into(dw[c0:c1], dz.t(), h_c)  # [C, n_valid] @ [n_valid, D] -> [C, D]
        if dh_c is not None:
            addmm_f32_(dh_c, dz, w[c0:c1])  # [n_valid, C] @ [C, D] -> [n_valid, D], += in fp32
        if db is not None:
            db[c0:c1] = db_part.sum(0)
    return seam.HeadGrads(expand_rows(dh_c, idx, n), dw, db)

