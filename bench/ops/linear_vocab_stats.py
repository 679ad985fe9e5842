"""``tokpo_kernels.linear_vocab_stats``: the library's core op, forward + backward.

Two operations share this file:

* ``vocab_stats_kl``: with a reference model and ``kl=True`` (TDPO / TI-DPO / KL-regularised RL).
  Cotangents flow into ``logp``, ``lse`` and ``kl``. Model FLOPs (DESIGN.md "Performance model"):
  forward 4NDV (policy + reference logits), forward+backward 12NDV (+ recompute of p and q, ∂h, ∂W).
* ``vocab_stats``: no reference (CE / DPO / TLPO-style). Cotangents on ``logp`` and ``lse``.
  Forward 2NDV, forward+backward 8NDV.

N counts valid (non-ignored) tokens only. The naive impl does less arithmetic than the model
(it keeps the logits instead of recomputing them) but on all N tokens; TFLOP/s uses the one model
for every impl, so it reads as "model FLOPs per second", i.e. inverse time.
"""

from __future__ import annotations

import functools
from typing import Any, Dict

import torch

import tokpo_kernels as tk
from bench.inputs import IGNORE_INDEX, make_head_inputs, random_cotangents
from bench.registry import Built, Impl, Operation, Shape, Unavailable, register_operation
from tokpo_kernels._compat import triton_interpreter_enabled

IMPLS = ("naive", "torch", "triton")


def _flops(shape: Shape, *, reference: bool) -> Dict[str, float]:
    ndv = float(shape.valid_tokens) * shape.dim * shape.vocab
    if reference:
        return {"fwd": 4 * ndv, "fwd_bwd": 12 * ndv}
    return {"fwd": 2 * ndv, "fwd_bwd": 8 * ndv}


def _probe(impl: str, dtype: torch.dtype, device: torch.device, reference: bool) -> None:
    """Run the impl once on a tiny problem first, so an impl that cannot run here (no CUDA, a
    module not written yet, no interpreter) is reported in a second instead of after building
    full-size inputs."""
    shape = Shape(rows=1, seq=4, dim=8, vocab=16, ignored_prefix=1)
    try:
        built = _build_with(make_head_inputs(shape, dtype, device, reference=reference), impl, reference)
        built.fwd_bwd()
    except Exception as exc:  # any failure means "cannot run here"; the reason is the message
        raise Unavailable(f"{type(exc).__name__}: {exc}".strip()) from exc


def _build_with(inp, impl: str, reference: bool) -> Built:
    kwargs: Dict[str, Any] = dict(ignore_index=IGNORE_INDEX, impl=impl)
    if reference:
        kwargs.update(ref_hidden=inp.ref_hidden, ref_weight=inp.ref_weight, kl=True)
    n_out = 3 if reference else 2
    cot = random_cotangents(inp.targets, n_out)
    params = [inp.hidden, inp.weight]

    def fwd():
        s = tk.linear_vocab_stats(inp.hidden, inp.weight, inp.targets, **kwargs)
        return (s.logp, s.lse, s.kl)[:n_out] + (s.mask,)

    def bwd(out):
        return torch.autograd.grad(out[:n_out], params, cot)

    def summary(out) -> Dict[str, float]:
        mask = out[-1]
        res = {"mean_logp": float(out[0].detach()[mask].mean()), "mean_lse": float(out[1].detach()[mask].mean())}
        if reference:
            res["mean_kl"] = float(out[2].detach()[mask].mean())
        return res

    return Built(fwd=fwd, bwd=bwd, extra=dict(inp.extra), summary=summary)


def build(shape: Shape, dtype: torch.dtype, device: torch.device, *, impl: str, reference: bool) -> Built:
    if impl == "triton" and device.type != "cuda" and triton_interpreter_enabled():
        # The interpreter executes kernels op by op in NumPy to test them on CPU; at benchmark
        # sizes it would run for hours and its time says nothing about the kernels.
        raise Unavailable("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), a test tool; not timed")
    _probe(impl, dtype, device, reference)
    return _build_with(make_head_inputs(shape, dtype, device, reference=reference), impl, reference)


def _register(name: str, description: str, reference: bool) -> None:
    op = Operation(name=name, description=description, flops=functools.partial(_flops, reference=reference))
    for impl in IMPLS:
        op.impls[impl] = Impl(name=impl, build=functools.partial(build, impl=impl, reference=reference))
    register_operation(op)


_register(
    "vocab_stats_kl",
    "linear_vocab_stats with reference, kl=True; cotangents on logp, lse, kl (12NDV fwd+bwd)",
    reference=True,
)
_register(
    "vocab_stats",
    "linear_vocab_stats without reference; cotangents on logp, lse (8NDV fwd+bwd)",
    reference=False,
)
