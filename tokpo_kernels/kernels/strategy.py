"""Which Triton strategy ``impl="triton"`` runs on each device type.

Two strategies sit behind the backend seam, both exact (``docs/architecture.md``):

* ``"streaming"`` (``impl="triton_streaming"``): the forward is one fused Triton kernel that keeps
  its logit tiles in registers (no logits in memory at all); the backward writes ``∂z`` chunk by
  chunk with a fused recompute kernel and finishes ``∂W`` / ``∂h`` with GEMMs.
* ``"chunked"`` (``impl="triton_chunked"``): every ``N·D·V`` product is a GEMM (cuBLAS on CUDA) into
  an fp32 logit chunk, and Triton runs only the memory-bound row passes (statistics, ``∂z``).

The default is the one the cost model predicts faster (``python -m bench --model``: at the
Llama-3-8B head, N = 16384, bf16, a forward+backward step of chunked runs at ≈ 70–73 % of the
989 TFLOP/s roofline on an H100 or H200, streaming at ≈ 50–55 %, because Triton 3.9 cannot
warp-specialise a fused GEMM on sm_90 while cuBLAS does; chunked is predicted faster at every
core-tier head and N). It stays a prediction until a GPU run measures both;
``tests/test_cost_model.py`` keeps this table and the model in agreement. Under the Triton
interpreter (CPU tensors) the same choice is used, so that the tests of ``impl="triton"`` run the
CUDA default's code.
"""

from __future__ import annotations

from typing import Dict

from tokpo_kernels.kernels.chunking import STRATEGIES

DEFAULT_STRATEGY: Dict[str, str] = {"cuda": "chunked", "cpu": "chunked"}


def default_strategy(device_type: str) -> str:
    """The strategy ``impl="triton"`` runs for tensors on ``device_type``."""
    strategy = DEFAULT_STRATEGY.get(device_type, DEFAULT_STRATEGY["cuda"])
    assert strategy in STRATEGIES
    return strategy
