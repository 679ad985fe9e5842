"""Runs each (case, impl) in fresh worker processes and turns their output into one record.

Every (case, impl) gets two processes on CPU: a timing run and, separately, a memory run (see
``bench/_worker.py`` for why); on CUDA one process does both. A missing, failing, crashing or
timed-out implementation becomes a record with ``status`` "not installed" or "unavailable" and a
reason: rows are never dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from bench.env import REPO_ROOT
from bench.registry import Case, get_operation

MIB = float(1 << 20)
CPU_MMAP_THRESHOLD = 64 * 1024  # bytes: glibc's MALLOC_MMAP_THRESHOLD_ in CPU memory workers (see spawn_worker)


def quantiles(samples) -> Optional[Dict[str, Any]]:
    if not samples:
        return None
    p20, p50, p80 = np.percentile(np.asarray(samples, dtype=float), [20, 50, 80])
    return {"median": float(p50), "p20": float(p20), "p80": float(p80), "samples": [float(x) for x in samples]}


def spawn_worker(spec: Dict[str, Any], timeout: float, env_extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run one measurement (``spec``: op, impl, shape, dtype, device, mode, reps, warmup) in a fresh
    ``python -m bench._worker`` process and return its result dict (status "ok" or a reason)."""
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if spec["mode"] == "memory" and spec["device"].startswith("cpu"):
        # A fixed threshold disables glibc's dynamic one: every block >= 64 KiB is mmap'ed and
        # unmapped on free, so RSS follows live tensors (why: _worker._cpu_peak). 64 KiB is the value
        # of issue 12's protocol, half the C++ backend's fp32 tile (64 x 512 x 4 B = 128 KiB,
        # tokpo_kernels/backends/cpp.py): buffers from half a tile up (a bf16 tile, a smaller
        # $TOKPO_CPP_BLOCK) are then mmap'ed too, not taken from a heap an earlier call grew and
        # left resident, where their reuse would not show. Only the memory run gets it (an env var,
        # read once at process start: one more reason for a subprocess): the timed run must see
        # the allocator users have, without an mmap/munmap per tile.
        env["MALLOC_MMAP_THRESHOLD_"] = str(CPU_MMAP_THRESHOLD)
    with tempfile.TemporaryDirectory(prefix="tokpo-bench-") as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-m", "bench._worker", spec_path, result_path]
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"status": "unavailable", "reason": f"timed out after {timeout:.0f} s ({spec['mode']} run)"}
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
        return {"status": "unavailable", "reason": f"worker {why}: {tail[0][:200]}".rstrip(": ")}


def run_one(case: Case, impl_name: str, device: str, *, reps: int, warmup: int, timeout: float,
            log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    op = get_operation(case.op)
    flops = op.flops(case.shape)
    rec: Dict[str, Any] = {
        "case": case.key, "op": case.op, "impl": impl_name, "shape": case.shape.to_dict(),
        "dtype": case.dtype, "device": device, "flops": flops,
        "status": "ok", "reason": None, "time": None, "tflops": None, "memory": None,
        "extra": {}, "summary": None, "worker_s": {},
    }
    impl = op.impls.get(impl_name)
    if impl is None:
        return {**rec, "status": "unavailable",
                "reason": f"{impl_name} does not compute {case.op} (registered: {', '.join(op.impls)})"}
    rec["note"] = impl.note
    missing = impl.missing()
    if missing:
        return {**rec, "status": "not installed", "reason": f"not installed: {missing}"}
    elsewhere = impl.unavailable_on(device)
    if elsewhere:
        return {**rec, "status": "unavailable", "reason": f"unavailable: {elsewhere}"}

    spec = {"op": case.op, "impl": impl_name, "shape": case.shape.to_dict(), "dtype": case.dtype,
            "device": device, "reps": reps, "warmup": warmup}
    # CUDA: one process measures both (see bench/_worker.py); CPU: a timing and a memory process.
    modes = ("both",) if device.startswith("cuda") else ("time", "memory")
    for mode in modes:
        t0 = time.perf_counter()
        res = spawn_worker({**spec, "mode": mode}, timeout)
        rec["worker_s"][mode] = round(time.perf_counter() - t0, 2)
        log(f"  {case.op:<16} {impl_name:<8} {mode:<6} {rec['worker_s'][mode]:7.1f} s  {res['status']}"
            + (f": {res.get('reason')}" if res["status"] != "ok" else ""))
        if res["status"] != "ok":
            reason = res.get("reason") or "unknown failure"
            return {**rec, "status": "unavailable", "reason": f"unavailable: {reason}",
                    "traceback": res.get("traceback")}
        rec["extra"].update(res.get("extra") or {})
        if mode in ("time", "both"):
            rec["summary"] = res.get("summary")
            rec["torch_threads"] = res.get("torch_threads")
            rec["time"] = {k: quantiles(res[k]) for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")}
            rec["tflops"] = {
                k: flops[k] / (rec["time"][f"{k}_ms"]["median"] * 1e-3) / 1e12 for k in ("fwd", "fwd_bwd")
            }
        if mode in ("memory", "both"):
            rec["memory"] = {
                "method": res.get("method"),
                "fwd_bwd_peak_mib": res["fwd_bwd_peak_bytes"] / MIB,
                "fwd_peak_mib": res["fwd_peak_bytes"] / MIB,
            }
    return rec
