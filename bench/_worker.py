"""One measurement of one (case, impl) in its own process: ``python -m bench._worker SPEC RESULT``.

Why a fresh process per measurement: peak memory is a per-process high-water mark, and anything an
earlier run left behind (PyTorch's CUDA caching allocator, glibc's heap, MKL/oneDNN scratch
buffers, Triton's compiled kernels, pages an earlier implementation touched) would be charged to or
hide the next one. A new process starts from a clean state, so every implementation is measured
under the same conditions, and a crash or out-of-memory kill only loses its own row.

Timing and memory are separate runs on CPU (``mode``): the memory run changes the allocator's
behaviour (see ``_cpu_peak``) and reads /proc between steps, neither of which may touch the timed
loop. On CUDA one process does both (``mode="both"``, timing first): the caching allocator's
``max_memory_allocated`` after ``reset_peak_memory_stats`` is exact whatever ran before, so a second
process would only add its start-up and the kernels' JIT compile to a short GPU session.
The result is written as JSON to RESULT, never to stdout, which libraries may print to.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import torch

from bench.registry import DTYPES, Shape, Unavailable, get_operation


def _first_line(exc: BaseException, limit: int = 300, with_type: bool = True) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    if with_type:
        text = f"{type(exc).__name__}: {text}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Timestamps for one repetition. On CUDA, events recorded on the stream time the GPU work and
    one synchronize per repetition keeps the next repetition's launch overhead out of this one;
    on CPU, ``perf_counter`` (the work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        _sync(self.device)

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _time_loops(built, device: torch.device, reps: int) -> Dict[str, List[float]]:
    """Per-repetition milliseconds of forward alone, and of forward then backward in one step
    (split into its forward and backward halves, so backward time is measured, not derived)."""
    clock = _Clock(device)
    fwd_ms: List[float] = []
    split: List[tuple] = []
    for _ in range(reps):
        a = clock.mark()
        out = built.fwd()
        b = clock.mark()
        clock.sync()
        fwd_ms.append(clock.ms(a, b))
        del out
    for _ in range(reps):
        a = clock.mark()
        out = built.fwd()
        b = clock.mark()
        grads = built.bwd(out)
        c = clock.mark()
        clock.sync()
        split.append((clock.ms(a, b), clock.ms(b, c)))
        del out, grads
    return {
        "fwd_ms": fwd_ms,
        "bwd_ms": [b for _, b in split],
        "fwd_bwd_ms": [f + b for f, b in split],
    }


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak(fn: Callable[[], Any]) -> int:
    """Peak resident memory added by ``fn()``, in bytes.

    Why RSS: PyTorch's CPU allocator is plain malloc/free with no statistics of its own (and
    tracemalloc sees only Python objects), so the kernel's accounting of resident pages is the
    one number that includes every tensor, BLAS workspace and temporary. Why clear_refs: the
    kernel keeps the process's RSS high-water mark (VmHWM) since start, and the warm-up already
    reached the same peak, so writing "5" to /proc/self/clear_refs resets VmHWM to the current
    RSS (Linux >= 4.0); then VmHWM after ``fn()`` minus the RSS just before it is the peak that
    ``fn()`` itself added.

    Why the parent fixes MALLOC_MMAP_THRESHOLD_ for memory workers: by default glibc raises its
    mmap threshold (up to 32 MiB) after the first large free, so later tiles come from its heap,
    which keeps freed memory resident. The measured run then reuses the warm-up's heap invisibly
    or fragments it: for the torch impl of the acceptance case that read 0 MiB for a forward and
    197 MiB for forward+backward, against 99 and 132 MiB with a fixed threshold of 128 KiB, where
    every block at or above it is mmap'ed and returned to the kernel on free, so RSS follows live
    memory. The threshold is now 64 KiB (``runner.CPU_MMAP_THRESHOLD``, issue 12's protocol): half
    the C++ backend's 128 KiB fp32 tile, so its smaller per-thread buffers are mmap'ed as well.

    Warm-up before the measurement: the builder has already run one forward+backward on a tiny
    version of the case (``bench/ops/_common.builder``'s probe: libraries loaded, the C++
    extension built and loaded, thread pools started), then ``measure`` runs ``spec["warmup"]``
    (``--warmup``, default 1) full-size steps; with ``--warmup 0`` the tiny call is the only one.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_kib("VmRSS")
    res = fn()
    peak = _proc_status_kib("VmHWM")
    del res
    return max(0, peak - base) * 1024


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it (caching allocator's
    own accounting; reserved-but-free cache is not counted)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    res = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del res
    return max(0, peak - base)


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    device = torch.device(spec["device"])
    op = get_operation(spec["op"])
    impl = op.impls[spec["impl"]]
    shape = Shape.from_dict(spec["shape"])
    dtype = DTYPES[spec["dtype"]]
    mode = spec["mode"]
    result: Dict[str, Any] = {"mode": mode, "torch_threads": torch.get_num_threads()}

    if mode == "memory" and device.type == "cpu" and not _clear_refs_works():
        # Without a reset, VmHWM still holds the peak of building inputs and of the warm-up.
        return {**result, "status": "unavailable",
                "reason": "peak RSS cannot be reset here (/proc/self/clear_refs not writable; needs Linux >= 4.0)"}
    warm = spec["warmup"]

    t0 = time.perf_counter()
    try:
        built = impl.build(shape, dtype, device)
    except Unavailable as exc:
        return {**result, "status": "unavailable", "reason": _first_line(exc, with_type=False)}
    _sync(device)
    result["build_s"] = time.perf_counter() - t0
    result["extra"] = built.extra

    for i in range(warm):
        out = built.fwd()
        if i == 0 and built.summary is not None and mode in ("time", "both"):
            result["summary"] = built.summary(out)
        built.bwd(out)
        del out
    _sync(device)

    if mode in ("time", "both"):
        result.update(_time_loops(built, device, spec["reps"]))
    if mode == "time":
        pass  # CPU timing run: the memory run is another process
    elif device.type == "cuda":
        result["method"] = "torch.cuda.max_memory_allocated delta after reset_peak_memory_stats"
        result["fwd_bwd_peak_bytes"] = _cuda_peak(built.fwd_bwd, device)
        result["fwd_peak_bytes"] = _cuda_peak(built.fwd, device)
    else:
        result["method"] = "VmHWM after clear_refs=5 minus VmRSS before (peak RSS delta), after warm-up"
        result["fwd_bwd_peak_bytes"] = _cpu_peak(built.fwd_bwd)
        result["fwd_peak_bytes"] = _cpu_peak(built.fwd)
    result["status"] = "ok"
    return result


def main(argv: List[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = measure(spec)
    except Exception as exc:  # e.g. out of memory at full size: a row, not a crash of the bench
        result = {"mode": spec.get("mode"), "status": "unavailable", "reason": _first_line(exc),
                  "traceback": traceback.format_exc(limit=8)}
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
