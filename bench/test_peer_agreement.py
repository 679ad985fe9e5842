"""Every implementation and peer that runs here computes the same quantity as the baseline impl.

A benchmark row is only a comparison if the rows compute the same thing: for every operation,
every registered implementation that can run on CPU (installed, not CUDA-only) is built on a
small fp32 case and its forward output and gradients (under the same fixed cotangents) are
compared with the operation's baseline (``impl="naive"``). Not a benchmark: runs under plain
``pytest bench/``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.registry import get_operation
from bench.tiers import OPS, tiny_cases


def _agreement_params():
    out = []
    for case in tiny_cases():
        # A few more rows than the probe's tiny shape: two pairs for the preference losses.
        shape = dataclasses.replace(case.shape, rows=case.shape.rows * 2)
        op = get_operation(case.op)
        for name, impl in op.impls.items():
            if name == op.baseline:
                continue
            skip = impl.missing() and f"not installed: {impl.missing()}" or impl.unavailable_on("cpu")
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            out.append(pytest.param(case.op, shape, name, id=f"{case.op}-{name}", marks=marks))
    return out


def _run(op_name, shape, impl):
    built = get_operation(op_name).impls[impl].build(shape, torch.float32, torch.device("cpu"))
    out = built.fwd()
    return built.summary(out), built.bwd(out)


@pytest.mark.parametrize("op_name,shape,impl", _agreement_params())
def test_impl_matches_naive(op_name, shape, impl):
    summary, grads = _run(op_name, shape, impl)
    ref_summary, ref_grads = _run(op_name, shape, get_operation(op_name).baseline)
    assert summary.keys() == ref_summary.keys()
    for key, value in summary.items():
        assert value == pytest.approx(ref_summary[key], rel=1e-5, abs=1e-6), f"{impl} {key}"
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=lambda m, i=i: f"{impl} gradient {i}: {m}")


def test_tdpo_reference_code_equals_tdpo_loss():
    """The issue-3 baseline written from the TDPO reference code gives tk.tdpo_loss's loss (named
    explicitly, because the acceptance ratio is only meaningful if it does)."""
    case = next(c for c in tiny_cases(["tdpo_loss"]))
    summary, _ = _run("tdpo_loss", case.shape, "tdpo_reference_code")
    ref, _ = _run("tdpo_loss", case.shape, "torch")
    assert summary["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_every_operation_has_a_case():
    assert [c.op for c in tiny_cases()] == list(OPS)
