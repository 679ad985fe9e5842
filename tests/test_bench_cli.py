"""The benchmark's command line and what it prints: ``python -m bench`` (``bench/__main__.py``,
``bench/report.py``), ``bench/gemm_rate.py`` and ``tools/gpu_session.sh --dry-run``.

CPU only and fast: no test here times anything or needs a GPU; a full ``--dry-run`` (which measures
the CPU-side costs of the GPU session, ~1 min) is marked slow.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import bench.__main__ as cli
from bench import gemm_rate, report, runner
from bench.ops import _common
from bench.registry import Case, get_operation, operations
from bench.tiers import (
    ACCEPTANCE,
    CHECKS,
    HEADS,
    OPS,
    PREFERENCE_OPS,
    TDPO_ACCEPTANCE,
    TDPO_ACCEPTANCE_BF16,
    Check,
    cases,
    tier_device,
    tier_reps,
)

REPO = Path(__file__).resolve().parent.parent
SESSION = REPO / "tools" / "gpu_session.sh"
NINE_MINUTES_S = 9 * 60


def _row(case: Case, impl: str, ms: float = 10.0, mib: float = 100.0, *, status: str = "ok",
         reason: str = "", device: str = "cpu") -> Dict[str, Any]:
    """A measurement record shaped like ``bench.runner.run_one``'s."""
    q = {"median": ms, "p20": 0.9 * ms, "p80": 1.1 * ms, "samples": [ms]}
    ok = status == "ok"
    return {
        "case": case.key, "op": case.op, "impl": impl, "shape": case.shape.to_dict(), "dtype": case.dtype,
        "device": device, "flops": {"fwd": 1e9, "fwd_bwd": 3e9}, "status": status, "reason": None if ok else reason,
        "time": {k: q for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")} if ok else None,
        "tflops": {"fwd": 0.1, "fwd_bwd": 0.3} if ok else None,
        "memory": {"fwd_bwd_peak_mib": mib, "fwd_peak_mib": mib / 2} if ok else None,
        "extra": {}, "summary": {"loss": 1.0} if ok else None, "note": f"{impl} note",
    }


# Per impl (ms, MiB) that pass every check of CHECKS: cpp < torch < the materialising baselines.
_PASSING = {"cpp": (1.0, 1.0), "torch": (10.0, 10.0), "naive": (100.0, 400.0), "tdpo_reference_code": (100.0, 400.0)}


def _quick_rows():
    """One row per (case, impl) that CHECKS compares (an impl can be one check's subject and
    another's reference on the same case, as torch is on the TDPO case)."""
    pairs = dict.fromkeys((c.case, n) for c in CHECKS for n in (c.impl, c.against))
    return [_row(case, n, *_PASSING[n]) for case, n in pairs]


# ---- --model ---------------------------------------------------------------------------------------


def test_model_flag_hands_every_other_argument_to_the_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("bench.model")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "bench.model", fake)
    assert cli.main(["--json", "out.json", "--model", "--gpu", "H100"]) == 3
    assert seen == [["--json", "out.json", "--gpu", "H100"]]


def test_model_flag_without_the_model_says_so(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "bench.model", None)  # import bench.model now fails as if absent
    assert cli.main(["--model"]) == 2
    assert "bench/model.py" in capsys.readouterr().err


# ---- item 7: what --quick prints ------------------------------------------------------------------


def test_console_report_has_no_acceptance_lines_unless_asked() -> None:
    rows = _quick_rows()
    checks = report.acceptance(rows, CHECKS)
    assert checks and all(c["passed"] is not None for c in checks)
    text = report.console_report("tokpo_kernels bench: tier quick on cpu", rows, checks=checks)
    for word in ("acceptance", "issue", "PASS", "FAIL", "needs <="):
        assert word not in text, f"{word!r} in the user-facing output:\n{text}"
    assert "| vocab_stats_kl |" in text and "| tdpo_loss |" in text  # the table itself is there
    shown = report.console_report("t", rows, checks=checks, show_checks=True)
    assert all(c["text"] in shown for c in checks)


def test_quick_run_prints_no_acceptance_lines_and_keeps_them_in_the_json(tmp_path: Path, capsys) -> None:
    # --budget 0: every row that needs a worker is recorded as skipped, none is started, so this runs
    # main's whole path (rows, JSON, printing) in a second.
    assert cli.main(["--quick", "--device", "cpu", "--budget", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "acceptance" not in out and "issue" not in out
    (json_path,) = tmp_path.glob("*-quick.json")
    doc = json.loads(json_path.read_text())
    assert doc["complete"] is True
    assert [c["source"] for c in doc["acceptance"]] == [c.source for c in CHECKS]
    skipped = [m for m in doc["measurements"] if m["status"] == "skipped"]
    assert skipped and all("--budget" in m["reason"] for m in skipped)
    assert "skipped: --budget 0 s spent before this row started" in out


# ---- narrowing flags and row order -----------------------------------------------------------------


def test_heads_are_found_whatever_the_dashes() -> None:
    key = next(iter(HEADS))
    squashed = key.replace("-", "").upper()
    assert cli.resolve_heads([squashed, key]) == [key, key]
    with pytest.raises(ValueError, match="known"):
        cli.resolve_heads(["no-such-head"])


def test_select_cases_narrows_to_heads_and_n_in_the_order_of_ops() -> None:
    head = next(iter(HEADS))
    todo = cli.select_cases("core", ["tdpo_loss", "linear_cross_entropy"], [head], [16384])
    assert [c.op for c in todo] == ["tdpo_loss", "linear_cross_entropy"]
    assert all(c.shape.label == head and c.shape.valid_tokens == 16384 for c in todo)
    assert len(cli.select_cases("core", None, None, None)) == len(cases("core"))


def test_plan_rows_runs_listed_impls_one_after_the_other_over_every_case() -> None:
    todo = cli.select_cases("core", ["linear_cross_entropy", "dpo_loss"], [next(iter(HEADS))], [16384])
    rows = cli.plan_rows(todo, ["naive", "liger_dpo", "torch"], skip=["torch"])
    assert [(c.op, n) for c, n in rows] == [("linear_cross_entropy", "naive"), ("dpo_loss", "naive"),
                                          ("dpo_loss", "liger_dpo")]
    by_case = cli.plan_rows(todo, None)
    assert [n for c, n in by_case if c.op == "dpo_loss"] == list(get_operation("dpo_loss").impls)


# ---- issue 12: bf16 cases, the scale tier, --dtypes, checks with one bound ---------------------------


def test_quick_tier_is_the_two_fp32_acceptance_cases_and_tdpo_in_bf16() -> None:
    assert cases("quick") == [ACCEPTANCE, TDPO_ACCEPTANCE, TDPO_ACCEPTANCE_BF16]
    assert TDPO_ACCEPTANCE_BF16.dtype == "bf16" and TDPO_ACCEPTANCE_BF16.op == "tdpo_loss"
    shape = TDPO_ACCEPTANCE_BF16.shape
    assert (shape.rows, shape.seq, shape.ignored_prefix, shape.dim, shape.vocab) == (4, 512, 64, 256, 32000)
    assert {c.case for c in CHECKS} <= set(cases("quick"))  # every check is on a case the quick tier runs


def test_cpu_tier_runs_every_operation_in_fp32_and_bf16_on_the_same_shapes() -> None:
    got = cases("cpu")
    for op in OPS:
        by_dtype = {c.dtype: c.shape for c in got if c.op == op}
        assert set(by_dtype) == {"fp32", "bf16"}, op
        assert by_dtype["fp32"] == by_dtype["bf16"], op
    assert len(got) == 2 * len(OPS)


def test_scale_tier_is_lce_and_tdpo_at_three_n_in_fp32_and_bf16_on_cpu() -> None:
    got = cases("scale")
    assert {(c.op, c.dtype, c.shape.valid_tokens) for c in got} == {
        (op, dt, n) for op in ("linear_cross_entropy", "tdpo_loss") for dt in ("fp32", "bf16")
        for n in (256, 2048, 16384)}
    assert len(got) == 12
    for c in got:
        s = c.shape
        assert (s.dim, s.vocab, s.ignored_prefix) == (256, 32000, 0)
        assert s.rows * s.seq == s.valid_tokens and s.seq == min(512, s.valid_tokens // 2)
        assert c.op not in PREFERENCE_OPS or s.rows % 2 == 0
    assert tier_device("scale") == "cpu" and tier_reps("scale", "cpu") == 3
    assert "scale" in cli.parse_args(["--tier", "scale"]).tier


def test_n_and_dtypes_narrow_the_scale_tier() -> None:
    todo = cli.select_cases("scale", ["tdpo_loss", "linear_cross_entropy"], None, [2048], ["bf16"])
    assert [(c.op, c.dtype, c.shape.valid_tokens) for c in todo] == [("tdpo_loss", "bf16", 2048),
                                                                    ("linear_cross_entropy", "bf16", 2048)]
    assert {c.dtype for c in cli.select_cases("cpu", None, None, None, ["fp32"])} == {"fp32"}


def test_dtypes_are_checked_against_the_registry() -> None:
    assert cli.resolve_dtypes(["BF16", "fp32"]) == ["bf16", "fp32"]
    with pytest.raises(ValueError, match=r"unknown dtype\(s\) \['fp8'\]; known: \['fp32', 'bf16'"):
        cli.resolve_dtypes(["bf16", "fp8"])


def test_unknown_dtype_is_refused_before_listing(capsys) -> None:
    assert cli.main(["--tier", "scale", "--dtypes", "bf16,fp8", "--list"]) == 2
    assert "unknown dtype(s) ['fp8']" in capsys.readouterr().err


def test_dtype_the_tier_lacks_matches_no_case(capsys) -> None:
    assert cli.main(["--tier", "scale", "--dtypes", "fp16", "--list"]) == 2
    assert "--dtypes fp16" in capsys.readouterr().err


def test_list_of_the_scale_tier_narrowed_by_n_and_dtype(capsys) -> None:
    assert cli.main(["--tier", "scale", "--n", "256", "--dtypes", "bf16", "--impls", "naive,cpp", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [tuple(ln.split("\t")[:4]) for ln in lines] == [
        (op, impl, "2x128 tok (N=256 valid), D=256, V=32000", "bf16")
        for impl in ("naive", "cpp") for op in ("linear_cross_entropy", "tdpo_loss")]


def test_issue_12_checks_are_the_issues_bounds() -> None:
    got = {(c.case, c.impl, c.against, c.max_memory_ratio, c.max_time_ratio) for c in CHECKS if c.source == "issue 12"}
    assert got == {(TDPO_ACCEPTANCE, "cpp", "torch", None, 1.0), (TDPO_ACCEPTANCE, "cpp", "naive", 1 / 25, None),
                   (TDPO_ACCEPTANCE_BF16, "cpp", "torch", None, 1 / 2.5),
                   (TDPO_ACCEPTANCE_BF16, "cpp", "naive", None, 1 / 2)}


def test_a_check_needs_at_least_one_bound() -> None:
    with pytest.raises(ValueError, match="neither"):
        Check("x", TDPO_ACCEPTANCE, "cpp", "torch", None, None)


@pytest.mark.parametrize("cpp_ms, cpp_mib, passed", [(5.0, 300.0, True), (30.0, 1.0, False)])
def test_a_check_with_one_bound_decides_on_it_alone(cpp_ms: float, cpp_mib: float, passed: bool) -> None:
    # Only time is bounded: 30 times torch's memory passes, 1.5x its time fails whatever the memory.
    check = Check("issue 12", TDPO_ACCEPTANCE_BF16, "cpp", "torch", None, 1 / 2.5)
    rows = [_row(TDPO_ACCEPTANCE_BF16, "cpp", cpp_ms, cpp_mib), _row(TDPO_ACCEPTANCE_BF16, "torch", 20.0, 10.0)]
    (res,) = report.acceptance(rows, [check])
    assert res["passed"] is passed
    assert res["max_memory_ratio"] is None and res["memory_ratio"] == pytest.approx(cpp_mib / 10.0)
    assert "peak extra memory" in res["text"] and "not checked" in res["text"]
    assert f"needs <= 0.4x: {'PASS' if passed else 'FAIL'}" in res["text"]
    assert "memory" in res["text"].split("not checked")[0]  # the unbounded ratio is the memory one


def test_checks_with_both_bounds_still_report_both() -> None:
    (res,) = report.acceptance(_quick_rows(), [CHECKS[0]])
    assert res["passed"] is True and "not checked" not in res["text"]
    assert "needs <= 0.125x: PASS" in res["text"] and "needs <= 1.5x: PASS" in res["text"]


def test_every_check_passes_on_passing_rows_and_an_unmeasured_one_is_undecided() -> None:
    rows = _quick_rows()
    assert all(c["passed"] is True for c in report.acceptance(rows, CHECKS))
    no_cpp = [r for r in rows if r["impl"] != "cpp"]
    for c in report.acceptance(no_cpp, CHECKS):
        assert c["passed"] is (None if c["impl"] == "cpp" else True), c["text"]


@pytest.mark.parametrize("mode, device, threshold", [("memory", "cpu", "65536"), ("time", "cpu", None),
                                                     ("both", "cuda", None)])
def test_only_cpu_memory_workers_get_a_64_kib_mmap_threshold(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                             device: str, threshold) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    seen = {}

    def fake_run(cmd, *, env, timeout, **kw):
        seen.update(env)
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    res = runner.spawn_worker({"mode": mode, "device": device}, timeout=1.0)
    assert res["status"] == "unavailable" and "timed out" in res["reason"]
    assert seen.get("MALLOC_MMAP_THRESHOLD_") == threshold


# ---- item 2: this library's rows are its concrete backends -----------------------------------------


def test_library_impls_leave_out_dispatchers() -> None:
    entries = {
        "naive": types.SimpleNamespace(summary="full logits"),  # an entry without the field: concrete
        "fast_a": types.SimpleNamespace(summary="A", picks_among=()),
        "fast_b": types.SimpleNamespace(summary="B", picks_among=()),
        "fast": types.SimpleNamespace(summary="the device's best", picks_among=("fast_a", "fast_b")),
    }
    names = tuple(entries)
    assert _common.concrete_backends(names, entries.__getitem__) == ("naive", "fast_a", "fast_b")
    notes = _common.library_notes(names, entries.__getitem__)
    assert set(notes) == {"naive", "fast_a", "fast_b"}
    assert "impl='fast'" in notes["fast_a"] and "'fast_b'" in notes["fast_a"] and "impl='fast'" not in notes["naive"]


def test_registered_operations_time_no_dispatcher() -> None:
    from tokpo_kernels.backends import backend_entry, backend_names

    dispatching = {n for n in backend_names() if getattr(backend_entry(n), "picks_among", ())}
    assert not dispatching & set(_common.LIBRARY_IMPLS)
    for op in operations():
        assert not dispatching & set(op.impls), op.name


# ---- item 7: the plot -------------------------------------------------------------------------------


def test_plot_labels_values_and_says_why_rows_are_missing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    case = next(c for c in cases("cpu") if c.op == "linear_cross_entropy")
    rows = [_row(case, "naive", ms=123.0, mib=456.0), _row(case, "torch", ms=7.5, mib=8.25),
            _row(case, "cce", status="not installed", reason="not installed: cut_cross_entropy"),
            _row(case, "liger_flce", status="unavailable", reason="unavailable: needs CUDA: Triton kernels"),
            _row(case, "torch_lce", status="unavailable", reason="unavailable: RuntimeError: boom")]
    emulated = [n for n in _common.LIBRARY_IMPLS if _common.needs_interpreter(n, torch.device("cpu"))]
    rows += [_row(case, n, status="unavailable", reason="unavailable: needs CUDA") for n in emulated]
    rows.append(_row(case, "torch_lce_chunked", status="skipped", reason="--budget 5 s spent"))

    notes = report.missing_notes(rows)
    assert "cce: not installed (cut_cross_entropy)" in notes
    assert "liger_flce: unavailable on cpu: needs CUDA" in notes
    assert "torch_lce: failed: RuntimeError" in notes
    assert "torch_lce_chunked: not run: --budget 5 s spent" in notes
    for n in emulated:
        assert any(line.startswith(f"{n}: emulated only on cpu") for line in notes)

    fig = report.build_plot(rows, "test")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert {"123", "456", "7.5", "8.25"} <= set(texts)
    assert "not shown" in fig.axes[0].get_xlabel() and "cut_cross_entropy" in fig.axes[0].get_xlabel()
    assert report.write_plot(tmp_path / "p.png", rows, "test") is None and (tmp_path / "p.png").stat().st_size > 0


def test_plot_labels_the_points_of_a_curve_over_n() -> None:
    pytest.importorskip("matplotlib")
    head = next(iter(HEADS))
    small, large = cli.select_cases("core", ["linear_cross_entropy"], [head], [4096, 16384])
    rows = [_row(small, "naive", ms=11.0, mib=1000.0, device="cuda"),
            _row(large, "naive", ms=44.0, mib=4000.0, device="cuda"),
            _row(small, "torch", ms=13.0, mib=100.0, device="cuda"),
            _row(large, "torch", status="unavailable", reason="unavailable: worker killed (out of memory?)",
                 device="cuda")]
    fig = report.build_plot(rows, "test")
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"11", "44", "13", "1000", "4000", "100"} <= texts
    assert "torch at N = 16384: failed: worker killed (out of memory?)" in fig.axes[0].get_xlabel().replace("\n", " ")


# ---- bench.gemm_rate --------------------------------------------------------------------------------


def test_gemm_plan_has_the_square_reference_and_the_chunk_shapes() -> None:
    dim, vocab = HEADS[next(iter(HEADS))]
    specs = gemm_rate.plan(16384, dim, vocab)
    shapes = [(s["call"], s["m"], s["n"], s["k"]) for s in specs]
    assert len(shapes) == len(set(shapes))
    assert ("mm", 8192, 8192, 8192) in shapes and ("mm_fp32", 8192, 8192, 8192) in shapes
    assert {"logits", "dw", "dh_addmm"} <= {s["call"] for s in specs}
    assert all(s["n"] == dim for s in specs if s["call"] == "dh_addmm")


def _fp32_addmm(acc, a, b, *, out_dtype, out):
    return out.add_(a.float() @ b.float())


def _bf16_addmm(acc, a, b, *, out_dtype, out):  # accumulates, but rounds the sum to bf16 each time
    return out.copy_((acc + a.float() @ b.float()).bfloat16().float())


def _overwriting_addmm(acc, a, b, *, out_dtype, out):  # ignores what the accumulator held
    return out.copy_(a.float() @ b.float())


def _out_of_place_addmm(acc, a, b, *, out_dtype, out):  # returns the sum, leaves acc alone
    return acc + a.float() @ b.float()


@pytest.mark.parametrize("fake, passes", [(_fp32_addmm, True), (_bf16_addmm, False), (_overwriting_addmm, False),
                                          (_out_of_place_addmm, False)])
def test_addmm_check_tells_in_place_fp32_accumulation_from_the_rest(monkeypatch: pytest.MonkeyPatch, fake,
                                                                    passes: bool) -> None:
    monkeypatch.setattr(torch, "addmm", fake)
    res = gemm_rate.addmm_check(torch.device("cpu"), m=48, n=40, k=256)
    assert res["supported"] is True
    assert res["passed"] is passes, res
    assert res["fp32_route_max_abs_error"] < 1e-3


def test_addmm_check_reports_an_unsupported_form() -> None:
    # This PyTorch has no CPU kernel for addmm(out_dtype=): the check says so instead of failing.
    res = gemm_rate.addmm_check(torch.device("cpu"), m=8, n=8, k=16)
    if res["supported"]:
        pytest.skip("this PyTorch supports addmm(out_dtype=) on CPU")
    assert res["passed"] is None and res["error"].startswith(("NotImplementedError", "RuntimeError", "TypeError"))


# ---- tools/gpu_session.sh ---------------------------------------------------------------------------


def _dry_run(*extra: str) -> str:
    # A script without a dry-run mode would run the GPU session here (its test step runs pytest, which
    # would run this test again): refuse to start it at all.
    assert "--dry-run)" in SESSION.read_text(), "tools/gpu_session.sh has no --dry-run mode"
    proc = subprocess.run(["bash", str(SESSION), "--dry-run", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _check_plan(text: str) -> None:
    for step, cmd in (("setup", "pip install"), ("tests", "-m pytest"), ("gemm", "-m bench.gemm_rate"),
                      ("bench", "-m bench --tier core"), ("model", "-m bench --model --json")):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"{step} ")), None)
        assert line is not None and cmd in line, f"step {step} missing from the plan:\n{text}"
        assert re.match(rf"{step}\s+\d+\s+\d+\s", line), line  # its limit and its expected seconds
    expected = int(re.search(r"total expected: (\d+) s", text).group(1))
    worst = int(re.search(r"\(worst case\): (\d+) s", text).group(1))
    assert expected <= worst < NINE_MINUTES_S and "fits in 9 min: yes" in text
    assert "--n 16384" in text and "linear_cross_entropy,tdpo_loss,dpo_loss" in text


def test_gpu_session_dry_run_prints_every_step_and_a_total_under_nine_minutes() -> None:
    _check_plan(_dry_run("--no-measure"))


@pytest.mark.slow  # measures the CPU-side costs: ~1 min of Python start-ups and a pytest collection
def test_gpu_session_dry_run_measures_its_cpu_side_costs() -> None:
    text = _dry_run()
    _check_plan(text)
    assert "CPU-side costs (measured here)" in text
    assert re.search(r"one bench worker process, tiny CPU case\s+\d+\.\d s", text)
    assert re.search(r"pytest collection of the test subset\s+\d+\.\d s\s+\((\d+) tests\)", text)
    assert "past --budget" in text or "predicted:" in text


def test_trainer_memory_runs_both_settings_and_writes_its_json(tmp_path: Path) -> None:
    """``python -m bench.trainer_memory`` end to end on a toy model (the figure itself is a benchmark result,
    committed under bench/results/, not a test): both worker processes run and train the same losses."""
    pytest.importorskip("trl", reason="the trainer benchmark needs trl")
    out = tmp_path / "tm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.trainer_memory", "--hidden", "32", "--layers", "1", "--vocab", "64", "--steps",
         "2", "--prompt-len", "4", "--completion-len", "4", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert len(runs["live"]["step_peak_bytes"]) == len(runs["cached"]["step_peak_bytes"]) == 2
    assert runs["live"]["loss"] == pytest.approx(runs["cached"]["loss"], rel=1e-5)
    assert result["summary"]["ref_param_mib"] > 0 and "--json" not in result["command"]
