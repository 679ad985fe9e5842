"""What is particular to ``impl="cpp"`` (the C++ CPU backend in csrc/): that it is built where it can
be, that ``"auto"`` prefers it and falls back with one warning where it cannot, its tile and
row-group edges against the float64 oracle, and bitwise reproducibility.

Its values and gradients on the shared case lists (fp32, bf16/fp16 three-way, mixed precision,
vocabulary parallel, torch.compile, the losses) come from the registry-parametrised tests, which
include it like every backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tokpo_kernels as tk
from oracle import stats as O
from oracle.stats import Case, assert_stats_match
from tokpo_kernels.backends import cpp as cpp_backend
from tokpo_kernels.backends import resolve_impl, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
F32_EPS = torch.finfo(torch.float32).eps
REASON = unavailable_reason("cpp", "cpu")
needs_cpp = pytest.mark.skipif(REASON is not None, reason=f"impl='cpp' is unavailable here: {REASON}")

FULL = dict(ref=True, kl=True, entropy=True)
# Every head option at once, at sizes that leave partial blocks and tiles for the block shapes below.
CASES = [
    pytest.param(Case(token_shape=(37,), V=45, D=24, J=3, bias=True, ref_bias=True, **FULL), id="bias-multi-target"),
    pytest.param(Case(token_shape=(5, 7), V=53, D=12, D_ref=20, softcap=4.0, temperature=0.7, scale=6.0,
                      ref_scale=6.0, ref_bias=True, layout="transpose", **FULL), id="softcap-temperature"),
]
# (token rows per block, vocabulary columns per tile): one column at a time, an odd tile width that
# leaves a partial last tile, and the default.
BLOCKS = ["8,1", "8,7", "16,40", f"{cpp_backend.BLOCK_ROWS},{cpp_backend.BLOCK_COLS}"]


def _run(case: Case, gen: torch.Generator):
    stored = O.store_leaves(O.make_leaves(case, gen), case.layout, gen)
    prep = O.make_prep(case.layout)
    cot = O.make_cotangents(prep(stored)["targets"], case.token_shape, gen)
    opts = case.opts()
    res = O.values_and_grads(tk.linear_vocab_stats, O.cast_leaves(stored, torch.float32, "cpu"), cot, prep=prep,
                             impl="cpp", **opts)
    return res, prep, cot, opts


def _value_atol(res: O.Result, prep, case: Case) -> float:
    """1e-4, or 16 fp32 ulps of the largest transformed logit when that is larger."""
    zmax = O.max_abs_logit(res.leaves, prep)
    if case.softcap is not None:
        zmax = min(zmax, case.softcap)
    return max(1e-4, 16 * F32_EPS * zmax / case.temperature)


def test_extension_is_built_where_a_compiler_is() -> None:
    """CI has g++ and ninja: there the extension must build, so that it is tested, not skipped."""
    from torch.utils.cpp_extension import is_ninja_available

    if os.environ.get("TOKPO_CPP", "1").strip() == "0":
        pytest.skip("$TOKPO_CPP=0 turns the C++ backend off")
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja here: the C++ backend cannot be built")
    assert REASON is None, f"a compiler and ninja are here but the C++ backend is unavailable: {REASON}"


@needs_cpp
def test_auto_prefers_cpp_on_cpu() -> None:
    assert resolve_impl("auto", "cpu") == "cpp"


@needs_cpp
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("case", CASES)
def test_tile_edges_match_oracle(case: Case, block: str, gen: torch.Generator, monkeypatch) -> None:
    monkeypatch.setenv("TOKPO_CPP_BLOCK", block)
    res, prep, cot, opts = _run(case, gen)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    assert_stats_match(res, ref, vatol=_value_atol(res, prep, case))


@needs_cpp
@pytest.mark.parametrize("case", CASES)
def test_row_groups_change_nothing(case: Case, gen: torch.Generator, monkeypatch) -> None:
    """A ∂h partial budget of one byte processes one block of rows per group: every sum keeps its
    order, so the gradients are bitwise those of one group, and both match the oracle."""
    monkeypatch.setenv("TOKPO_CPP_BLOCK", "8,7")
    fork = torch.Generator().set_state(gen.get_state())
    whole, prep, cot, opts = _run(case, gen)
    monkeypatch.setattr(cpp_backend, "PARTIAL_BYTES", 1)
    grouped, _, _, _ = _run(case, fork)
    for name, g in whole.grads.items():
        if g is not None:
            assert torch.equal(g, grouped.grads[name]), f"grad {name}: row groups changed the result"
    ref = O.oracle_result(grouped.leaves, cot, prep=prep, **opts)
    assert_stats_match(grouped, ref, vatol=_value_atol(grouped, prep, case))


@needs_cpp
def test_bitwise_reproducible(gen: torch.Generator) -> None:
    """No atomics: the same inputs and thread count give the same bits, values and gradients."""
    case = Case(token_shape=(40,), V=300, D=32, bias=True, **FULL)
    fork = torch.Generator().set_state(gen.get_state())
    a, _, _, _ = _run(case, gen)
    b, _, _, _ = _run(case, fork)
    for name, v in a.values.items():
        if v is not None:
            assert torch.equal(v, b.values[name]), f"{name}: two runs differ"
    for name, g in a.grads.items():
        if g is not None:
            assert torch.equal(g, b.grads[name]), f"grad {name}: two runs differ"


@needs_cpp
def test_one_thread_matches_oracle(gen: torch.Generator) -> None:
    """With one thread the backward has a single vocabulary range (no ∂h partials to sum)."""
    case = Case(token_shape=(21,), V=97, D=16, bias=True, **FULL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res, prep, cot, opts = _run(case, gen)
    finally:
        torch.set_num_threads(threads)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    assert_stats_match(res, ref, vatol=_value_atol(res, prep, case))


@needs_cpp
def test_bad_block_variable_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("TOKPO_CPP_BLOCK", "64x512")
    h, w, y = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"TOKPO_CPP_BLOCK: expected 'rows,cols'.*got '64x512'"):
        tk.linear_vocab_stats(h, w, y, impl="cpp")


_FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings, torch, tokpo_kernels as tk
    h, w, y = torch.randn(6, 8), torch.randn(13, 8), torch.tensor([1, 2, 3, -100, 4, 5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = tk.linear_vocab_stats(h, w, y).logp
        b = tk.linear_vocab_stats(h, w, y).logp
    mine = [str(c.message) for c in caught if "impl='cpp' is unavailable" in str(c.message)]
    assert len(mine) == 1, f"expected one fallback warning, got {mine}"
    print("WARNING:", mine[0])
    assert torch.equal(a, tk.linear_vocab_stats(h, w, y, impl="torch").logp) and torch.equal(a, b)
    try:
        tk.linear_vocab_stats(h, w, y, impl="cpp")
    except ValueError as e:
        print("ERROR:", e)
    else:
        raise AssertionError("impl='cpp' did not raise")
    """
)


def _run_python(code_or_args, env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env.pop("TRITON_INTERPRET", None)
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "env_extra, why",
    [
        pytest.param({"TOKPO_CPP": "0"}, "turned off by $TOKPO_CPP=0", id="turned-off"),
        pytest.param({"CXX": "no-such-compiler-tokpo"}, "no C++ compiler found (looked for 'no-such-compiler-tokpo'",
                     id="no-compiler"),
    ],
)
def test_auto_falls_back_with_one_warning(env_extra, why: str) -> None:
    """Without the extension, "auto" uses impl="torch" and says once why; impl="cpp" raises the reason."""
    proc = _run_python(_FALLBACK_SCRIPT, env_extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warning = next(line for line in proc.stdout.splitlines() if line.startswith("WARNING:"))
    error = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR:"))
    assert "uses impl='torch'" in warning and why in warning, warning
    assert why in error, error


def test_build_command_reports_the_library() -> None:
    proc = _run_python(["-m", "tokpo_kernels.build"], {})
    if REASON is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "tokpo_kernels C++ CPU backend:" in proc.stdout and ".so" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 1 and REASON in proc.stderr, proc.stdout + proc.stderr
    off = _run_python(["-m", "tokpo_kernels.build"], {"TOKPO_CPP": "0"})
    assert off.returncode == 1 and "TOKPO_CPP=0" in off.stderr, off.stdout + off.stderr
