"""Feature detection for optional dependencies, in one place.

Nothing here imports triton or touches CUDA: ``import tokpo_kernels`` must stay cheap and must not
fix Triton's mode early. Triton decides at its own import whether its standard library
(``tl.zeros`` etc. are ``@triton.jit`` functions) runs under the CPU interpreter, so importing it
here would break callers that set ``TRITON_INTERPRET=1`` after importing this package. The
kernels are imported on first use of ``impl="triton"`` instead.
"""

from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
