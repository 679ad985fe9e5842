"""Block sizes and launch parameters of the ``tl.dot`` kernels: one default config per kernel and
device class.

``"fwd"`` is the streaming forward (``forward_stats.py``), ``"bwd"`` the streaming backward's ∂z
recompute kernel (``dz_chunk.py``). The CUDA defaults are chosen from the sm_90 machine code
(``python tools/compile_for_cuda.py --report``), not yet from GPU timings: with the target-logit
gather out of the vocabulary loop, a 128 × 128 bf16 tile at 8 warps compiles without spills for
the policy-only and the policy + reference variants, and its wgmma is ``64x128x16`` (a 64-column
wgmma needs all of an SM's shared-memory bandwidth); BLOCK_D = 64 bf16 = 128-byte rows for
16-byte ``cp.async`` loads; three stages keep two loads in flight under each wgmma.

``TOKPO_AUTOTUNE=1`` replaces the forward's default by ``triton.autotune`` over ``tuning_space``
(keyed on V, D and D_ref; N is left out on purpose so a tuned config is reused across batch sizes).
The memory-bound row passes (``row_stats.py``, the elementwise ∂z kernel, ``target_logits.py``)
carry their own fixed blocks.

Under the Triton interpreter the blocks are the smallest ``tl.dot`` accepts (16) so that tiny test
shapes still cross several vocabulary tiles and hidden-dimension steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import triton

from tokpo_kernels._compat import triton_interpreter_enabled


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int = 8


_INTERPRETER = KernelConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1, group_n=2)


def cuda_config(kernel: str, dtype: torch.dtype) -> KernelConfig:
    """The default CUDA config of ``kernel`` in ``{"fwd", "bwd"}`` (module docstring)."""
    if kernel not in ("fwd", "bwd"):
        raise ValueError(f"kernel: expected 'fwd' or 'bwd', got {kernel!r}")
    if dtype == torch.float32:
        # fp32 operands take twice the shared memory per stage and twice the registers per tile.
        return KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=3)
    return KernelConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)


def forward_config(dtype: torch.dtype) -> KernelConfig:
    return _INTERPRETER if triton_interpreter_enabled() else cuda_config("fwd", dtype)


def backward_config(dtype: torch.dtype) -> KernelConfig:
    return _INTERPRETER if triton_interpreter_enabled() else cuda_config("bwd", dtype)


def forward_splits(n_rows: int, vocab: int, cfg: KernelConfig, device: torch.device) -> int:
    """How many vocabulary splits the streaming forward's grid uses.

    At least ``_L2_SPLITS`` when the vocabulary allows: the split index varies fastest in the grid,
    so the programs resident at once share ``#SMs / splits`` row blocks of ``h`` through L2
    (``forward_stats.py``); more when rows are few, to fill the GPU twice over; never fewer than 8
    vocabulary tiles per split, so the partial-accumulator write and merge stay negligible.
    ``TOKPO_FORWARD_SPLITS`` overrides it (tests use it to exercise the merge under the interpreter).
    """
    forced = os.environ.get("TOKPO_FORWARD_SPLITS")
    tiles = triton.cdiv(vocab, cfg.block_v)
    if forced:
        return max(1, min(int(forced), tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(max(n_rows, 1), cfg.block_n)
    return max(1, min(tiles // 8, max(_L2_SPLITS, triton.cdiv(2 * sms, row_blocks))))


# 8 splits: the 132 programs resident on an H100 (one 128 × 128 CTA per SM) then cover ~17 row
# blocks of h (17 × 128 rows × 4096 × 2 B ≈ 17 MB at Llama-3-8B), well inside the 50 MB L2, where
# one split per row block would need 132 blocks (135 MB) and refetch h from HBM.
_L2_SPLITS = 8


def autotune_enabled() -> bool:
    """``TOKPO_AUTOTUNE=1``: tune block sizes per (V, D, D_ref, J) at first call (CUDA only)."""
    return os.environ.get("TOKPO_AUTOTUNE", "0") not in ("", "0")


def tuning_space(kernel: str, dtype: torch.dtype) -> List[KernelConfig]:
    """Candidate configs for ``kernel`` in ``{"fwd", "bwd"}`` (around the defaults: tile shape,
    depth of the hidden-dimension step, pipeline stages). Only the forward is autotuned at run
    time; the ``"bwd"`` space is compiled for sm_90 by the tools so that it stays valid.

    fp32 operands take twice the shared memory per stage, so their hidden-dimension step is
    halved: with BLOCK_D = 64 the (64 × 256) tile at 4 forward / 3 backward stages needs 240 KiB,
    over sm_90's 227 KiB (measured by ``tools/compile_for_cuda.py --space``).
    """
    stages = (3, 4) if kernel == "fwd" else (2, 3)
    shrink = 2 if dtype == torch.float32 else 1
    space = []
    for block_n, block_v, block_d, warps in ((64, 128, 64, 8), (128, 128, 64, 8), (64, 256, 64, 8),
                                            (128, 64, 64, 4), (64, 64, 32, 4)):
        for st in stages:
            space.append(KernelConfig(block_n, block_v, block_d // shrink, warps, st))
    return space
