"""``python -m bench``: run a tier, print a Markdown comparison table, write JSON and a plot.

    python -m bench --quick                     # the three acceptance cases on the current device (CPU: a few min)
    python -m bench --tier cpu                  # every operation, small shapes, fp32 and bf16, CPU (~10 min on 2 cores)
    python -m bench --tier scale                # linear CE and TDPO at N = 256/2048/16384, fp32 and bf16, CPU
    python -m bench --tier cpu --dtypes bf16    # only the bf16 cases of a tier
    python -m bench --tier core                 # real heads in bf16 (CUDA only)
    python -m bench --tier core --ops tdpo_loss --heads llama-3-8b --n 16384    # one case of it
    python -m bench --tier sweep --ops vocab_stats_kl --impls torch,triton_chunked
    python -m bench --model [--json PATH]       # the cost model's predictions (bench/model.py), no measurement
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from bench import report
from bench.env import REPO_ROOT, CpuContention, device_name, environment, slug
from bench.registry import DTYPES, Case, get_operation, operations
from bench.runner import run_one
from bench.tiers import CHECKS, GPU_ONLY, HEADS, TIERS, cases, tier_device, tier_reps

CONTENTION_WARN_CORES = 0.2  # average cores used by other processes above which CPU timings are flagged
# Under --budget a row is started only with at least this many seconds left: below it even a
# cheap row's two worker processes (each ~4 s of start-up) cannot finish.
MIN_ROW_S = 20.0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="store_true",
                   help="print the cost model's predictions instead of measuring (bench/model.py); every "
                        "other argument is the model's own (e.g. --json PATH)")
    p.add_argument("--quick", action="store_true",
                   help="the acceptance cases (vocab_stats_kl and tdpo_loss in fp32, tdpo_loss in bf16, 4 x 512 "
                        "tokens, V = 32000) on the current device; same as --tier quick")
    p.add_argument("--tier", choices=TIERS, default="cpu",
                   help="case list (default: cpu): quick (see --quick); cpu (every operation, N = 224, fp32 and "
                        "bf16); scale (CPU: linear_cross_entropy and tdpo_loss at N = 256, 2048, 16384, D = 256, "
                        "V = 32000, fp32 and bf16); core, sweep (CUDA: real heads, bf16)")
    p.add_argument("--impls", default=None,
                   help="comma list of implementations/peers to keep, run in the order given, each over all the "
                        "cases before the next (default: every one registered for each operation, case by case; "
                        "those that cannot run here still get a row saying why)")
    p.add_argument("--skip-impls", default=None,
                   help="comma list of implementations/peers to leave out (applied after --impls)")
    p.add_argument("--ops", default=None,
                   help="comma list of operations to keep, run in the order given (default: all of the tier)")
    p.add_argument("--heads", default=None,
                   help=f"comma list of lm-heads to keep on the core tier ({', '.join(HEADS)})")
    p.add_argument("--n", default=None, help="comma list of valid-token counts N to keep (e.g. 16384)")
    p.add_argument("--dtypes", default=None,
                   help=f"comma list of input dtypes to keep, among {', '.join(DTYPES)} (default: every dtype of "
                        "the tier)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: the current device for quick, cpu for cpu and scale, cuda "
                        "for core/sweep)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="output directory")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 20 on CUDA; on CPU 5 for quick, 3 for the cpu and scale "
                        "tiers)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing/memory (default: 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process (default: 900)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: rows are started only while time is left, each worker "
                        "gets at most half of what is left, and rows left over get a 'skipped' row; the "
                        "JSON and the plot are written either way (default: no limit)")
    p.add_argument("--checks", action="store_true",
                   help="also print the quick tier's pass/fail checks (they are always stored in the JSON)")
    p.add_argument("--list", action="store_true",
                   help="print the rows the run would measure (operation, impl, shape, model FLOPs, whether it "
                        "can run here) and exit without measuring")
    args = p.parse_args(argv)
    if args.quick:
        args.tier = "quick"
    return args


def _split(text: Optional[str]) -> Optional[List[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _head_key(name: str) -> str:
    # "llama3-8b", "Llama-3-8B" and "llama-3-8b" name one head: compare letters and digits only.
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_heads(names: Sequence[str]) -> List[str]:
    """The ``tiers.HEADS`` keys ``names`` stand for (spelling of dashes and dots aside);
    ``ValueError`` naming the known heads for one that matches none."""
    by_key = {_head_key(k): k for k in HEADS}
    unknown = [n for n in names if _head_key(n) not in by_key]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; known: {list(HEADS)}")
    return [by_key[_head_key(n)] for n in names]


def resolve_dtypes(names: Sequence[str]) -> List[str]:
    """``names`` as ``registry.DTYPES`` keys (case aside); ``ValueError`` naming the known dtypes for
    one that is none of them."""
    unknown = [n for n in names if n.lower() not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; known: {list(DTYPES)}")
    return [n.lower() for n in names]


def select_cases(tier: str, ops: Optional[Sequence[str]], heads: Optional[Sequence[str]],
                 ns: Optional[Sequence[int]], dtypes: Optional[Sequence[str]] = None) -> List[Case]:
    """The tier's cases narrowed to ``ops`` (in the order given: a run cut short by ``--budget``
    has measured the first ones), ``heads`` (``tiers.HEADS`` keys), valid-token counts ``ns`` and
    input dtypes ``dtypes`` (``registry.DTYPES`` keys)."""
    todo = cases(tier, ops)
    if heads:
        todo = [c for c in todo if c.shape.label in heads]
    if ns:
        todo = [c for c in todo if c.shape.valid_tokens in ns]
    if dtypes:
        todo = [c for c in todo if c.dtype in dtypes]
    if ops:
        todo.sort(key=lambda c: ops.index(c.op))  # stable: the tier's order within an operation
    return todo


def run_model(argv: Sequence[str]) -> int:
    """``python -m bench --model ...``: hand every other argument to the cost model, ``bench.model.main``.

    Imported here, not at the top: measuring must work in a tree (or an install) without the model.
    """
    try:
        model = importlib.import_module("bench.model")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.model":
            raise
        print("python -m bench --model: the cost model (bench/model.py) is not in this tree", file=sys.stderr)
        return 2
    return int(model.main(list(argv)) or 0)


def _dispatcher_hint(names: Sequence[str]) -> str:
    """Why a backend name the library accepts has no rows (a dispatcher), or ''."""
    from bench.ops._common import dispatchers
    from tokpo_kernels.backends import backend_names

    picking = dispatchers(backend_names())
    hints = [f"{n!r} runs one of {', '.join(picking[n])} per device and is measured as those"
             for n in names if n in picking]
    return ("; " + "; ".join(hints)) if hints else ""


def skipped_row(case: Case, impl: str, device: str, reason: str) -> Dict[str, Any]:
    """The record of a row ``--budget`` left unmeasured, shaped like ``runner.run_one``'s."""
    op = get_operation(case.op)
    return {"case": case.key, "op": case.op, "impl": impl, "shape": case.shape.to_dict(), "dtype": case.dtype,
            "device": device, "flops": op.flops(case.shape), "status": "skipped", "reason": reason,
            "time": None, "tflops": None, "memory": None, "extra": {}, "summary": None, "worker_s": {},
            "note": op.impls[impl].note}


def plan_rows(todo: Sequence[Case], impls: Optional[Sequence[str]], skip: Sequence[str] = ()) -> List[tuple]:
    """The ``(case, impl name)`` rows of a run, in run order. With ``impls`` the rows go impl by impl
    in that order (each over every case that has it): a run cut short by ``--budget`` then lacks the
    impls listed last, not the cases listed last. Without, case by case in registration order."""
    if impls is None:
        rows = [(c, n) for c in todo for n in get_operation(c.op).impls]
    else:
        rows = [(c, n) for n in impls for c in todo if n in get_operation(c.op).impls]
    return [(c, n) for c, n in rows if n not in skip]


def list_rows(rows: Sequence[tuple], device: str) -> List[str]:
    """One tab-separated line per row: operation, impl, shape, dtype, model FLOPs of one
    forward+backward, and whether it can run on ``device`` here (no worker is started)."""
    lines = []
    for case, name in rows:
        op = get_operation(case.op)
        impl = op.impls[name]
        missing = impl.missing()
        why = f"not installed: {missing}" if missing else impl.unavailable_on(device)
        lines.append("\t".join([case.op, name, case.shape.describe(), case.dtype,
                                f"{op.flops(case.shape)['fwd_bwd']:.4g}",
                                f"here ({device}): " + ("runs" if why is None else why.splitlines()[0])]))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:
        return run_model([a for a in argv if a != "--model"])
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or tier_device(args.tier))

    impls, ops, skip = _split(args.impls), _split(args.ops), _split(args.skip_impls) or []
    known = {op.name for op in operations()}
    if ops and not set(ops) <= known:
        print(f"unknown operation(s) {sorted(set(ops) - known)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    registered = {name for op in operations() for name in op.impls}
    named = set(impls or []) | set(skip)
    if not named <= registered:
        # A name no operation knows is a typo, not a missing peer: peers are registered (and
        # then reported "not installed") whether or not their package is present.
        unknown = sorted(named - registered)
        print(f"unknown impl(s) {unknown}; registered: {sorted(registered)}{_dispatcher_hint(unknown)}",
              file=sys.stderr)
        return 2
    try:
        heads = resolve_heads(_split(args.heads)) if args.heads else None
        ns = [int(n) for n in _split(args.n)] if args.n else None
        dtypes = resolve_dtypes(_split(args.dtypes)) if args.dtypes else None
    except ValueError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    todo = select_cases(args.tier, ops, heads, ns, dtypes)
    if not todo:
        print(f"no case of tier {args.tier!r} matches --ops {args.ops} --heads {args.heads} --n {args.n} "
              f"--dtypes {args.dtypes}", file=sys.stderr)
        return 2
    rows = plan_rows(todo, impls, skip)
    if args.list:
        for line in list_rows(rows, str(device)):
            print(line)
        return 0
    if args.tier in GPU_ONLY and device.type != "cuda":
        print(f"tier {args.tier!r} needs a CUDA device (real lm-heads in bf16); device is {device}: skipped.")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"device {device} requested but CUDA is not available", file=sys.stderr)
        return 2
    reps = args.reps or tier_reps(args.tier, str(device))
    dev_name = device_name(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # The tier is part of the name: a quick and a cpu run of the same day must not overwrite each other.
    stem = f"{slug(dev_name)}-{datetime.date.today().isoformat()}-{args.tier}"
    out_dir = Path(args.out)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    replaced = json_path.exists()
    config = {"tier": args.tier, "impls": impls, "skip_impls": skip, "ops": ops, "heads": heads, "n": ns,
              "dtypes": dtypes, "reps": reps,
              "warmup": args.warmup, "timeout_s": args.timeout, "budget_s": args.budget, "argv": argv}

    contention = CpuContention()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        log(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores before starting: other processes "
            "compete for the CPU, timings will be noisy and slow")
    log(f"tokpo_kernels bench: tier {args.tier}, {len(todo)} case(s), {len(rows)} rows on {dev_name} ({device}), "
        f"{reps} reps, each (case, impl) in fresh timing and memory processes")
    deadline = None if args.budget is None else t_start + args.budget
    measurements: List[Dict[str, Any]] = []
    for i, (case, name) in enumerate(rows, 1):
        impl = get_operation(case.op).impls[name]
        log(f"[{i}/{len(rows)}] {case.op} {case.shape.describe()} {case.dtype}: {name}")
        timeout = args.timeout
        # A row that needs no worker (not installed, not for this device) costs nothing: always recorded.
        instant = impl.missing() or impl.unavailable_on(str(device))
        if deadline is not None and not instant:
            left = deadline - time.perf_counter()
            if left < MIN_ROW_S:
                measurements.append(skipped_row(case, name, str(device),
                                                f"--budget {args.budget:.0f} s spent before this row started"))
                log("  skipped: --budget spent")
                continue
            timeout = min(timeout, left / 2)  # the timing and the memory worker each get half
        m = run_one(case, name, str(device), reps=reps, warmup=args.warmup, timeout=timeout, log=log)
        if timeout < args.timeout and m["status"] != "ok" and "timed out" in (m["reason"] or ""):
            m = {**m, "status": "skipped",
                 "reason": f"not finished within --budget {args.budget:.0f} s (its workers had {timeout:.0f} s)"}
        measurements.append(m)
        # Written after every row: a run stopped from outside (a session's time limit) keeps what it measured.
        report.write_json(json_path, _payload(device, config, measurements, [], complete=False,
                                              wall_s=time.perf_counter() - t_start))

    env = environment(device)
    others = contention.other_cores()
    env["other_processes_avg_cores"] = None if others is None else round(others, 2)
    checks = report.acceptance(measurements, CHECKS) if args.tier == "quick" else []
    extra = []
    if device.type == "cpu" and others is not None and others > CONTENTION_WARN_CORES:
        extra.append(f"WARNING: other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during "
                     "this run: CPU timings are inflated and noisy; rerun on an idle machine")
    commit = (env["commit"] or "unknown")[:12] + (" (dirty tree)" if env.get("dirty") else "")
    extra.append(f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, commit {commit}, "
                 f"{env['torch_threads']} torch threads; peers: "
                 + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items()))
    print(report.console_report(f"tokpo_kernels bench: tier {args.tier} on {dev_name} ({device})", measurements,
                                checks=checks, show_checks=args.checks, extra_lines=extra))

    payload = _payload(device, config, measurements, checks, complete=True, wall_s=time.perf_counter() - t_start,
                       env=env)
    report.write_json(json_path, payload)
    print(f"\nwrote {json_path}" + (" (replaced an earlier run of today)" if replaced else ""))
    skipped = report.write_plot(png_path, measurements, f"tokpo_kernels bench, tier {args.tier}, {dev_name}")
    print(f"plot: {skipped}" if skipped else f"wrote {png_path}")
    print(f"wall time {time.perf_counter() - t_start:.1f} s")
    return 0


def _payload(device: torch.device, config: Dict[str, Any], measurements: List[Dict[str, Any]],
             checks: List[Dict[str, Any]], *, complete: bool, wall_s: float,
             env: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON of a run. ``complete`` is false in the copies written after each row; the
    acceptance checks (the quick tier's pass/fail criteria) are stored here even when not printed."""
    return {
        "schema": 2,
        "complete": complete,
        "environment": env if env is not None else environment(device),
        "config": config,
        "operations": {op.name: op.description for op in operations()},
        "measurements": measurements,
        "acceptance": checks,
        "table_markdown": report.markdown_table(measurements),
        "wall_s": round(wall_s, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
