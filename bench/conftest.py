"""pytest-benchmark front end: ``pytest bench/ --tier cpu`` (or quick, scale, core, sweep).

Not collected by a plain ``pytest`` from the repository root (pyproject's ``testpaths`` is
``tests``); name ``bench/`` explicitly. One ``test_bench_<op>.py`` per operation measures time
in-process with ``benchmark.pedantic`` (fixed rounds, one warm-up) and runs the interpreted-Triton
smoke case; ``test_peer_agreement.py`` checks peers against naive. Peak memory needs a fresh
process per measurement and is reported by ``python -m bench`` instead.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from bench._pytest_helpers import generate
from bench.env import environment
from bench.tiers import TIERS, tier_device


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tier", action="store", default="cpu", choices=TIERS,
                     help="benchmark tier of bench/ (default: cpu; core and sweep need CUDA)")


@pytest.fixture(scope="session")
def bench_env(pytestconfig: pytest.Config) -> Dict[str, Any]:
    return environment(torch.device(tier_device(pytestconfig.getoption("--tier"))))



def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise a suite module's shared tests by the operations it declares in ``OPS``."""
    ops = getattr(metafunc.module, "OPS", None)
    if ops is not None:
        generate(metafunc, ops)
