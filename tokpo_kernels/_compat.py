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
import sys
from typing import Optional

HAS_TRITON = importlib.util.find_spec("triton") is not None

_FIX = (
    "Triton fixes its mode once per process, at the first `import triton`: set TRITON_INTERPRET=1 "
    "(for CPU tensors) or leave it unset (for CUDA) before anything imports triton, and do not change "
    "it afterwards; or use impl='torch'"
)


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreted(jit_fn: object) -> bool:
    """Whether a ``@triton.jit`` object was built for the interpreter. (``@triton.jit`` imports the
    interpreter module to build one, so without that module there is none, and nothing to import.)"""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is not None and isinstance(jit_fn, interpreter.InterpretedFunction)


def triton_mode_mismatch() -> Optional[str]:
    """``None`` when every ``@triton.jit`` function built so far matches ``TRITON_INTERPRET`` now,
    else what differs and the fix.

    ``@triton.jit`` picks interpreter or compiler when it decorates a function: Triton's standard
    library at the first ``import triton``, this package's kernels at the first ``impl="triton"``
    call. A function built in the other mode fails deep inside the first launch (``Cannot call
    @triton.jit'd outside of the scope of a kernel``), e.g. when ``triton`` was imported before
    ``TRITON_INTERPRET=1`` was set. Imports nothing that is not imported yet: without ``triton`` in
    ``sys.modules`` nothing is built, and it will be built in the current mode.
    """
    tl = sys.modules.get("triton.language")
    if tl is None:
        return None
    want = triton_interpreter_enabled()
    env = f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"
    if _interpreted(tl.standard.max) != want:
        when = "before TRITON_INTERPRET=1 was set" if want else "while TRITON_INTERPRET=1 was set"
        return f"triton was imported {when} ({env} now), so its @triton.jit library is in the other mode. {_FIX}"
    kernels = sys.modules.get("tokpo_kernels.kernels.forward_stats")
    if kernels is not None and _interpreted(kernels._forward_stats_kernel) != want:
        built = "for the interpreter" if not want else "for the GPU"
        return (f"the impl='triton' kernels were built {built} at their first use, and {env} now asks for the "
                f"other mode. {_FIX}")
    return None
