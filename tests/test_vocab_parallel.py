"""Vocabulary-parallel statistics and losses over torch.distributed (gloo, CPU, 2 and 3 ranks).

Each world size launches its ranks once (``tests/vocab_parallel_worker.py``) and runs every check
there; each check is then reported as its own test here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

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


_RESULTS: Dict[int, Dict[str, Optional[str]]] = {}


def _results(world: int, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Optional[str]]:
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"vocab_parallel_{world}")
        port = str(_free_port())
        procs = [
            subprocess.Popen([sys.executable, "-W", "ignore", str(WORKER), str(r), str(world), port, str(out)],
                             cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for r in range(world)
        ]
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
        _RESULTS[world] = merged
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_vocab_parallel_matches_single_process(check: str, world: int, tmp_path_factory) -> None:
    err = _results(world, tmp_path_factory)[check]
    assert err is None, err
