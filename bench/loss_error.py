"""``python -m bench.loss_error``: how far each implementation's TDPO loss is from float64.

On the TDPO acceptance case (``bench.tiers.TDPO_ACCEPTANCE``: 4 × 512 tokens, 64 ignored per row,
D = 256, V = 32000) with inputs rounded to ``--dtype`` (bf16 by default), each implementation's loss
is compared with the same loss computed here in float64 from full logits of exactly those rounded
inputs — written from the TDPO2 equations (docs/methods.md §2), independent of the library. The
error is then the implementation's own arithmetic (e.g. rounding the logits to bf16 in a bf16
matmul), not the rounding of its inputs.

    python -m bench.loss_error                     # bf16: cpp, torch, naive
    python -m bench.loss_error --dtype fp16 --impls cpp,naive --json PATH
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import tokpo_kernels as tk
from bench.inputs import IGNORE_INDEX, make_head_inputs
from bench.ops import tdpo_loss as op
from bench.registry import DTYPES
from bench.tiers import TDPO_ACCEPTANCE


def tdpo2_float64(hidden, weight, labels, ref_hidden, ref_weight, *, beta: float, alpha: float) -> float:
    """The TDPO2 loss in float64 from full logits; rows stack [chosen; rejected]."""
    h, w, rh, rw = (t.detach().double() for t in (hidden, weight, ref_hidden, ref_weight))
    logp = (h @ w.t()).log_softmax(-1)
    ref_logp = (rh @ rw.t()).log_softmax(-1)
    mask = labels != IGNORE_INDEX
    index = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    margin = ((logp.gather(-1, index) - ref_logp.gather(-1, index)).squeeze(-1) * mask).sum(-1)
    kl = ((ref_logp.exp() * (ref_logp - logp)).sum(-1) * mask).sum(-1)
    pairs = h.shape[0] // 2
    delta = (margin[:pairs] - margin[pairs:]) - alpha * (kl[pairs:] - kl[:pairs])
    return float(-F.logsigmoid(beta * delta).mean())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loss_error", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default: bf16)")
    p.add_argument("--impls", default="cpp,torch,naive", help="comma list of impl= values (default: cpp,torch,naive)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    shape = TDPO_ACCEPTANCE.shape
    inp = make_head_inputs(shape, DTYPES[args.dtype], torch.device("cpu"), reference=True)
    tensors = (inp.hidden, inp.weight, inp.targets, inp.ref_hidden, inp.ref_weight)
    exact = tdpo2_float64(*tensors, beta=op.BETA, alpha=op.ALPHA)
    rows: Dict[str, Dict[str, float]] = {}
    print(f"TDPO2 loss, {shape.describe()}, {args.dtype} inputs; "
          f"float64 loss of the same inputs: {exact:.10f}")
    print("| impl | loss | abs. error vs float64 | forward s |")
    print("|---|---:|---:|---:|")
    for impl in args.impls.split(","):
        start = time.perf_counter()
        with torch.no_grad():
            loss = tk.tdpo_loss(*tensors, beta=op.BETA, alpha=op.ALPHA, variant=op.VARIANT,
                                ignore_index=IGNORE_INDEX, impl=impl).loss
        seconds = time.perf_counter() - start
        err = abs(float(loss) - exact)
        rows[impl] = {"loss": float(loss), "abs_error": err, "forward_s": seconds}
        print(f"| {impl} | {float(loss):.10f} | {err:.3e} | {seconds:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"case": TDPO_ACCEPTANCE.key,
                       "dtype": args.dtype, "float64_loss": exact, "impls": rows,
                       "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
