"""The Triton kernels compile to Hopper (sm_90) machine code that passes the SASS checks, on a
machine without a GPU.

The interpreter that runs the kernels in the other tests does not check code generation.
``tools/compile_for_cuda.py`` compiles every kernel of its ``KERNELS`` table the way the Triton JIT
specialises it at the core-tier shape (default and heaviest feature variant), with the ptxas and
cuobjdump shipped in the triton wheel, and asserts on the SASS (``tools/sass.py``): every ``tl.dot``
an ``HGMMA``, wide main-loop loads, no spills inside loops, no atomics or fences in a backward
kernel, shared memory within 227 KiB. It also compiles the heaviest variant without the
specialisation (arbitrary strides) as a fit check.

The compiling tests are marked ``slow`` (minutes on 2 cores): CI's plain ``python -m pytest`` runs
them, and ``-m "not slow"`` skips them in the inner loop. They share one run of the tool.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compile_for_cuda.py"


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    """The tool's output for every check, the fit checks in bf16 and fp32 and the autotune space:
    one run, so that one pool of compile workers stays busy to the end (on 2 cores, two runs would
    each leave a core idle at their tail). A fresh Triton cache: compile for real, not from a
    developer's warm cache."""
    pytest.importorskip("triton.backends.nvidia", reason="triton wheel without the NVIDIA backend")
    cache = tmp_path_factory.mktemp("triton_cache")
    proc = subprocess.run([sys.executable, str(TOOL), "--arch", "90", "--report", "--dtypes", "bf16,fp32", "--space"],
                          capture_output=True, text=True, env=_env(cache), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-4000:]
    return proc.stdout


def _kernels() -> list:
    """The names of the tool's KERNELS table (asked of the tool: importing it here would unset
    TRITON_INTERPRET for the rest of the session)."""
    code = f"import sys; sys.path.insert(0, {str(TOOL.parent)!r}); import json, compile_for_cuda as c; " \
           "print(json.dumps([e.name for e in c.KERNELS]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(Path(".")),
                          timeout=300, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_kernels_pass_the_sass_checks_on_sm90(compiled):
    """Every kernel's default and heaviest variant, JIT-specialised at the core tier, passes every
    SASS check; the heaviest variant also builds and fits unspecialised, in bf16 and fp32 and with
    the reference head in the other dtype (fp32 policy beside a bf16 reference and the opposite: the
    two logit tiles of one kernel then read different dtypes). The checks are not vacuous:
    without the specialisation each kernel's main-loop loads turn scalar and the load check says so
    (an ``info`` line, as arbitrary strides legitimately run that code)."""
    out = compiled
    for name in _kernels():
        for variant in ("default", "heaviest"):
            assert re.search(rf"^ok   {name} bf16 {variant} +checked$", out, re.M), (name, variant, out)
        for dtypes in ("bf16", "fp32"):
            assert re.search(rf"^ok   {name} {dtypes} heaviest unspecialised +fit$", out, re.M), (name, out)
        assert f"info {name} bf16 heaviest unspecialised [loads]" in out, (name, out)
        # The report has a row per compiled variant.
        assert re.search(rf"^{name} bf16 heaviest +\d+ +\d+B +\d+B", out, re.M), (name, out)
    assert "HMMA" not in out.split("variant ")[-1]  # the report's wgmma column: HGMMA only
    assert re.search(r"^ok   \w+ fp32/ref bf16 heaviest unspecialised +fit$", out, re.M), out
    assert re.search(r"^ok   \w+ bf16/ref fp32 heaviest unspecialised +fit$", out, re.M), out


@pytest.mark.slow
def test_autotune_space_compiles_and_fits_sm90_shared_memory(compiled):
    """Every TOKPO_AUTOTUNE candidate (bf16, heaviest variant, specialised as the JIT does) builds and
    fits in 227 KiB of shared memory; the autotuner cannot run without a GPU, so this is what keeps
    its space from rotting. (fp32's space: ``python tools/compile_for_cuda.py --space --space-dtypes fp32``.)"""
    space = re.findall(r"^(ok  |FAIL) (\w+ bf16 heaviest \d+x\d+x\d+ w\d+ s\d+) +fit$", compiled, re.M)
    assert space and all(status == "ok  " for status, _ in space), compiled


def test_specialisation_is_the_jits():
    """The specialised compile sees what a launch at the core tier gives the JIT: unit strides and
    J = 1 as constexpr 1, tt.divisibility = 16 on aligned pointers and on multiples of 16 (D, V, the
    row strides), nothing on ``do_not_specialize`` N nor on NUM_SPLITS = 8 (no multiple of 16)."""
    pytest.importorskip("triton.backends.nvidia", reason="triton wheel without the NVIDIA backend")
    code = f"""
import sys, json
sys.path.insert(0, {str(TOOL.parent)!r})
import compile_for_cuda as c
from triton.backends.compiler import GPUTarget
entry = {{e.name: e for e in c.KERNELS}}["forward_stats"]
v = c.make_variant(entry, "default", c.torch.bfloat16, True)
fn = entry.kernel()
const = dict(v.flags, **{{k: x for k, x in v.launch.items() if k in fn.arg_names}})
values = dict(c.CORE_ARGS, **entry.args)
sig = c.signature(fn, v.dtype, const, values)
src, _ = c.jit_specialisation(fn, sig, const, values, v.num_warps, v.num_stages, GPUTarget("cuda", 90, 32))
names = fn.arg_names
print(json.dumps(dict(
    ones=sorted(names[k[0]] for k, x in src.constants.items() if x == 1 and src.signature[names[k[0]]] == "constexpr"
                and names[k[0]] not in const),
    div16=sorted(names[k[0]] for k, a in src.attrs.items() if ["tt.divisibility", 16] in a),
    sig={{n: t for n, t in src.signature.items() if t != "constexpr"}})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(Path(".")),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert {"stride_hd", "stride_wd", "stride_rhd", "stride_rwd"} <= set(got["ones"])
    assert {"h_ptr", "w_ptr", "row_index_ptr", "D", "V", "stride_hn", "stride_wv"} <= set(got["div16"])
    assert "N" not in got["div16"] and "NUM_SPLITS" not in got["div16"]
    assert got["sig"]["h_ptr"] == "*bf16" and got["sig"]["N"] == "i32"
