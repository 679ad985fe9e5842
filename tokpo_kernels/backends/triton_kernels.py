"""``impl="triton"``: the Triton kernels of ``tokpo_kernels.kernels`` behind the backend seam.

Registering it imports nothing from Triton (see ``tokpo_kernels._compat``): the kernels are built
on first use, so callers may still set ``TRITON_INTERPRET=1`` after ``import tokpo_kernels`` (but
before anything imports ``triton``: otherwise ``impl="triton"`` is refused with a ``ValueError``
that says so, see ``_compat.triton_mode_mismatch``).
"""

from __future__ import annotations

from typing import Optional

import torch

from tokpo_kernels._compat import HAS_TRITON, triton_interpreter_enabled, triton_mode_mismatch
from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, TargetRows
from tokpo_kernels.backends.registry import BackendEntry, register_backend


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
    """Both passes as Triton kernels (``kernels/forward_stats.py``, ``kernels/backward.py``)."""

    def __init__(self) -> None:
        # Imported here, on first use: building the kernels' Python objects imports Triton.
        from tokpo_kernels.kernels import launch

        self._launch = launch

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        return self._launch.triton_forward(head, targets, params)

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        return self._launch.triton_backward(*inputs)


register_backend(
    BackendEntry(
        name="triton",
        load=TritonBackend,
        unavailable=_unavailable,
        auto_devices=("cuda",),
        auto_priority=20,
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
        emulated_devices=("cpu",),
        summary="Triton kernels: CUDA GPUs (and CPU tensors under TRITON_INTERPRET=1, for tests)",
    )
)
