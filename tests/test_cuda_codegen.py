"""The Triton kernels compile to Hopper (sm_90) machine code, checked on a machine without a GPU.

The interpreter that runs the kernels in the other tests does not check code generation (layouts,
tl.dot operand types, constexpr globals, shared-memory limits). ``tools/compile_for_cuda.py`` compiles
the launcher variants ahead of time with the ptxas shipped in the triton wheel; a kernel that would
fail to build on an H100 fails here instead.

Both tests are marked ``slow`` (minutes on 2 cores): CI's plain ``python -m pytest`` runs them, and
``-m "not slow"`` skips them in the inner loop.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compile(tmp_path, *args: str) -> str:
    pytest.importorskip("triton.backends.nvidia", reason="triton wheel without the NVIDIA backend")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a warm cache
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compile_for_cuda.py"), "--arch", "90", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _count_ok(stdout: str) -> int:
    return sum(line.startswith("ok ") for line in stdout.splitlines())


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    """The default config of a representative subset of launcher variants (every combination of the
    statistics flags, with all other features off and all on), bf16 and fp32, and each kernel's
    heaviest variant with the reference head in the other dtype (fp32 policy beside a bf16
    reference and the opposite: the two logit tiles of one kernel read different dtypes)."""
    out = _compile(tmp_path, "--dtypes", "bf16,fp32")
    assert _count_ok(out) >= 44
    mixed = [line for line in out.splitlines() if line.startswith("ok ") and "/ref " in line]
    assert len(mixed) == 4, f"expected fwd and bwd for fp32/ref bf16 and bf16/ref fp32, got {mixed}"


@pytest.mark.slow
def test_autotune_space_compiles_and_fits_sm90_shared_memory(tmp_path):
    """Every TOKPO_AUTOTUNE candidate (bf16, all features on) builds and fits in 227 KiB of shared
    memory; the autotuner cannot be run without a GPU, so this is what keeps its space from rotting.
    (fp32's space: ``python tools/compile_for_cuda.py --space --dtypes fp32``.)"""
    assert _count_ok(_compile(tmp_path, "--space", "--dtypes", "bf16")) == 20
