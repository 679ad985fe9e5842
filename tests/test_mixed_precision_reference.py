"""A policy and a reference in different dtypes (issue 13, item 1), on every backend.

A frozen reference kept in bf16 (or fp16) beside an fp32 policy is the usual memory-saving set-up,
and the opposite order (a bf16 policy beside an fp32 reference) occurs too. Each model's logits must
come from its own inputs in its own dtype, the statistics in fp32. Under the Triton interpreter the
reference side used to be read through the policy's dtype flags and gave garbage (``ref_logp`` of
0 or -4e9 where the answer is -3.8).

Tolerances. The float64 oracle sees exactly the rounded inputs, so every error is the backend's own
arithmetic. The low-precision side sets the scale: ``u`` is its unit roundoff (2^-8 bf16, 2^-11
fp16), the same slack as the single-dtype three-way test of tests/test_vocab_stats_values_and_grads.py.

* Three-way: for values and gradients, err(impl) <= err(impl="naive" in the same dtypes) + u
  (naive materialises the logits with the matmul in each input dtype, as the models do).
* Absolute, so that the baseline itself cannot be wrong unnoticed (the three-way test is vacuous for
  naive): normwise err <= 2·u·L with L = max(1, max |logit|) of both models. First-order reason: every
  raw logit is rounded at most once to the low dtype (relative u, so absolute <= u·L) on top of
  fp32 accumulation (~1e-6); logp, ref_logp and lse move by at most twice the largest logit
  perturbation (lse is 1-Lipschitz in the max norm), KL, entropy and the gradients (p- and
  q-weighted averages of such perturbations, plus one final rounding of a low-precision gradient,
  u) by the same order. Measured on these cases, every backend: <= 0.2·u·L (10x headroom); the bug
  gives normwise errors of order 1 to 1e9.
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

import tokpo_kernels as tk
from oracle import stats as O
from oracle.stats import Case

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
U = {BF16: 2.0 ** -8, F16: 2.0 ** -11}

POLICY_LEAVES = ("hidden", "weight", "bias")
REF_LEAVES = ("ref_hidden", "ref_weight", "ref_bias")

ORDERS = [
    pytest.param(F32, BF16, id="policy-fp32-ref-bf16"),
    pytest.param(F32, F16, id="policy-fp32-ref-fp16"),
    pytest.param(BF16, F32, id="policy-bf16-ref-fp32"),
    pytest.param(F16, F32, id="policy-fp16-ref-fp32"),
]

FULL = dict(ref=True, kl=True, entropy=True)
CASES = [
    # The reproducer: one token, D = 1, V = 2.
    pytest.param(Case(token_shape=(1,), V=2, D=1, ignore_frac=0.0, **FULL), id="n1-d1-v2"),
    pytest.param(Case(token_shape=(13,), V=37, D=24, D_ref=16, bias=True, ref_bias=True, **FULL),
                 id="v37-bias-refbias-dref16"),
    pytest.param(Case(token_shape=(3, 4), V=45, D=12, D_ref=20, J=3, softcap=4.0, temperature=0.7, scale=6.0,
                      ref_scale=6.0, ref_bias=True, layout="slice", **FULL), id="multi-softcap-temp-slice"),
]


def _cast(stored: Dict[str, Optional[torch.Tensor]], policy: torch.dtype, ref: torch.dtype,
          device: str) -> Dict[str, Optional[torch.Tensor]]:
    """Policy leaves in ``policy``, reference leaves in ``ref`` (fresh leaf tensors on ``device``)."""
    out = O.cast_leaves({k: v for k, v in stored.items() if k not in REF_LEAVES}, policy, device)
    out.update(O.cast_leaves({k: stored[k] for k in REF_LEAVES}, ref, device))
    return out


def _run(stored, cot, prep, impl: str, device: str, policy: torch.dtype, ref: torch.dtype, opts) -> O.Result:
    return O.values_and_grads(tk.linear_vocab_stats, _cast(stored, policy, ref, device), cot, prep=prep,
                              impl=impl, **opts)


def _rel_err(a: Optional[torch.Tensor], e: Optional[torch.Tensor]) -> float:
    """max |a − e| / max(1, max |e|) (normwise)."""
    if e is None or e.numel() == 0:
        return 0.0
    return ((a.detach().cpu().double() - e).abs().max() / max(1.0, e.abs().max().item())).item()


@pytest.mark.parametrize("policy,ref", ORDERS)
@pytest.mark.parametrize("case", CASES)
def test_mixed_precision_reference_matches_float64(case: Case, policy: torch.dtype, ref: torch.dtype, impl: str,
                                                   impl_device: str, gen: torch.Generator) -> None:
    stored = O.store_leaves(O.make_leaves(case, gen), case.layout, gen)
    prep = O.make_prep(case.layout)
    cot = O.make_cotangents(prep(stored)["targets"], case.token_shape, gen)  # random, KL's included
    opts = case.opts()
    res = _run(stored, cot, prep, impl, impl_device, policy, ref, opts)
    ref_res = O.oracle_result(res.leaves, cot, prep=prep, **opts)

    # Structure: fp32 statistics, gradients in the policy's dtype, nothing for the reference.
    for name in O.ALL_STATS:
        t = res.values[name]
        assert t is not None and t.dtype == F32, f"{name}: expected an fp32 tensor, got {t if t is None else t.dtype}"
        assert torch.isfinite(t).all(), f"{name}: non-finite values {t}"
    for name in O.GRAD_NAMES:
        g = res.grads[name]
        if g is not None:
            assert g.dtype == policy, f"grad {name}: expected dtype {policy}, got {g.dtype}"
    for name in REF_LEAVES:
        leaf = res.leaves[name]
        assert leaf is None or leaf.grad is None, f"{name}: the reference must receive no gradient"

    u = U[ref if policy == F32 else policy]
    scale = max(1.0, O.max_abs_logit(res.leaves, prep))
    base = _run(stored, cot, prep, "naive", impl_device, policy, ref, opts) if impl != "naive" else res
    checks = [(name, res.values[name], base.values[name], ref_res.values[name]) for name in O.ALL_STATS]
    checks += [(f"grad {name}", res.grads[name], base.grads[name], ref_res.grads[name])
               for name in O.GRAD_NAMES if ref_res.grads[name] is not None]
    for label, got, baseline, expected in checks:
        err, err_base = _rel_err(got, expected), _rel_err(baseline, expected)
        assert err <= err_base + u, f"{label}: err {err:.3e} > naive err {err_base:.3e} + u {u:.1e}"
        assert err <= 2 * u * scale, f"{label}: err {err:.3e} > 2·u·L = {2 * u * scale:.3e}"
