"""``python -m bench.gemm_rate``: the bf16 GEMM rate of this GPU, at the shapes the library runs.

    python -m bench.gemm_rate --json gemm_rate.json            # CUDA: ~10 s
    python -m bench.gemm_rate --plan                           # the shapes only (any machine)

The cost model (``python -m bench --model``) predicts times from a GEMM rate; this measures the rate
on the machine the bench ran on, so a measured row can be set against the model with the model's
own assumption replaced. It times, with CUDA events after a half-second warm-up (the clocks idle
low), the median of ``--reps`` products on random data (products of zeros run faster):

* ``square``: 8192 x 8192 x 8192, bf16 -> bf16 and bf16 -> fp32 (``torch.mm(..., out_dtype=)``);
* per Triton strategy, at the chunk widths ``tokpo_kernels.kernels.chunking.chunk_plan`` gives at
  ``--n`` rows of the head (with and without a reference), in the layouts the library uses:
  ``logits`` z = h W_cᵀ (N x C x D, fp32 out: the chunked strategy's forward chunks and backward
  recompute), ``dW`` dz_cᵀ h (C x D x N, fp32 out, one per backward sub-chunk), ``dh`` acc += dz_w W_w
  (N x D x window, ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``: the fp32 ∂h
  accumulator updated in place once per window).

It also checks that in-place form against float64 (``addmm_check``): twice applied, the result must
be the accumulator itself and within the a-priori fp32 summation bound ``k · 2⁻²⁴ · (|acc| + |a||b|)``
of the exact sum, which a bf16-rounded or an overwritten accumulator exceeds. The library relies on
that form on CUDA only after the same check passes there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

SQUARE = 8192
REPS = 10
WARMUP_S = 0.5  # GPU clocks idle at a few hundred MHz and take a moment to reach their boost clock
U32 = 2.0 ** -24  # unit roundoff of fp32
# Chunk widths used when tokpo_kernels.kernels.chunking is not importable (an older tree): round
# numbers of the order the default 10 % budget gives at the Llama-3-8B head and N = 16384.
FALLBACK_PLAN = {"forward": 1024, "sub": 512, "window": 2048}


def chunk_widths(n: int, dim: int, vocab: int, in_bytes: int = 2) -> Dict[str, Any]:
    """``{"source": ..., "plans": {"<strategy>[+ref]": {"forward": F, "sub": S, "window": W}}}``: the
    library's chunk widths per strategy, without and with a reference model, at ``n`` rows of a
    ``vocab x dim`` head (``chunking.chunk_plan``; an older tree's ``chunk_columns`` gives one width)."""
    try:
        from tokpo_kernels.kernels import chunking
    except ImportError:
        chunking = None
    plan_fn = getattr(chunking, "chunk_plan", None)
    columns_fn = getattr(chunking, "chunk_columns", None)
    if chunking is None or (plan_fn is None and columns_fn is None):
        return {"source": "assumed (tokpo_kernels.kernels.chunking has no chunk_plan)",
                "plans": {f"{s}{'+ref' if r else ''}": dict(FALLBACK_PLAN)
                          for s in ("streaming", "chunked") for r in (False, True)}}
    plans = {}
    for s in chunking.STRATEGIES:
        for r in (False, True):
            if plan_fn is not None:
                cp = plan_fn(s, n, vocab, dim, in_bytes=in_bytes, has_ref=r)
                widths = {"forward": cp.forward, "sub": cp.sub, "window": cp.window}
            else:
                c = columns_fn(s, n, vocab, dim, in_bytes=in_bytes, has_ref=r)
                widths = {"forward": c, "sub": c, "window": c}
            plans[f"{s}{'+ref' if r else ''}"] = widths
    name = "chunk_plan" if plan_fn is not None else "chunk_columns"
    return {"source": f"tokpo_kernels.kernels.chunking.{name} (default budget)", "plans": plans}


def plan(n: int, dim: int, vocab: int, square: int = SQUARE) -> List[Dict[str, Any]]:
    """The GEMMs to time: name, m x n x k, the call, and which strategies use it; one entry per
    distinct shape."""
    specs = [{"name": f"square {square}^3 bf16->bf16", "m": square, "n": square, "k": square, "call": "mm",
              "out": "bf16", "used_by": "reference rate (the cost model's assumption)"},
             {"name": f"square {square}^3 bf16->fp32", "m": square, "n": square, "k": square, "call": "mm_fp32",
              "out": "fp32", "used_by": "reference rate, fp32 output"}]
    users: Dict[tuple, List[str]] = {}
    for label, w in chunk_widths(n, dim, vocab)["plans"].items():
        if label.startswith("chunked"):
            # The chunked strategy's fp32 logit chunks: forward chunks and the backward's recompute.
            users.setdefault(("logits", n, w["forward"], dim), []).append(f"{label} forward")
            users.setdefault(("logits", n, w["sub"], dim), []).append(f"{label} recompute")
        users.setdefault(("dw", w["sub"], dim, n), []).append(label)
        users.setdefault(("dh_addmm", n, dim, w["window"]), []).append(label)
    what = {"logits": ("logits", "z = h W_c^T"), "dw": ("dW", "dW_c = dz_c^T h"),
            "dh_addmm": ("dh", "acc += dz_w W_w in place")}
    for (call, m, nn, k), who in sorted(users.items()):
        short, formula = what[call]
        width = nn if call == "logits" else (m if call == "dw" else k)
        specs.append({"name": f"{short} C={width}", "m": m, "n": nn, "k": k, "call": call, "out": "fp32",
                      "used_by": f"{formula} ({', '.join(who)})"})
    return specs


def _operands(spec: Dict[str, Any], device: torch.device):
    """Tensors in the layouts the library uses, and the one-product callable."""
    m, n, k = spec["m"], spec["n"], spec["k"]
    bf = dict(dtype=torch.bfloat16, device=device)
    call = spec["call"]
    if call in ("mm", "mm_fp32"):
        a, b = torch.randn(m, k, **bf), torch.randn(k, n, **bf)
        if call == "mm":
            return lambda: torch.mm(a, b)
        return lambda: torch.mm(a, b, out_dtype=torch.float32)
    if call == "logits":  # h (N, D) times rows [0, C) of W (V, D), transposed: an NT product
        h, w_c = torch.randn(m, k, **bf), torch.randn(n, k, **bf)
        return lambda: torch.mm(h, w_c.t(), out_dtype=torch.float32)
    if call == "dw":  # dz_c (N, C) transposed times h (N, D): a TN product
        dz, h = torch.randn(k, m, **bf), torch.randn(k, n, **bf)
        return lambda: torch.mm(dz.t(), h, out_dtype=torch.float32)
    if call == "dh_addmm":  # acc (N, D) fp32 += dz_c (N, C) W_c (C, D)
        dz, w_c = torch.randn(m, k, **bf), torch.randn(k, n, **bf)
        acc = torch.zeros(m, n, dtype=torch.float32, device=device)
        return lambda: torch.addmm(acc, dz, w_c, out_dtype=torch.float32, out=acc)
    raise ValueError(f"unknown GEMM call {call!r}")


def _first_line(exc: BaseException) -> str:
    # PyTorch's dispatcher errors run to pages: their first sentence names the operator and backend.
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {text}"[:300]


def time_gemm(spec: Dict[str, Any], device: torch.device, reps: int = REPS) -> Dict[str, Any]:
    """Median [p20, p80] milliseconds and TFLOP/s (2mnk over the median) of one GEMM, or its error."""
    flops = 2.0 * spec["m"] * spec["n"] * spec["k"]
    out = {**spec, "flops": flops}
    try:
        fn = _operands(spec, device)
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for a, b in events:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize(device)
            ms = [a.elapsed_time(b) for a, b in events]
        else:
            ms = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # no out_dtype in this torch / on this device
        return {**out, "error": _first_line(exc)}
    q = torch.tensor(ms, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {**out, "ms": {"p20": q[0], "median": q[1], "p80": q[2], "samples": ms},
            "tflops": flops / (q[1] * 1e-3) / 1e12}


def addmm_check(device: torch.device, m: int = 4096, n: int = 4096, k: int = 1024, seed: int = 0) -> Dict[str, Any]:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (bf16 a, b; fp32 acc)
    accumulates into ``acc`` in place, in fp32: applied twice, compared with the float64 value
    ``acc0 + 2 a b``. ``passed`` when the result is ``acc`` itself and every element is within the
    a-priori bound ``2(k+1) · 2⁻²⁴ · (|acc0| + 2|a||b|)`` (``worst_error_over_bound`` ≤ 1). The error of
    the same update computed as ``acc0 + 2 (a.float() @ b.float())`` is given for comparison."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=torch.bfloat16)
    acc0 = torch.randn(m, n, generator=g).to(device) * 8.0  # an accumulator already holding earlier chunks
    a64, b64 = a.double(), b.double()
    exact = acc0.double() + 2.0 * (a64 @ b64)
    bound = 2 * (k + 1) * U32 * (acc0.double().abs() + 2.0 * (a64.abs() @ b64.abs()))
    res: Dict[str, Any] = {"shape": {"m": m, "n": n, "k": k}, "device": str(device)}
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the fp32 comparison route must not use TF32
    try:
        ref32 = acc0 + 2.0 * (a.float() @ b.float())
        res["fp32_route_max_abs_error"] = float((ref32.double() - exact).abs().max())
        acc = acc0.clone()
        ptr = acc.data_ptr()
        try:
            r1 = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            r2 = torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            return {**res, "supported": False, "passed": None, "error": _first_line(exc)}
    finally:
        torch.set_float32_matmul_precision(prec)
    err = (acc.double() - exact).abs()
    in_place = r1.data_ptr() == ptr and r2.data_ptr() == ptr and acc.dtype == torch.float32
    worst = float((err / bound).max())
    res.update(supported=True, in_place=in_place, max_abs_error=float(err.max()),
               max_rel_error=float(err.max() / exact.abs().max()), worst_error_over_bound=worst,
               passed=bool(in_place and worst <= 1.0))
    return res


def run(device: torch.device, n: int, dim: int, vocab: int, *, reps: int = REPS, warmup_s: float = WARMUP_S,
        square: int = SQUARE, check_shape: Sequence[int] = (4096, 4096, 1024)) -> Dict[str, Any]:
    """Every GEMM of ``plan`` timed on ``device``, then ``addmm_check``; the JSON document."""
    specs = plan(n, dim, vocab, square)
    if device.type == "cuda":
        a = torch.randn(square, square, dtype=torch.bfloat16, device=device)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warmup_s:
            torch.mm(a, a)
            torch.cuda.synchronize(device)
        del a
    doc: Dict[str, Any] = {
        "what": "bf16 GEMM rates (median of reps, random data) and the in-place fp32 addmm check",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "head": {"n": n, "dim": dim, "vocab": vocab}, "reps": reps, "warmup_s": warmup_s,
        "chunks": chunk_widths(n, dim, vocab),
        "gemms": [time_gemm(s, device, reps) for s in specs],
    }
    doc["addmm_check"] = addmm_check(device, *check_shape)
    return doc


def summary_lines(doc: Dict[str, Any]) -> List[str]:
    """The printed summary: one line per GEMM and one for the check."""
    lines = [f"GEMM rates on {doc['device']} (torch {doc['torch']}, CUDA {doc['cuda']}), median of {doc['reps']}:"]
    for g in doc["gemms"]:
        shape = f"{g['m']}x{g['n']}x{g['k']}"
        if "error" in g:
            lines.append(f"  {g['name']:<28} {shape:<18} not run: {g['error']}")
        else:
            lines.append(f"  {g['name']:<28} {shape:<18} {g['ms']['median']:8.3f} ms  {g['tflops']:7.1f} TFLOP/s"
                         f"  ({g['used_by']})")
    c = doc["addmm_check"]
    if not c.get("supported"):
        lines.append(f"addmm(out_dtype=float32, out=acc) check: not supported here: {c.get('error')}")
    else:
        lines.append(f"addmm(out_dtype=float32, out=acc) check vs float64: in place {c['in_place']}, max abs error "
                     f"{c['max_abs_error']:.3g} (rel {c['max_rel_error']:.3g}; fp32 route "
                     f"{c['fp32_route_max_abs_error']:.3g}), worst error / bound {c['worst_error_over_bound']:.3g}: "
                     + ("PASS" if c["passed"] else "FAIL"))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    from bench.__main__ import resolve_heads
    from bench.tiers import HEADS

    p = argparse.ArgumentParser(prog="python -m bench.gemm_rate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--head", default=next(iter(HEADS)), help=f"lm-head the chunk shapes are for ({', '.join(HEADS)})")
    p.add_argument("--n", type=int, default=16384, help="valid tokens N (default 16384)")
    p.add_argument("--reps", type=int, default=REPS, help=f"timed products per GEMM (default {REPS})")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--plan", action="store_true", help="print the GEMMs that would be timed and exit")
    args = p.parse_args(argv)
    try:
        (head,) = resolve_heads([args.head])
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    dim, vocab = HEADS[head]
    if args.plan:
        for s in plan(args.n, dim, vocab):
            shape = f"{s['m']}x{s['n']}x{s['k']}"
            print(f"{s['name']:<28} {shape:<18} {2e-12 * s['m'] * s['n'] * s['k']:7.3f} TFLOP  {s['used_by']}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print(f"no CUDA device ({device}): the GEMM rate is a GPU measurement (8192^3 in bf16 would take "
              "minutes here); --plan prints the shapes", file=sys.stderr)
        return 2
    doc = run(device, args.n, dim, vocab, reps=args.reps)
    doc["head"]["name"] = head
    print("\n".join(summary_lines(doc)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
