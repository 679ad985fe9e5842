"""64-bit addressing in the Triton kernels (issue 13, item 2): element offsets past 2³¹.

A transposed view such as ``W.t()`` of a (D, V) output matrix has ``stride_wd = V``; with
V = 256000 and D ≥ 8400 the offset ``d·V`` of its last column passes 2³¹ elements although both
factors fit in int32. Computed as an int32 product it wraps to a negative offset: the kernel then
reads far outside the tensor (a segfault under the interpreter, garbage or a fault on a GPU).

Reproducing that for real takes an ≥ 8 GiB tensor. Instead each case runs in a subprocess (this
file is also the worker script) that maps ~8 GiB of *address space* with an anonymous private
``mmap`` (MAP_NORESERVE: nothing is committed) and writes only the few elements the views use: the
views have D = 3 columns at a stride S = 2³⁰ + 4099, which fits in int32 (so Triton passes it as
i32, the overflowing case) while the last column sits at 2·S > 2³¹ elements from the first. Untouched
pages are never materialised: the worker's peak RSS stays at that of an ordinary small test and is
checked. Guards, so that a regression cannot take the machine down: a wall-clock timeout; the
mapping is made read-only (``mprotect``) once the views are written, so nothing can commit its
pages (a write is a segfault); and ``RLIMIT_AS`` is set right after the mapping to the current
address space + 3 GiB, so a copy of the mapped storage (8 GiB) fails with an allocation error
instead of being made.

Each case checks values and gradients (random cotangents, KL included) against the float64 oracle
on compact copies of the same values, at the fp32 tolerances of
tests/test_vocab_stats_values_and_grads.py (1e-4; measured errors ~1e-6).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

S = 2**30 + 4099          # column stride: int32, but 2·S > 2³¹
D, N, V = 3, 5, 7         # every view has its 3rd column past 2³¹ elements
SLOT = 16                 # elements reserved per view within one column (N, V ≤ SLOT)
MAX_RSS_MB = 2048         # a small interpreted test uses ~600 MB; the mapping would add 8 GiB

CASES = {
    # which logical input is the huge-stride view
    "policy": ("hidden", "weight"),
    "reference": ("ref_hidden", "ref_weight"),
}
# (Targets are not a case: the ops rebuild them as contiguous (N, J) ids before any kernel.)


def _worker(case: str) -> None:
    """Build the case on a sparse 8 GiB mapping, run every Triton strategy, compare with float64."""
    import ctypes
    import resource

    import torch

    sys.path.insert(0, str(HERE))
    import tokpo_kernels as tk
    from oracle import stats as O
    from tokpo_kernels.backends import concrete_backend_names

    nbytes = (2 * S + len(O.LEAF_NAMES) * SLOT) * 4
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    mapped = mmap.mmap(-1, nbytes, flags=flags)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_size + (3 << 30), hard))

    gen = torch.Generator().manual_seed(1234)
    logical = {
        "hidden": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "weight": torch.randn(V, D, generator=gen, dtype=torch.float64),
        "bias": torch.randn(V, generator=gen, dtype=torch.float64) * 0.5,
        "ref_hidden": torch.randn(N, D, generator=gen, dtype=torch.float64),
        "ref_weight": torch.randn(V, D, generator=gen, dtype=torch.float64),
        "ref_bias": None,
        "targets": torch.tensor([[0, 3, 6], [1, -100, 5], [-100, -100, -100], [2, 4, -100], [6, 6, 0]]),
    }
    # One tensor over the mapping for every view: the interpreter copies each argument's storage back
    # after a launch unless it is the very storage it read (two tensors made by frombuffer over the same
    # memory are distinct storages, and that copy would write all 8 GiB).
    storage = torch.frombuffer(mapped, dtype=torch.float32)
    leaves = {}
    for slot, (name, t) in enumerate(logical.items()):
        if t is None or name not in CASES[case]:
            leaves[name] = None if t is None else (t.float() if t.is_floating_point() else t.clone())
            continue
        view = storage.as_strided(t.shape, (1, S), storage_offset=slot * SLOT)  # (rows, D)
        view.copy_(t)  # writes 3 pages
        leaves[name] = view
    # Read-only from here: a write anywhere in the mapping (which would commit memory page by page)
    # is a segfault instead; reads of untouched pages map the shared zero page.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(storage.data_ptr(), nbytes, mmap.PROT_READ) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    assert max(v.storage_offset() + sum((s - 1) * st for s, st in zip(v.shape, v.stride(), strict=True))
               for v in leaves.values() if v is not None and v.stride()[-1] == S) >= 2**31

    cot = O.make_cotangents(logical["targets"], (N,), gen)
    opts = dict(kl=True, entropy=True, ignore_index=-100, temperature=1.0, softcap=None)
    ref = O.oracle_result(leaves, cot, **opts)
    # Every Triton strategy: the streaming kernels address the views themselves; the chunked one
    # hands them to GEMMs and addresses the views in its target-logit and ∂z kernels.
    for impl in (n for n in concrete_backend_names() if n.startswith("triton")):
        res = O.values_and_grads(tk.linear_vocab_stats, leaves, cot, impl=impl, **opts)
        O.assert_stats_match(res, ref, vatol=1e-4)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert rss_mb < MAX_RSS_MB, f"peak RSS {rss_mb:.0f} MB: the sparse mapping was materialised"
    print(f"OK peak_rss_mb={rss_mb:.0f}")


@pytest.mark.slow  # a subprocess with an 8 GiB sparse mapping per case: CI runs it, -m "not slow" skips it
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux mmap/MAP_NORESERVE and /proc")
@pytest.mark.parametrize("case", sorted(CASES))
def test_offsets_past_2_31_elements(case: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH", "")])))
    proc = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env, timeout=300)
    tail = (proc.stdout[-2000:] + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"{case}: worker exited with {proc.returncode} (negative: killed by a signal)\n{tail}"
    assert "OK peak_rss_mb=" in proc.stdout, tail


if __name__ == "__main__":
    _worker(sys.argv[1])
