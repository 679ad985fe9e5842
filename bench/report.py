"""The Markdown table, the raw JSON and the plot of one ``python -m bench`` run."""

from __future__ import annotations

import json
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from bench.registry import Shape, get_operation

# Relative disagreement of summary scalars (mean logp, lse, KL) between an impl and the baseline
# above which the run prints a warning: the table would be comparing different computations.
CHECK_RTOL = {"fp32": 1e-4, "fp64": 1e-8, "bf16": 2e-2, "fp16": 1e-2}


def _ms(q: Optional[Dict[str, float]]) -> str:
    if not q:
        return "–"

    def f(x: float) -> str:
        return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"

    return f"{f(q['median'])} [{f(q['p20'])}, {f(q['p80'])}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def shape_cell(shape: Dict[str, Any]) -> str:
    return Shape.from_dict(shape).describe().replace(" tok", "").replace(",", "")


def _by_case(measurements: Sequence[Dict[str, Any]]) -> "OrderedDict[tuple, List[Dict[str, Any]]]":
    """Rows grouped by case (and by source file, when rows of several runs are tabulated together:
    ratios are only taken within one run)."""
    groups: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for m in measurements:
        groups.setdefault((m.get("source"), m["case"]), []).append(m)
    return groups


def _baseline(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    name = get_operation(rows[0]["op"]).baseline
    return next((r for r in rows if r["impl"] == name and r["status"] == "ok"), None)


def short_reason(row: Dict[str, Any]) -> str:
    """``"unavailable: needs CUDA"`` rather than the full explanation (kept in the JSON and notes)."""
    reason = row["reason"] or row["status"]
    if not reason.startswith(("unavailable", "not installed")):
        reason = f"{row['status']}: {reason}"
    head, _, rest = reason.partition(": ")
    return f"{head}: {rest.split(': ')[0]}" if rest else head


def markdown_table(measurements: Sequence[Dict[str, Any]], *, full_reasons: bool = True) -> str:
    """One row per (case, impl). Rows carrying a ``source`` key (``python -m bench.readme``) get a
    source column with it."""
    with_source = any("source" in m for m in measurements)
    head = ["operation", "impl", "shape", "dtype", "fwd ms", "bwd ms", "fwd+bwd ms", "peak extra MiB",
            "TFLOP/s", "time vs naive", "mem vs naive"] + (["source"] if with_source else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 7 + ["---"] * with_source) + "|"]
    for rows in _by_case(measurements).values():
        base = _baseline(rows)
        for r in rows:
            cells = [r["op"], r["impl"], shape_cell(r["shape"]), r["dtype"]]
            if r["status"] != "ok":
                reason = (r["reason"] if r["reason"].startswith(("unavailable", "not installed"))
                          else f"{r['status']}: {r['reason']}") if full_reasons else short_reason(r)
                cells += [_cell(reason)] + ["–"] * 6
            else:
                t, mem = r["time"], r["memory"]["fwd_bwd_peak_mib"]
                if base is not None:
                    tr = t["fwd_bwd_ms"]["median"] / base["time"]["fwd_bwd_ms"]["median"]
                    bm = base["memory"]["fwd_bwd_peak_mib"]
                    mr = f"{mem / bm:.2f}x" if bm > 0 else "n/a"
                    tr = f"{tr:.2f}x"
                else:
                    tr = mr = "n/a"
                cells += [_ms(t["fwd_ms"]), _ms(t["bwd_ms"]), _ms(t["fwd_bwd_ms"]), f"{mem:.1f}",
                          f"{r['tflops']['fwd_bwd']:.3g}", tr, mr]
            if with_source:
                cells.append(r.get("source", ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(measurements: Sequence[Dict[str, Any]]) -> List[str]:
    """Footnotes: what the operations and impls are, what the columns mean, the inputs' measured
    statistics, and any cross-check failure."""
    out: List[str] = []
    ops = OrderedDict((m["op"], get_operation(m["op"])) for m in measurements)
    for op in ops.values():
        out.append(f"{op.name}: {op.description}")
    impl_notes = OrderedDict(((m["op"], m["impl"]), m.get("note")) for m in measurements if m.get("note"))
    seen = set()
    for (_op, impl), note in impl_notes.items():
        if (impl, note) not in seen:  # the library's impls have one note for every operation
            seen.add((impl, note))
            out.append(f"{impl}: {note}")
    out.append("times: median [p20, p80] over repetitions; bwd is the backward half of the fwd+bwd step; "
               "TFLOP/s = model FLOPs of fwd+bwd over N valid tokens / median fwd+bwd time; "
               "peak extra MiB = peak memory of one fwd+bwd above the memory held before it (inputs excluded), "
               "measured in a separate process from the timing")
    for (_, key), rows in _by_case(measurements).items():
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            continue
        e = ok[0]["extra"]
        if "mean_entropy_nats" in e:
            kl = f", mean KL(ref||policy) {e['mean_kl_nats']:.3f} nats" if "mean_kl_nats" in e else ""
            lp = f", mean label log-prob {e['mean_label_logp']:.2f}" if "mean_label_logp" in e else ""
            out.append(f"{key}: inputs' mean entropy {e['mean_entropy_nats']:.2f} nats over "
                       f"{e['entropy_measured_on_tokens']} valid tokens (logit std {e['logit_std']:.2f}){kl}{lp}")
        base = _baseline(rows)
        rtol = CHECK_RTOL.get(rows[0]["dtype"], 1e-2)
        for r in ok:
            if base is None or r is base or not r.get("summary") or not base.get("summary"):
                continue
            for name, v in r["summary"].items():
                b = base["summary"].get(name)
                if b is not None and abs(v - b) > rtol * max(1.0, abs(b)):
                    out.append(f"WARNING {key}: {r['impl']} {name}={v:.6g} differs from {base['impl']} {b:.6g}")
    return out


def console_report(title: str, measurements: Sequence[Dict[str, Any]], *, checks: Sequence[Dict[str, Any]] = (),
                   show_checks: bool = False, extra_lines: Sequence[str] = ()) -> str:
    """What ``python -m bench`` prints: a heading, the table, then the notes as a bullet list.

    The quick tier's pass/fail checks (``acceptance``) are criteria this project set itself; they
    say nothing a user needs to read the table, so they are printed only with ``show_checks``
    (``--checks``) and are otherwise kept in the JSON alone.
    """
    lines = [f"\n## {title}\n", markdown_table(measurements), ""]
    bullets = notes(measurements) + ([c["text"] for c in checks] if show_checks else []) + list(extra_lines)
    lines += [f"- {b}" for b in bullets]
    return "\n".join(lines)


def _verdict(ok: Optional[bool], bound: Optional[float], fmt: str) -> str:
    return "not checked" if ok is None else f"needs <= {bound:{fmt}}x: {'PASS' if ok else 'FAIL'}"


def acceptance(measurements: Sequence[Dict[str, Any]], checks: Sequence[Any]) -> List[Dict[str, Any]]:
    """Evaluate acceptance checks (``bench.tiers.Check``) on the measured rows: forward+backward
    peak-memory and median-time ratios of ``impl`` to ``against`` on the check's case. A bound of
    None is not checked: its ratio is still reported, marked "not checked", and does not decide
    ``passed``."""
    out: List[Dict[str, Any]] = []
    for c in checks:
        rows = {m["impl"]: m for m in measurements if m["case"] == c.case.key}
        a, b = rows.get(c.impl), rows.get(c.against)
        res: Dict[str, Any] = {"source": c.source, "case": c.case.key, "impl": c.impl, "against": c.against,
                               "max_memory_ratio": c.max_memory_ratio, "max_time_ratio": c.max_time_ratio}
        head = f"{c.source} acceptance, {c.case.op} {shape_cell(c.case.shape.to_dict())} {c.case.dtype}"
        if not a or not b or a["status"] != "ok" or b["status"] != "ok":
            why = "not measured" if not a or not b else (a["reason"] if a["status"] != "ok" else b["reason"])
            out.append({**res, "passed": None, "text": f"{head}: {c.impl} vs {c.against}: {why}"})
            continue
        mem = a["memory"]["fwd_bwd_peak_mib"] / max(b["memory"]["fwd_bwd_peak_mib"], 1e-9)
        tim = a["time"]["fwd_bwd_ms"]["median"] / b["time"]["fwd_bwd_ms"]["median"]
        ok_mem = None if c.max_memory_ratio is None else mem <= c.max_memory_ratio
        ok_time = None if c.max_time_ratio is None else tim <= c.max_time_ratio
        res.update(memory_ratio=mem, time_ratio=tim, passed=all(ok is not False for ok in (ok_mem, ok_time)))
        res["text"] = (
            f"{head}: {c.impl} vs {c.against}, forward+backward: peak extra memory "
            f"{a['memory']['fwd_bwd_peak_mib']:.1f} vs {b['memory']['fwd_bwd_peak_mib']:.1f} MiB = {mem:.3f}x "
            f"({1 / mem if mem > 0 else float('inf'):.1f}x less; {_verdict(ok_mem, c.max_memory_ratio, '.3f')}), "
            f"median time {a['time']['fwd_bwd_ms']['median']:.0f} vs "
            f"{b['time']['fwd_bwd_ms']['median']:.0f} ms = {tim:.2f}x ({_verdict(ok_time, c.max_time_ratio, '')})")
        out.append(res)
    return out


def write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def missing_reason(row: Dict[str, Any]) -> str:
    """Why a row has no numbers, in the plot's few words: ``not installed (<module>)``,
    ``emulated only on cpu`` (a Triton backend there runs in the interpreter, a test tool, never
    timed), ``unavailable on <device>: ...`` (the impl does not run on that device), ``not run: ...``
    (``--budget`` spent) or ``failed: ...`` (it should run but errored, ran out of memory or timed out)."""
    from tokpo_kernels.backends import backend_entry, backend_names

    status, reason = row["status"], row.get("reason") or row["status"]
    if status == "not installed":
        return f"not installed ({reason.partition(': ')[2] or reason})"
    if status == "skipped":
        return f"not run: {reason}"
    dev = torch.device(row["device"]).type
    if row["impl"] in backend_names() and dev in backend_entry(row["impl"]).emulated_devices:
        return f"emulated only on {dev} (Triton interpreter: tested, not timed)"
    impl = get_operation(row["op"]).impls.get(row["impl"])
    elsewhere = impl.unavailable_on(row["device"]) if impl is not None else None
    if elsewhere:
        return f"unavailable on {dev}: {elsewhere.split(': ')[0]}"
    short = short_reason(row)
    return "failed: " + (short.partition(": ")[2] or short)


def missing_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per impl of a plot panel with rows that have no numbers: why, and at which N when
    only some of its rows are missing."""
    by_impl: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    out = []
    for impl, rs in by_impl.items():
        bad = [r for r in rs if r["status"] != "ok"]
        if not bad:
            continue
        reasons = OrderedDict((missing_reason(r), None) for r in bad)
        where = "" if len(bad) == len(rs) else " at N = " + ", ".join(str(r["shape"]["valid_tokens"]) for r in bad)
        out.append(f"{impl}{where}: {'; '.join(reasons)}")
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def write_plot(path: Path, measurements: Sequence[Dict[str, Any]], title: str) -> Optional[str]:
    """Write ``build_plot``'s figure to ``path``. Returns a reason when no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); plot skipped"
    if not any(m["status"] == "ok" for m in measurements):
        return "no successful measurement to plot"
    fig = build_plot(measurements, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def build_plot(measurements: Sequence[Dict[str, Any]], title: str) -> Any:
    """Time and peak memory vs N per impl, one row of panels per (operation, head, dtype); bars
    when a group has a single N. Every bar and point is labelled with its value, and each panel
    says which impls it lacks and why (``missing_notes``). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    groups: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for m in measurements:
        s = m["shape"]
        groups.setdefault((m["op"], s["dim"], s["vocab"], m["dtype"], s.get("label", "")), []).append(m)

    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    for (ax_t, ax_m), ((op, dim, vocab, dtype, label), all_rows) in zip(axes, groups.items(), strict=True):
        rows = [r for r in all_rows if r["status"] == "ok"]
        impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
        ns = sorted({r["shape"]["valid_tokens"] for r in all_rows})
        for ax, ylabel in ((ax_t, "fwd+bwd time, ms (median, p20-p80)"), (ax_m, "peak extra memory, MiB")):
            ax.set_title(f"{op} {label} D={dim} V={vocab} {dtype}".replace("  ", " "), fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
        if not rows:
            for ax in (ax_t, ax_m):
                ax.text(0.5, 0.5, "no impl ran on this case", ha="center", va="center", transform=ax.transAxes)
            xlabel = f"N = {', '.join(map(str, ns))} valid tokens"
        elif len(ns) == 1:
            for i, impl in enumerate(impls):
                r = next(x for x in rows if x["impl"] == impl)
                q = r["time"]["fwd_bwd_ms"]
                ax_t.bar(i, q["median"], yerr=[[q["median"] - q["p20"]], [q["p80"] - q["median"]]], capsize=4)
                mem = r["memory"]["fwd_bwd_peak_mib"]
                ax_m.bar(i, mem)
                # The value sits above the error bar's top (p80), where it overlaps nothing.
                for ax, value, top in ((ax_t, q["median"], max(q["median"], q["p80"])), (ax_m, mem, mem)):
                    ax.annotate(_fmt(value), (i, top), textcoords="offset points", xytext=(0, 3), ha="center",
                                fontsize=7)
            for ax in (ax_t, ax_m):
                ax.set_xticks(range(len(impls)), impls, rotation=15, fontsize=8)
                ax.margins(y=0.12)  # room for the value labels above the tallest bar
            xlabel = f"impl (N = {ns[0]} valid tokens)"
        else:
            for impl in impls:
                rs = sorted((x for x in rows if x["impl"] == impl), key=lambda x: x["shape"]["valid_tokens"])
                n = [x["shape"]["valid_tokens"] for x in rs]
                med = [x["time"]["fwd_bwd_ms"]["median"] for x in rs]
                err = [[x["time"]["fwd_bwd_ms"]["median"] - x["time"]["fwd_bwd_ms"]["p20"] for x in rs],
                       [x["time"]["fwd_bwd_ms"]["p80"] - x["time"]["fwd_bwd_ms"]["median"] for x in rs]]
                mem = [x["memory"]["fwd_bwd_peak_mib"] for x in rs]
                ax_t.errorbar(n, med, yerr=err, marker="o", capsize=3, label=impl)
                ax_m.plot(n, mem, marker="o", label=impl)
                for ax, ys in ((ax_t, med), (ax_m, mem)):
                    for x, y in zip(n, ys, strict=True):
                        ax.annotate(_fmt(y), (x, y), textcoords="offset points", xytext=(0, 4), ha="center",
                                    fontsize=6)
            for ax in (ax_t, ax_m):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.legend(fontsize=8)
            xlabel = "N valid tokens"
        missing = missing_notes(all_rows)
        for ax in (ax_t, ax_m):
            ax.set_xlabel(xlabel, fontsize=8)
        if missing:
            # Under the time panel, wrapped: the x label is part of tight_layout's bounding box, so the
            # note gets its room without hand-placed coordinates.
            text = "\n".join(textwrap.fill(m, 90, subsequent_indent="    ") for m in missing)
            ax_t.set_xlabel(f"{xlabel}\nnot shown:\n{text}", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # leave the top 0.35 in to the title
    return fig
