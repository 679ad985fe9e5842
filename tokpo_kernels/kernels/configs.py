"""Block sizes and launch parameters: one default config per kernel and device class.

The CUDA defaults are untuned starting points taken from the shape of comparable tile kernels
(a (64 × 128) fp32 logit tile per program keeps two tiles — policy and reference — in registers
at 8 warps; BLOCK_D = 64 bf16 = 128-byte rows for coalesced loads). They are replaced by measured
per-GPU-family configs in the benchmarking issue; autotuning stays opt-in.

``TOKPO_AUTOTUNE=1`` replaces the defaults by ``triton.autotune`` over ``tuning_space`` (keyed on
V, D, D_ref and J; N is left out on purpose so a tuned config is reused across batch sizes).
Every config of the space is compiled for sm_90 by ``tools/compile_for_cuda.py --space`` and
rejected if it needs more shared memory than an H100 has, so the space cannot rot: CI does so for
the bf16 space (``tests/test_cuda_codegen.py``); fp32's is ``--space --dtypes fp32``.

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
    """The default CUDA config of ``kernel`` in ``{"fwd", "bwd"}`` (the forward streams the
    vocabulary through one more pipeline stage; the backward keeps z, z_ref and dz tiles live)."""
    stages = 3 if kernel == "fwd" else 2
    if dtype == torch.float32:
        # fp32 operands take twice the shared memory per stage.
        return KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=stages)
    return KernelConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=stages)


def forward_config(dtype: torch.dtype) -> KernelConfig:
    return _INTERPRETER if triton_interpreter_enabled() else cuda_config("fwd", dtype)


def backward_config(dtype: torch.dtype) -> KernelConfig:
    return _INTERPRETER if triton_interpreter_enabled() else cuda_config("bwd", dtype)


def forward_splits(n_rows: int, vocab: int, cfg: KernelConfig, device: torch.device) -> int:
    """How many vocabulary splits the forward grid uses.

    Enough programs to fill the GPU twice over when rows are few, but at least 8 vocabulary tiles
    per split so the partial-accumulator write and merge stay negligible. ``TOKPO_FORWARD_SPLITS``
    overrides it (tests use it to exercise the merge under the interpreter).
    """
    forced = os.environ.get("TOKPO_FORWARD_SPLITS")
    tiles = triton.cdiv(vocab, cfg.block_v)
    if forced:
        return max(1, min(int(forced), tiles))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(max(n_rows, 1), cfg.block_n)
    return max(1, min(tiles // 8, triton.cdiv(2 * sms, row_blocks)))


def autotune_enabled() -> bool:
    """``TOKPO_AUTOTUNE=1``: tune block sizes per (V, D, D_ref, J) at first call (CUDA only)."""
    return os.environ.get("TOKPO_AUTOTUNE", "0") not in ("", "0")


def tuning_space(kernel: str, dtype: torch.dtype) -> List[KernelConfig]:
    """Candidate configs for ``kernel`` in ``{"fwd", "bwd"}`` (around the defaults: tile shape,
    depth of the hidden-dimension step, pipeline stages).

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
