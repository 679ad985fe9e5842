"""Vocabulary-parallel statistics and losses over torch.distributed (gloo, CPU, 2 and 3 ranks).

Each world size launches its ranks once per session (``tests/vocab_parallel_worker.py``, from the
session fixture ``vocab_parallel_results``) and runs every check there; each check is then reported
as its own test here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch.distributed as dist

from vocab_parallel_worker import CHECKS

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "vocab_parallel_worker.py"
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLDS = (2, 3)


def _launch(world: int, out: Path) -> List[subprocess.Popen]:
    port = str(_free_port())
    return [
        subprocess.Popen([sys.executable, "-W", "ignore", str(WORKER), str(r), str(world), port, str(out)],
                         cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]


def _collect(procs: List[subprocess.Popen], out: Path) -> Dict[str, Optional[str]]:
    """Wait for the ranks of one world and merge their per-check errors (``None`` = passed)."""
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    merged: Dict[str, Optional[str]] = {}
    for r, p in enumerate(procs):
        path = out / f"rank{r}.json"
        assert p.returncode == 0 and path.exists(), (
            f"rank {r} exited with {p.returncode} (results written: {path.exists()}):\n{logs[r][-4000:]}")
        for name, record in json.loads(path.read_text()).items():
            err = record["error"]
            if err is not None:
                merged[name] = (merged.get(name) or "") + f"--- rank {r} ---\n{err}"
            else:
                merged.setdefault(name, None)
    return merged


@pytest.fixture(scope="session")
def vocab_parallel_results(tmp_path_factory: pytest.TempPathFactory) -> Dict[int, Dict[str, Optional[str]]]:
    """Every world size runs all checks once per session, the worlds side by side (their ranks are
    separate processes); the cost shows as this fixture's setup, not inside the first test."""
    outs = {world: tmp_path_factory.mktemp(f"vocab_parallel_{world}") for world in WORLDS}
    procs = {world: _launch(world, outs[world]) for world in WORLDS}
    return {world: _collect(procs[world], outs[world]) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_vocab_parallel_matches_single_process(check: str, world: int, vocab_parallel_results) -> None:
    err = vocab_parallel_results[world][check]
    assert err is None, err
