"""Edges of the Triton interpreter (issue 13, item 9).

* Threads: two threads calling ``impl="triton"`` under ``TRITON_INTERPRET=1`` used to fail inside
  Triton (its interpreter swaps functions into ``triton.language`` for the duration of a launch and
  keeps the program id in a global). Interpreted launches are now serialised by a lock
  (``kernels/launch.py``); the test runs every backend from two threads at once and compares with
  the same calls made serially.
* Import order: ``@triton.jit`` picks interpreter or compiler when it decorates a function, so
  ``import triton`` before ``TRITON_INTERPRET=1`` is set leaves Triton's library compiled and the
  first interpreted launch failed deep in the kernel (``Cannot call @triton.jit'd outside of the
  scope of a kernel``). ``impl="triton"`` is now refused with a ``ValueError`` naming the fix before
  any kernel runs. Checked in subprocesses (the mode is per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import tokpo_kernels as tk
from oracle.compare import assert_close

ROOT = Path(__file__).resolve().parents[1]
N, V, D = 9, 37, 8
ROUNDS = 3


def _one_call(impl: str, device: str, seed: int) -> Dict[str, torch.Tensor]:
    """Statistics and gradients of one forward + backward on inputs drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(device).requires_grad_()
    w = (torch.randn(V, D, generator=gen) / 2).to(device).requires_grad_()
    rh, rw = torch.randn(N, D, generator=gen).to(device), (torch.randn(V, D, generator=gen) / 2).to(device)
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = -100
    st = tk.linear_vocab_stats(h, w, y.to(device), ref_hidden=rh, ref_weight=rw, kl=True, entropy=True, impl=impl)
    cot = torch.randn(4, N, generator=gen).to(device)
    loss = (cot[0] * st.logp + cot[1] * st.lse + cot[2] * st.kl + cot[3] * st.entropy).sum()
    gh, gw = torch.autograd.grad(loss, (h, w))
    return dict(logp=st.logp, lse=st.lse, kl=st.kl, entropy=st.entropy, ref_logp=st.ref_logp, gh=gh, gw=gw)


def test_two_threads_give_the_serial_results(impl: str, impl_device: str) -> None:
    barrier = threading.Barrier(2)
    results: Dict[int, List[Dict[str, torch.Tensor]]] = {0: [], 1: []}
    errors: List[str] = []

    def work(tid: int) -> None:
        try:
            barrier.wait(timeout=60)
            for r in range(ROUNDS):
                results[tid].append(_one_call(impl, impl_device, seed=100 * tid + r))
        except Exception as exc:  # reported below, with the thread's id
            errors.append(f"thread {tid}: {type(exc).__name__}: {str(exc)[:500]}")

    threads = [threading.Thread(target=work, args=(tid,)) for tid in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 600 s (deadlock?)"
    assert not errors, "concurrent calls failed: " + "; ".join(errors)
    for tid in (0, 1):
        for r in range(ROUNDS):
            serial = _one_call(impl, impl_device, seed=100 * tid + r)
            for name, want in serial.items():
                # Same inputs, same code. (The Triton backward is bit-for-bit deterministic, see
                # test_triton_strategies; the tolerance leaves room for BLAS threading on CPU.)
                assert_close(results[tid][r][name], want, rtol=1e-5, atol=1e-6, name=f"thread {tid} round {r} {name}")


def _run_json(script: str) -> dict:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET; the JSON of its last line."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TRITON_FIRST = r"""
import json, os, sys
import triton  # imported first, with TRITON_INTERPRET unset: Triton's library is built for a GPU
os.environ["TRITON_INTERPRET"] = "1"  # too late for triton
import torch
import tokpo_kernels as tk
from tokpo_kernels.backends import available_backends

h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
out = {"available": list(available_backends("cpu"))}
try:
    tk.linear_vocab_stats(h, w, y, impl="triton")
    out["error"] = None
except Exception as exc:
    out["error"] = [type(exc).__name__, str(exc)]
out["torch_ok"] = bool(torch.isfinite(tk.linear_vocab_stats(h, w, y, impl="torch").lse).all())
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter per case (seconds each): CI runs it, -m "not slow" skips it
def test_triton_imported_before_the_interpreter_flag_is_refused_clearly() -> None:
    got = _run_json(TRITON_FIRST)
    assert got["error"] is not None, "impl='triton' ran although triton was imported in compiled mode"
    kind, msg = got["error"]
    assert kind == "ValueError", f"expected a ValueError naming the fix, got {kind}: {msg[:500]}"
    for part in ("impl='triton'", "triton was imported before TRITON_INTERPRET=1 was set", "`import triton`",
                 "impl='torch'"):
        assert part in msg, f"error message lacks {part!r}: {msg}"
    assert "triton" not in got["available"], f"triton listed as available on CPU: {got['available']}"
    assert got["torch_ok"], "impl='torch' must still work"


MODE_STATES = r"""
import json, os
os.environ["TRITON_INTERPRET"] = "1"
from tokpo_kernels._compat import triton_mode_mismatch
states = {"before_import": triton_mode_mismatch()}
import triton  # interpreted library
states["consistent"] = triton_mode_mismatch()
del os.environ["TRITON_INTERPRET"]
states["flag_removed"] = triton_mode_mismatch()
import tokpo_kernels.kernels.launch  # kernels built now: compiled, while the library is interpreted
os.environ["TRITON_INTERPRET"] = "1"
states["kernels_other_mode"] = triton_mode_mismatch()
print(json.dumps(states))
"""


@pytest.mark.slow  # a fresh interpreter per case (seconds each): CI runs it, -m "not slow" skips it
def test_mode_mismatch_is_detected_in_each_direction() -> None:
    got = _run_json(MODE_STATES)
    assert got["before_import"] is None and got["consistent"] is None, got
    assert got["flag_removed"] and "while TRITON_INTERPRET=1 was set" in got["flag_removed"], got
    assert got["kernels_other_mode"] and "built for the GPU" in got["kernels_other_mode"], got
    for msg in (got["flag_removed"], got["kernels_other_mode"]):
        assert "before anything imports triton" in msg and "impl='torch'" in msg, msg
