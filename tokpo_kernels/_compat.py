"""Feature detection for optional dependencies, in one place.

Nothing here touches CUDA at import time: probing a device is left to call time so that
``import tokpo_kernels`` is cheap and works on machines without a GPU.
"""

from __future__ import annotations

import os

try:  # triton is a declared dependency, but a broken install must not break the torch path.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
