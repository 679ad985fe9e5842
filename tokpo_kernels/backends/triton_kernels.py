"""The Triton backends: ``impl="triton_streaming"``, ``impl="triton_chunked"`` and ``impl="triton"``.

Two strategies (``tokpo_kernels/kernels/strategy.py``, ``docs/architecture.md``), both exact:
*streaming* keeps the forward's logit tiles in registers (a fused Triton kernel, no logits in
memory); *chunked* computes fp32 logit chunks with GEMMs and runs Triton only for the row passes.
Both backwards write ``∂z`` chunk by chunk and finish ``∂W`` / ``∂h`` with GEMMs (no atomics,
deterministic). ``impl="triton"`` runs the device's default strategy (``DEFAULT_STRATEGY``).

Registering them imports nothing from Triton (see ``tokpo_kernels._compat``): the kernels are built
on first use, so callers may still set ``TRITON_INTERPRET=1`` after ``import tokpo_kernels`` (but
before anything imports ``triton``: otherwise the Triton backends are refused with a ``ValueError``
that says so, see ``_compat.triton_mode_mismatch``).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._compat import HAS_TRITON, triton_interpreter_enabled, triton_mode_mismatch
from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, TargetRows
from tokpo_kernels.backends.registry import BackendEntry, register_backend
from tokpo_kernels.kernels.chunking import STRATEGIES
from tokpo_kernels.kernels.strategy import default_strategy


def _unavailable(device: torch.device) -> Optional[str]:
    if not HAS_TRITON:
        return "needs the triton package, which is not importable; use impl='torch'"
    if device.type != "cuda" and not triton_interpreter_enabled():
        return (
            f"needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}; "
            "use impl='torch' on CPU"
        )
    # Checked here, before any kernel runs: a mode mismatch (triton imported before
    # TRITON_INTERPRET=1 was set, ...) otherwise fails deep inside the first launch.
    return triton_mode_mismatch()


class TritonBackend:
    """Both passes by the Triton strategy ``strategy`` (``None``: the device's default)."""

    def __init__(self, strategy: Optional[str] = None) -> None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES} or None, got {strategy!r}")
        # Imported here, on first use: building the kernels' Python objects imports Triton.
        from tokpo_kernels.kernels import launch

        self._launch = launch
        self.strategy = strategy

    def _strategy(self, device: torch.device) -> str:
        return self.strategy or default_strategy(device.type)

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        return self._launch.triton_forward(head, targets, params, self._strategy(head.hidden.device))

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        return self._launch.triton_backward(inputs, self._strategy(inputs.head.hidden.device))


_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_SUMMARIES = {
    "streaming": "Triton, streaming strategy: fused forward (no logits in memory), dz chunks + GEMMs backward",
    "chunked": "Triton, chunked strategy: fp32 logit chunks by GEMMs + Triton row passes, dz chunks + GEMMs",
}

for _strategy in STRATEGIES:
    register_backend(
        BackendEntry(
            name=f"triton_{_strategy}",
            load=lambda s=_strategy: TritonBackend(s),
            unavailable=_unavailable,
            dtypes=_DTYPES,
            emulated_devices=("cpu",),
            returns_row_order=True,
            summary=_SUMMARIES[_strategy] + " (CUDA; CPU tensors under TRITON_INTERPRET=1, for tests)",
        )
    )

register_backend(
    BackendEntry(
        name="triton",
        load=TritonBackend,
        unavailable=_unavailable,
        auto_devices=("cuda",),
        auto_priority=20,
        dtypes=_DTYPES,
        emulated_devices=("cpu",),
        summary="Triton kernels, the device's default strategy (CUDA: chunked); CPU tensors under "
                "TRITON_INTERPRET=1, for tests",
        returns_row_order=True,
        picks_among=tuple(f"triton_{s}" for s in STRATEGIES),
    )
)
