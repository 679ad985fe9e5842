"""Test-suite setup for tokpo_kernels.

The environment variables below must be set before ``tokpo_kernels`` (and through it, Triton
kernels) is imported anywhere, which is why they come first in this file:

* ``TOKPO_POISON_OUTPUTS=1`` fills every output buffer with NaN before a kernel writes it, so a tile a
  kernel forgets to write shows up as NaN instead of plausible stale memory.
* ``TRITON_INTERPRET=1`` (only without a GPU, and only if the caller did not choose otherwise) makes the
  Triton kernels run on CPU tensors under the interpreter, so CI exercises the real kernel code.
"""

from __future__ import annotations

import os

os.environ["TOKPO_POISON_OUTPUTS"] = "1"

import torch  # noqa: E402  (after the environment is set on purpose)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# ``tests/oracle.py`` is a helper module imported as ``oracle`` by the test files.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokpo_kernels  # noqa: E402,F401  (imported after the environment is set)

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config: pytest.Config) -> None:
    # Declared in pyproject.toml too; registering here keeps ``--strict-markers`` happy when the
    # tests are run from another rootdir.
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running CPU test")
    config.addinivalue_line(
        "markers", "triton: exercises impl='triton' (on CPU under TRITON_INTERPRET=1: slow, keep shapes tiny)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        # Any test parametrised with impl="triton" gets the ``triton`` marker (``-m "not triton"``).
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("impl") == "triton":
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


@pytest.fixture(scope="session")
def device() -> str:
    """Device for Triton tests: "cuda" when available, else "cpu" (Triton then runs interpreted)."""
    return DEVICE


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded per test (inputs are built on CPU in fp64, then cast and moved)."""
    return torch.Generator().manual_seed(seed)
