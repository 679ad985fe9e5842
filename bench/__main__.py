"""``python -m bench``: run a tier, print a Markdown comparison table, write JSON and a plot.

    python -m bench --quick                     # acceptance cases on the current device (CPU: ~2-3 min)
    python -m bench --tier cpu                  # every operation, small shapes, CPU (< 5 min on 2 cores)
    python -m bench --tier core                 # real heads in bf16 (CUDA only)
    python -m bench --tier sweep --ops vocab_stats_kl --impls torch,triton
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from bench import report
from bench.env import REPO_ROOT, CpuContention, device_name, environment, slug
from bench.registry import get_operation, operations
from bench.runner import run_one
from bench.tiers import CHECKS, GPU_ONLY, TIERS, cases, tier_device, tier_reps

CONTENTION_WARN_CORES = 0.2  # average cores used by other processes above which CPU timings are flagged


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="only the acceptance cases, on the current device; same as --tier quick")
    p.add_argument("--tier", choices=TIERS, default="cpu", help="case list (default: cpu)")
    p.add_argument("--impls", default=None,
                   help="comma list of implementations/peers to keep (default: every one registered for "
                        "each operation; those that cannot run here still get a row saying why)")
    p.add_argument("--ops", default=None, help="comma list of operations to keep (default: all of the tier)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: the current device for quick, cpu for cpu, cuda for "
                        "core/sweep)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"), help="output directory")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 20 on CUDA; on CPU 5 for quick, 3 for the cpu tier)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing/memory (default: 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process (default: 900)")
    args = p.parse_args(argv)
    if args.quick:
        args.tier = "quick"
    return args


def _split(text: Optional[str]) -> Optional[List[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or tier_device(args.tier))
    if args.tier in GPU_ONLY and device.type != "cuda":
        print(f"tier {args.tier!r} needs a CUDA device (real lm-heads in bf16); device is {device}: skipped.")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"device {device} requested but CUDA is not available", file=sys.stderr)
        return 2

    impls, ops = _split(args.impls), _split(args.ops)
    known = {op.name for op in operations()}
    if ops and not set(ops) <= known:
        print(f"unknown operation(s) {sorted(set(ops) - known)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    registered = {name for op in operations() for name in op.impls}
    if impls and not set(impls) <= registered:
        # A name no operation knows is a typo, not a missing peer: peers are registered (and
        # then reported "not installed") whether or not their package is present.
        print(f"unknown impl(s) {sorted(set(impls) - registered)}; registered: {sorted(registered)}",
              file=sys.stderr)
        return 2
    todo = cases(args.tier, ops)
    reps = args.reps or tier_reps(args.tier, str(device))
    dev_name = device_name(device)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    contention = CpuContention()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        log(f"WARNING: load average {load:.1f} on {os.cpu_count()} cores before starting: other processes "
            "compete for the CPU, timings will be noisy and slow")
    log(f"tokpo_kernels bench: tier {args.tier}, {len(todo)} case(s) on {dev_name} ({device}), {reps} reps, "
        "each (case, impl) in fresh timing and memory processes")
    measurements = []
    for i, case in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {case.op} {case.shape.describe()} {case.dtype}")
        for impl in get_operation(case.op).impls:
            if impls is None or impl in impls:
                measurements.append(run_one(case, impl, str(device), reps=reps, warmup=args.warmup,
                                            timeout=args.timeout, log=log))

    env = environment(device)
    others = contention.other_cores()
    env["other_processes_avg_cores"] = None if others is None else round(others, 2)
    # The tier is part of the name: a quick and a cpu run of the same day must not overwrite each other.
    stem = f"{slug(dev_name)}-{datetime.date.today().isoformat()}-{args.tier}"
    out_dir = Path(args.out)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"

    table = report.markdown_table(measurements)
    checks = report.acceptance(measurements, CHECKS) if args.tier == "quick" else []
    print(f"\n## tokpo_kernels bench: tier {args.tier} on {dev_name} ({device})\n")
    print(table)
    print()
    for line in report.notes(measurements) + [c["text"] for c in checks]:
        print(f"- {line}")
    if device.type == "cpu" and others is not None and others > CONTENTION_WARN_CORES:
        print(f"- WARNING: other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during "
              "this run: CPU timings are inflated and noisy; rerun on an idle machine")
    commit = (env["commit"] or "unknown")[:12] + (" (dirty tree)" if env.get("dirty") else "")
    print(f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}, commit {commit}, "
          f"{env['torch_threads']} torch threads; peers: "
          + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items()))

    payload = {
        "schema": 2,
        "environment": env,
        "config": {"tier": args.tier, "impls": impls, "ops": ops, "reps": reps, "warmup": args.warmup,
                   "timeout_s": args.timeout, "argv": sys.argv[1:] if argv is None else argv},
        "operations": {op.name: op.description for op in operations()},
        "measurements": measurements,
        "acceptance": checks,
        "table_markdown": table,
    }
    payload["wall_s"] = round(time.perf_counter() - t_start, 1)
    replaced = json_path.exists()
    report.write_json(json_path, payload)
    print(f"\nwrote {json_path}" + (" (replaced an earlier run of today)" if replaced else ""))
    skipped = report.write_plot(png_path, measurements, f"tokpo_kernels bench, tier {args.tier}, {dev_name}")
    print(f"plot: {skipped}" if skipped else f"wrote {png_path}")
    print(f"wall time {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
