"""Test-suite setup for tokpo_kernels.

The environment variables below must be set before ``tokpo_kernels`` (and through it, Triton
kernels) is imported anywhere, which is why they come first in this file:

* ``TOKPO_POISON_OUTPUTS=1`` fills every output buffer with NaN before a kernel writes it, so a tile a
  kernel forgets to write shows up as NaN instead of plausible stale memory.
* ``TRITON_INTERPRET=1`` (only without a GPU, and only if the caller did not choose otherwise) makes the
  Triton kernels run on CPU tensors under the interpreter, so CI exercises the real kernel code.

Which implementations a test runs comes from the backend registry (``tokpo_kernels.backends``), never
from a list written in a test: a test that takes an ``impl`` argument is parametrised here with every
registered backend, or with one of the named groups of ``IMPL_GROUPS`` chosen by
``@pytest.mark.impls("group")``. A backend that cannot run here is skipped with the registry's reason.
The ``impl_device`` fixture says where that backend's inputs live.
"""

from __future__ import annotations

import os

os.environ["TOKPO_POISON_OUTPUTS"] = "1"

import torch  # after the environment is set, on purpose

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The ``tests/oracle`` package and ``vocab_parallel_worker`` are imported by bare name by the test files.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokpo_kernels.backends import (  # noqa: E402  (imported after the environment is set)
    available_backends,
    backend_entry,
    concrete_backend_names,
    unavailable_reason,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _cpu_native_backends() -> Tuple[str, ...]:
    """The backends that run CPU tensors without the Triton interpreter (asked of the registry with
    ``TRITON_INTERPRET`` unset for the duration of the question)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return available_backends("cpu")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


_CPU_NATIVE = _cpu_native_backends()

# The backends that run code of their own: a dispatching entry (``impl="triton"``, which runs one
# of the Triton strategies per device) is tested through the backends it picks among.
_CONCRETE = concrete_backend_names()
_CPU_NATIVE = tuple(n for n in _CPU_NATIVE if n in _CONCRETE)

# The named groups of backends a test may ask for with ``@pytest.mark.impls(group)``, all from the registry.
IMPL_GROUPS: Dict[str, Tuple[str, ...]] = {
    # every concrete registered backend (the default of a test that takes ``impl``)
    "all": _CONCRETE,
    # every backend except "naive", the full-logit baseline the fused ones are measured against
    "fused": tuple(n for n in _CONCRETE if n != "naive"),
    # the backends that run CPU tensors natively: cheap enough for the full case lists on CPU inputs
    "cpu": _CPU_NATIVE,
    # the rest: on CPU they run only under the Triton interpreter (tiny shapes), on their device otherwise
    "interpreted": tuple(n for n in _CONCRETE if n not in _CPU_NATIVE),
    # the backends that may run under a process_group (vocabulary parallelism)
    "vocab_parallel": tuple(n for n in _CONCRETE if backend_entry(n).vocab_parallel),
}


def impl_device(impl: str) -> str:
    """Where the inputs of backend ``impl`` live in the tests: CPU for the CPU-native backends, else
    the GPU when there is one (the Triton interpreter on CPU otherwise)."""
    return "cpu" if impl in _CPU_NATIVE else DEVICE


def pytest_configure(config: pytest.Config) -> None:
    # Declared in pyproject.toml too; registering here keeps ``--strict-markers`` happy when the
    # tests are run from another rootdir.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test (deselect locally with -m 'not slow'; CI runs it)")
    config.addinivalue_line(
        "markers", "triton: exercises impl='triton' (on CPU under TRITON_INTERPRET=1: slow, keep shapes tiny)"
    )
    config.addinivalue_line(
        "markers", f"impls(group): parametrise the test's impl argument with a group of backends {sorted(IMPL_GROUPS)}"
    )


@pytest.hookimpl(trylast=True)  # after the parametrize markers, so that the impl id comes last as it always did
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that takes ``impl`` (and does not parametrise it itself) from the registry."""
    if "impl" not in metafunc.fixturenames:
        return
    if any("impl" in _argnames(m) for m in metafunc.definition.iter_markers("parametrize")):
        return
    marker = metafunc.definition.get_closest_marker("impls")
    group = marker.args[0] if marker is not None else "all"
    if group not in IMPL_GROUPS:
        raise ValueError(f"@pytest.mark.impls: expected one of {sorted(IMPL_GROUPS)}, got {group!r}")
    params = []
    for name in IMPL_GROUPS[group]:
        reason = unavailable_reason(name, impl_device(name))
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    metafunc.parametrize("impl", params)


def _argnames(marker: pytest.Mark) -> Tuple[str, ...]:
    names = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
    return tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        # Any test parametrised with a Triton backend gets the ``triton`` marker (``-m "not triton"``).
        callspec = getattr(item, "callspec", None)
        if callspec is not None and str(callspec.params.get("impl", "")).startswith("triton"):
            item.add_marker(pytest.mark.triton)


@pytest.fixture(autouse=True)
def _fixed_seed(request: pytest.FixtureRequest) -> int:
    """A fixed, per-test seed (derived from the test id), so every test is reproducible on its own."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.fixture
def seed(_fixed_seed: int) -> int:
    return _fixed_seed


@pytest.fixture(name="impl_device")
def _impl_device(impl: str) -> str:
    """Where the inputs of this test's ``impl`` live (see ``impl_device``)."""
    return impl_device(impl)


@pytest.fixture(scope="session")
def device() -> str:
    """Device for Triton tests: "cuda" when available, else "cpu" (Triton then runs interpreted)."""
    return DEVICE


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded per test (inputs are built on CPU in fp64, then cast and moved)."""
    return torch.Generator().manual_seed(seed)
