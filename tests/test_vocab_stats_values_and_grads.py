"""Values and gradients of ``linear_vocab_stats`` against the independent float64 oracle.

Every registered implementation (``impl`` comes from the registry, tests/conftest.py) runs on the
same curated cases. Gradients are of
``Σ_s Σ cotangent_s · s`` over all differentiable statistics with random cotangents (also on ignored
entries, which must not leak), w.r.t. hidden, weight and bias. Triton runs on CUDA when present,
otherwise on CPU under ``TRITON_INTERPRET=1`` (set in conftest), so shapes stay tiny here:
N ≤ 24 tokens, V ≤ 70, D ≤ 40.

Tolerances (fp32): the implementations accumulate in fp32, whose rounding on these shapes gives
errors ~1e-6 (measured); we allow 1e-4 relative and absolute, i.e. ~100x headroom, as the contract
asks. Values scale with the logits, so the absolute value tolerance grows to 16 fp32 ulps of the
largest logit when logits are huge (|z| ~ 1e4 has ulp ~1e-3; nothing finer is representable).
Gradient tolerances are normwise: 1e-4 · max(1, max|expected|).
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

import tokpo_kernels as tk
from oracle import stats as O
from oracle.compare import assert_close, atol_scaled
from oracle.stats import Case, assert_stats_match
from tokpo_kernels.backends import unavailable_reason

F32_EPS = torch.finfo(torch.float32).eps



# --------------------------------------------------------------------------------------------
# Curated cases (tiny: they also run under the Triton interpreter)
# --------------------------------------------------------------------------------------------

FULL = dict(ref=True, kl=True, entropy=True)

CASES = [
    pytest.param(Case(token_shape=(13,), V=37, D=24, bias=True, ref_bias=True, **FULL), id="v37-bias-refbias-kl-ent"),
    pytest.param(Case(token_shape=(17,), V=67, D=16, entropy=True), id="v67-noref-ent"),
    pytest.param(Case(token_shape=(19,), V=67, D=20), id="v67-noref-plain"),
    pytest.param(Case(token_shape=(1,), V=37, D=8, ignore_frac=0.0, **FULL), id="n1"),
    pytest.param(Case(token_shape=(9,), V=23, D=1, D_ref=1, bias=True, **FULL), id="d1"),
    pytest.param(Case(token_shape=(6,), V=37, D=8, all_ignored=True, bias=True, ref_bias=True, **FULL),
                 id="all-ignored"),
    pytest.param(Case(token_shape=(2, 3), V=29, D=8, J=3, all_ignored=True, **FULL), id="all-ignored-multi-3d"),
    pytest.param(Case(token_shape=(11,), V=53, D=12, J=4, **FULL), id="multi-target-j4"),
    pytest.param(Case(token_shape=(3, 4), V=45, D=12, J=3, bias=True, **FULL), id="multi-target-3d"),
    pytest.param(Case(token_shape=(8,), V=19, D=8, J=5, duplicates=True, **FULL), id="multi-target-duplicate-ids"),
    pytest.param(Case(token_shape=(10,), V=37, D=8, J=1, **FULL), id="multi-target-j1"),
    pytest.param(Case(token_shape=(2, 7), V=45, D=16, **FULL), id="hidden-3d"),
    pytest.param(Case(token_shape=(12,), V=61, D=16, bias=True), id="bias-only"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, temperature=0.7, **FULL), id="temperature-0.7"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, temperature=2.5, bias=True, **FULL), id="temperature-2.5"),
    pytest.param(Case(token_shape=(12,), V=41, D=16, softcap=3.0, scale=6.0, ref_scale=6.0, **FULL), id="softcap"),
    pytest.param(Case(token_shape=(12,), V=41, D=16, softcap=4.0, temperature=0.6, scale=8.0, ref_scale=8.0,
                      bias=True, ref_bias=True, **FULL), id="softcap-temperature"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, ref=True), id="ref-no-kl-no-ent"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, ref=True, kl=True), id="kl-only"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, ref=True, entropy=True), id="ref-entropy-no-kl"),
    pytest.param(Case(token_shape=(14,), V=43, D=24, D_ref=40, **FULL), id="d-ref-larger"),
    pytest.param(Case(token_shape=(14,), V=43, D=40, D_ref=7, ref_bias=True, **FULL), id="d-ref-smaller"),
    pytest.param(Case(token_shape=(2, 6), V=37, D=16, J=3, bias=True, ref_bias=True, layout="transpose", **FULL),
                 id="noncontig-transpose"),
    pytest.param(Case(token_shape=(2, 6), V=37, D=16, bias=True, ref_bias=True, layout="slice", **FULL),
                 id="noncontig-slice"),
    pytest.param(Case(token_shape=(13,), V=37, D=16, layout="transpose", **FULL), id="noncontig-transpose-2d"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, ignore_index=-1, J=3, **FULL), id="ignore-index-minus1"),
    pytest.param(Case(token_shape=(12,), V=37, D=16, ignore_index=5, **FULL), id="ignore-index-in-vocab"),
    pytest.param(Case(token_shape=(24,), V=70, D=40, D_ref=33, scale=4.0, ref_scale=3.0, bias=True, **FULL),
                 id="largest-tiny"),
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def value_atol(zmax_transformed: float) -> float:
    """1e-4, or 16 fp32 ulps of the largest logit when that is larger (huge logits)."""
    return max(1e-4, 16 * F32_EPS * zmax_transformed)


def _transformed_max(raw_max: float, temperature: float, softcap: Optional[float]) -> float:
    z = raw_max if softcap is None else min(raw_max, softcap)
    return z / temperature


def run_impl(leaves, cot, prep, impl: str, device: str, dtype: torch.dtype, opts: Dict) -> O.Result:
    dev_leaves = O.cast_leaves(leaves, dtype, device)
    return O.values_and_grads(tk.linear_vocab_stats, dev_leaves, cot, prep=prep, impl=impl, **opts)


def build(case: Case, gen: torch.Generator):
    stored = O.store_leaves(O.make_leaves(case, gen), case.layout, gen)
    prep = O.make_prep(case.layout)
    cot = O.make_cotangents(prep(stored)["targets"], case.token_shape, gen)
    return stored, prep, cot


def check_structure(res: O.Result, leaves, prep, opts: Dict, out_dtype: torch.dtype) -> None:
    """Presence, shapes, dtypes, finiteness and exact zeros on ignored entries."""
    logical = prep(leaves)
    targets = logical["targets"].cpu()
    token_shape = tuple(logical["hidden"].shape[:-1])
    v = res.values
    has_ref = logical["ref_hidden"] is not None
    assert (v["ref_logp"] is not None) == has_ref
    assert (v["kl"] is not None) == bool(opts.get("kl"))
    assert (v["entropy"] is not None) == bool(opts.get("entropy"))
    got_shape = tuple(v["logp"].shape)
    assert got_shape == targets.shape, f"logp: expected shape {tuple(targets.shape)}, got {got_shape}"
    assert v["mask"].dtype == torch.bool and v["mask"].shape == token_shape
    tvalid = targets != opts["ignore_index"]
    multi = targets.dim() == len(token_shape) + 1
    row_valid = tvalid.any(-1) if multi else tvalid
    assert torch.equal(v["mask"].cpu(), row_valid), "mask: expected 'token has >= 1 non-ignored target'"
    for name in ("logp", "lse", "ref_logp", "kl", "entropy"):
        t = v[name]
        if t is None:
            continue
        assert t.dtype == out_dtype, f"{name}: expected dtype {out_dtype}, got {t.dtype}"
        assert torch.isfinite(t).all(), f"{name}: non-finite values {t}"
        t = t.cpu()
        if name in ("logp", "ref_logp"):
            assert t.shape == targets.shape
            assert (t[~tvalid] == 0).all(), f"{name}: ignored targets must be exactly 0"
        else:
            assert t.shape == token_shape, f"{name}: expected shape {token_shape}, got {tuple(t.shape)}"
            assert (t[~row_valid] == 0).all(), f"{name}: fully ignored tokens must be exactly 0"
    if v["kl"] is not None:
        assert (v["kl"] >= 0).all(), f"kl: expected >= 0 (clamped), got min {v['kl'].min().item()}"
    for k, g in res.grads.items():
        if g is None:
            continue
        assert g.dtype == res.leaves[k].dtype, f"grad {k}: expected dtype {res.leaves[k].dtype}, got {g.dtype}"
        assert torch.isfinite(g).all(), f"grad {k}: non-finite values"
    g_hidden = prep({"hidden": res.grads["hidden"]})["hidden"].cpu()
    assert (g_hidden[~row_valid] == 0).all(), "grad hidden: rows of fully ignored tokens must be exactly 0"


def rel_err(a: Optional[torch.Tensor], e: Optional[torch.Tensor]) -> float:
    """max |a − e| / max(1, max |e|) (normwise)."""
    if e is None or e.numel() == 0:
        return 0.0
    return ((a.cpu().double() - e).abs().max() / max(1.0, e.abs().max().item())).item()


# --------------------------------------------------------------------------------------------
# fp32 values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fp32_values_and_grads(case: Case, impl: str, device: str, gen: torch.Generator) -> None:
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, impl, device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    zmax = _transformed_max(O.max_abs_logit(res.leaves, prep), case.temperature, case.softcap)
    assert_stats_match(res, ref, vatol=value_atol(zmax))
    if case.all_ignored:
        for name in ("logp", "lse", "ref_logp", "kl", "entropy"):
            assert (res.values[name] == 0).all(), f"{name}: all tokens ignored, expected all zeros"
        for name, g in res.grads.items():
            assert g is None or (g == 0).all(), f"grad {name}: all tokens ignored, expected zeros"
        assert not res.values["mask"].any()


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("case", [
    pytest.param(Case(token_shape=(13,), V=37, D=24, bias=True, ref_bias=True, **FULL), id="v37-full"),
    pytest.param(Case(token_shape=(3, 4), V=45, D=12, J=3, softcap=3.0, temperature=0.8, scale=6.0, **FULL),
                 id="multi-softcap-temperature"),
    pytest.param(Case(token_shape=(9,), V=23, D=1, D_ref=5, layout="slice", **FULL), id="d1-slice"),
])
def test_fp64_inputs_match_oracle_tightly(case: Case, impl: str, gen: torch.Generator) -> None:
    """float64 inputs keep float64 (oracle precision): any formula slip shows far below fp32 noise."""
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, impl, "cpu", torch.float64, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float64)
    assert_stats_match(res, ref, vatol=1e-10, vrtol=1e-10, grtol=1e-10, gatol=1e-10)


# --------------------------------------------------------------------------------------------
# Numerical hazards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(temperature=3.0), id="temperature"),
    pytest.param(dict(softcap=50.0), id="softcap-saturated"),
])
def test_huge_logits_stay_finite_and_correct(impl: str, variant: Dict, device: str, gen: torch.Generator) -> None:
    """|z| ~ 1e4 with gaps > 100 between sorted logits: every non-top probability underflows."""
    leaves = O.make_huge_logit_leaves(gen)
    raw = leaves["hidden"] @ leaves["weight"].t()
    top2 = raw.topk(2, dim=-1).values
    assert raw.abs().max() > 5e3 and (top2[:, 0] - top2[:, 1]).min() > 100  # the construction holds
    opts = dict(kl=True, entropy=True, ignore_index=-100, temperature=1.0, softcap=None)
    opts.update(variant)
    cot = O.make_cotangents(leaves["targets"], (leaves["hidden"].shape[0],), gen)
    res = run_impl(leaves, cot, None, impl, device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, **opts)
    check_structure(res, leaves, lambda d: d, opts, torch.float32)
    zmax = _transformed_max(O.max_abs_logit(res.leaves), opts["temperature"], opts["softcap"])
    assert_stats_match(res, ref, vatol=value_atol(zmax))


@pytest.mark.parametrize("case", [
    # Reference logits with std 1000: q has entries below fp32's smallest denormal (and below fp64's
    # for the most negative ones); a log(softmax) KL would be NaN here.
    pytest.param(Case(token_shape=(12,), V=37, D=16, ref_scale=1000.0, bias=True, ref_bias=True, **FULL),
                 id="reference-underflows"),
    # Policy logits with std 1000 and a smooth reference: p underflows where q has mass, KL ~ 1e3.
    pytest.param(Case(token_shape=(12,), V=37, D=16, scale=1000.0, **FULL), id="policy-underflows"),
    pytest.param(Case(token_shape=(4, 3), V=37, D=16, J=2, ref_scale=1000.0, temperature=0.5, **FULL),
                 id="reference-underflows-multi-temperature"),
])
def test_underflowing_probabilities_keep_kl_finite(case: Case, impl: str, device: str,
                                                   gen: torch.Generator) -> None:
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    logical = prep(O.to_oracle(stored))
    big_h, big_w = ("ref_hidden", "ref_weight") if case.ref_scale > case.scale else ("hidden", "weight")
    zr = logical[big_h] @ logical[big_w].t() / case.temperature
    spread = (zr.max(-1).values - zr.min(-1).values).min().item()
    assert spread > 110, "construction: some probability must underflow to 0 in fp32"
    res = run_impl(stored, cot, prep, impl, device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    zmax = _transformed_max(O.max_abs_logit(res.leaves, prep), case.temperature, case.softcap)
    assert_stats_match(res, ref, vatol=value_atol(zmax))


@pytest.mark.parametrize("mode", [
    pytest.param("same-tensors", id="same-tensors"),
    # The same logits computed through a different matmul (reference D padded with zero columns and
    # permuted): rounding differs, so the unclamped streaming KL can come out slightly negative.
    pytest.param("same-math", id="same-math-other-rounding"),
    pytest.param("same-math-temperature-softcap", id="same-math-temperature-softcap"),
])
def test_reference_equal_to_policy_gives_zero_kl(impl: str, mode: str, device: str, gen: torch.Generator) -> None:
    n, V, D = 24, 37, 16
    h = torch.randn(n, D, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(V, D, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    targets = O.random_targets((n,), V, gen)
    opts = dict(kl=True, entropy=True, ignore_index=-100, temperature=1.0, softcap=None)
    if mode == "same-tensors":
        rh, rw = h.clone(), w.clone()
    else:
        perm = torch.randperm(D + 5, generator=gen)
        rh = torch.cat([h, torch.zeros(n, 5, dtype=torch.float64)], 1)[:, perm].contiguous()
        rw = torch.cat([w, torch.zeros(V, 5, dtype=torch.float64)], 1)[:, perm].contiguous()
        if mode == "same-math-temperature-softcap":
            opts.update(temperature=0.3, softcap=20.0)
    leaves = dict.fromkeys(O.LEAF_NAMES)
    leaves.update(hidden=h, weight=w, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=b.clone(), targets=targets)
    cot = O.make_cotangents(targets, (n,), gen)
    res = run_impl(leaves, cot, None, impl, device, torch.float32, opts)
    kl = res.values["kl"]
    assert (kl >= 0).all(), f"kl: expected >= 0 exactly when reference == policy, got min {kl.min().item():.3e}"
    assert kl.max().item() <= 1e-5, f"kl: expected ~0 when reference == policy, got max {kl.max().item():.3e}"
    assert_close(res.values["ref_logp"], res.values["logp"], rtol=1e-5, atol=1e-5, name="ref_logp vs logp")
    ref = O.oracle_result(res.leaves, cot, **opts)
    check_structure(res, leaves, lambda d: d, opts, torch.float32)
    assert_stats_match(res, ref, vatol=1e-4)


# --------------------------------------------------------------------------------------------
# Low precision: three-way oracle
# --------------------------------------------------------------------------------------------

# Per-dtype slack on the normwise error: the unit roundoff u = eps/2 of the input dtype, i.e. what one
# final rounding of a gradient to that dtype may cost (2^-8 for bf16, 2^-11 for fp16).
SLACK = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

LOWP_CASES = [
    pytest.param(Case(token_shape=(13,), V=37, D=24, bias=True, ref_bias=True, **FULL), torch.bfloat16,
                 id="bf16-v37-full"),
    pytest.param(Case(token_shape=(3, 4), V=45, D=16, J=3, **FULL), torch.bfloat16, id="bf16-multi-3d"),
    pytest.param(Case(token_shape=(12,), V=41, D=16, softcap=4.0, temperature=0.7, scale=6.0, ref_scale=6.0,
                      D_ref=24, layout="slice", **FULL), torch.bfloat16, id="bf16-softcap-temp-dref-slice"),
    pytest.param(Case(token_shape=(12,), V=67, D=16, entropy=True), torch.bfloat16, id="bf16-noref"),
    pytest.param(Case(token_shape=(13,), V=37, D=24, bias=True, **FULL), torch.float16, id="fp16-v37-full"),
]


@pytest.mark.impls("fused")
@pytest.mark.parametrize("case,dtype", LOWP_CASES)
def test_low_precision_three_way(case: Case, dtype: torch.dtype, impl: str, device: str,
                                 gen: torch.Generator) -> None:
    """err(impl in dtype vs fp64) <= err(naive in dtype vs fp64) + slack, for values and grads.

    The fp64 oracle sees exactly the rounded low-precision inputs; outputs must be fp32.
    """
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, impl, device, dtype, opts)
    base = run_impl(stored, cot, prep, "naive", device, dtype, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    slack = SLACK[dtype]
    for name in ("logp", "lse", "ref_logp", "kl", "entropy"):
        e_impl = rel_err(res.values[name], ref.values[name])
        e_base = rel_err(base.values[name], ref.values[name])
        assert e_impl <= e_base + slack, f"{name}: err {e_impl:.3e} > naive {dtype} err {e_base:.3e} + {slack:.1e}"
    for name in O.GRAD_NAMES:
        if ref.grads[name] is None:
            continue
        e_impl = rel_err(res.grads[name], ref.grads[name])
        e_base = rel_err(base.grads[name], ref.grads[name])
        assert e_impl <= e_base + slack, (
            f"grad {name}: err {e_impl:.3e} > naive {dtype} err {e_base:.3e} + {slack:.1e}"
        )


# --------------------------------------------------------------------------------------------
# Dispatch and gradient isolation of the reference
# --------------------------------------------------------------------------------------------


def test_auto_picks_the_cpu_default(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """``"auto"`` on CPU runs the C++ backend when it is built here, else the chunked PyTorch one,
    and gives exactly what that backend gives when named."""
    expected = "cpp" if unavailable_reason("cpp", "cpu") is None else "torch"
    case = Case(token_shape=(2, 5), V=37, D=16, J=2, bias=True, **FULL)
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    import tokpo_kernels.ops.vocab_stats as vs

    seen = []
    real_backend = vs._backend

    def spy(impl):
        seen.append(impl)
        return real_backend(impl)

    monkeypatch.setattr(vs, "_backend", spy)
    auto = run_impl(stored, cot, prep, "auto", "cpu", torch.float32, opts)
    assert seen and set(seen) == {expected}, f"impl='auto' on CPU: expected the {expected} backend, got {seen}"
    named_res = run_impl(stored, cot, prep, expected, "cpu", torch.float32, opts)
    for name, v in auto.values.items():
        assert (v is None) == (named_res.values[name] is None)
        if v is not None:
            assert torch.equal(v, named_res.values[name]), f"{name}: auto differs from {expected}"
    for name, g in auto.grads.items():
        if g is not None:
            assert torch.equal(g, named_res.grads[name]), f"grad {name}: auto differs from {expected}"


def test_reference_receives_no_gradient(impl: str, device: str, gen: torch.Generator) -> None:
    case = Case(token_shape=(10,), V=37, D=16, D_ref=12, bias=True, ref_bias=True, **FULL)
    leaves = O.cast_leaves(O.make_leaves(case, gen), torch.float32, device)
    for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias"):
        leaves[k].requires_grad_(True)
    st = tk.linear_vocab_stats(leaves["hidden"], leaves["weight"], leaves["targets"], bias=leaves["bias"],
                               ref_hidden=leaves["ref_hidden"], ref_weight=leaves["ref_weight"],
                               ref_bias=leaves["ref_bias"], impl=impl, **case.opts())
    assert not st.ref_logp.requires_grad, "ref_logp: expected no grad"
    cot = O.make_cotangents(leaves["targets"], case.token_shape, gen)
    loss = sum((cot[s].to(device=device, dtype=torch.float32) * getattr(st, s)).sum() for s in O.DIFF_STATS)
    loss = loss + st.ref_logp.sum()  # a constant: must not route gradient to the reference
    loss.backward()
    for k in ("ref_hidden", "ref_weight", "ref_bias"):
        g = leaves[k].grad
        assert g is None or (g == 0).all(), f"{k}: the reference must receive no gradient, got {g}"
    for k in ("hidden", "weight", "bias"):
        assert leaves[k].grad is not None and leaves[k].grad.abs().sum() > 0, f"{k}: expected a gradient"


def test_partial_requires_grad_and_unused_stats(impl: str, device: str, gen: torch.Generator) -> None:
    """Only weight requires grad and only lse is used: the gradient still matches the oracle."""
    case = Case(token_shape=(9,), V=37, D=8, **FULL)
    stored = O.make_leaves(case, gen)
    cot = O.make_cotangents(stored["targets"], case.token_shape, gen)
    cot = {k: (v if k == "lse" else torch.zeros_like(v)) for k, v in cot.items()}
    leaves = O.cast_leaves(stored, torch.float32, device)
    res = O.values_and_grads(tk.linear_vocab_stats, leaves, cot, grad_names=("weight",), impl=impl, **case.opts())
    ref = O.values_and_grads(O.oracle_vocab_stats, O.to_oracle(leaves), cot, grad_names=("weight",), **case.opts())
    assert leaves["hidden"].grad is None
    g, e = res.grads["weight"], ref.grads["weight"]
    assert_close(g, e, rtol=1e-4, atol=atol_scaled(1e-4, e), name="grad weight")


# --------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): real tile counts, V not a multiple of any block
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.impls("fused")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_realistic_shapes(impl: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    case = Case(token_shape=(4, 65), V=32003, D=256, D_ref=192, J=2, bias=True, ref_bias=True,
                scale=4.0, ref_scale=4.0, ignore_frac=0.4, **FULL)
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, impl, "cuda", dtype, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    if dtype == torch.float32:
        assert_stats_match(res, ref, vatol=1e-4)
        return
    base = run_impl(stored, cot, prep, "naive", "cuda", dtype, opts)
    for name in ("logp", "lse", "ref_logp", "kl", "entropy"):
        e_base = rel_err(base.values[name], ref.values[name])
        assert rel_err(res.values[name], ref.values[name]) <= e_base + SLACK[dtype]
    for name in O.GRAD_NAMES:
        assert rel_err(res.grads[name], ref.grads[name]) <= rel_err(base.grads[name], ref.grads[name]) + SLACK[dtype]


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokpo_kernels.ops.vocab_stats as vs

    seen = []
    real_backend = vs._backend
    monkeypatch.setattr(vs, "_backend", lambda impl: (seen.append(impl), real_backend(impl))[1])
    case = Case(token_shape=(8,), V=37, D=16, **FULL)
    stored, prep, cot = build(case, gen)
    run_impl(stored, cot, prep, "auto", "cuda", torch.float32, case.opts())
    assert seen and set(seen) == {"triton"}, f"impl='auto' on CUDA: expected triton, got {seen}"


@pytest.mark.parametrize("token_shape,J", [pytest.param((0,), None, id="n0"), pytest.param((2, 0), 3, id="b2-t0-j3")])
def test_empty_token_batch(impl: str, token_shape, J, device: str, gen: torch.Generator) -> None:
    """No tokens at all: empty outputs of the right shapes, empty (not NaN) gradients."""
    case = Case(token_shape=token_shape, V=37, D=8, J=J, bias=True, **FULL)
    leaves = O.cast_leaves(O.make_leaves(case, gen), torch.float32, device)
    cot = O.make_cotangents(leaves["targets"], token_shape, gen)
    res = O.values_and_grads(tk.linear_vocab_stats, leaves, cot, impl=impl, **case.opts())
    check_structure(res, leaves, lambda d: d, case.opts(), torch.float32)
    assert res.values["lse"].shape == token_shape
    assert res.grads["hidden"].shape == leaves["hidden"].shape
    assert (res.grads["weight"] == 0).all() and (res.grads["bias"] == 0).all()


# --------------------------------------------------------------------------------------------
# Triton forward split over the vocabulary (the default on a GPU when rows are few)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("case", [
    pytest.param(Case(token_shape=(2, 7), V=101, D=20, bias=True, ref_bias=True, **FULL), id="v101-full"),
    pytest.param(Case(token_shape=(9,), V=70, D=16, J=3, softcap=4.0, temperature=0.7, scale=8.0, **FULL),
                 id="multi-softcap-peaked"),
])
def test_triton_split_vocabulary_merge(case: Case, splits: int, device: str, gen: torch.Generator,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-split max / sum-exp / entropy / KL accumulators re-based on the global maxima must give
    the single-pass statistics: forced splits exercise the split merge
    (``partials.merge_local_stats``) under the interpreter."""
    monkeypatch.setenv("TOKPO_FORWARD_SPLITS", str(splits))
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, "triton", device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    zmax = _transformed_max(O.max_abs_logit(res.leaves, prep), case.temperature, case.softcap)
    assert_stats_match(res, ref, vatol=value_atol(zmax))


@pytest.mark.parametrize("splits", [2, 4])
def test_triton_split_vocabulary_merge_huge_logits(splits: int, device: str, gen: torch.Generator,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits whose maxima differ by thousands: the re-basing terms (M − m_s) are huge there."""
    monkeypatch.setenv("TOKPO_FORWARD_SPLITS", str(splits))
    leaves = O.make_huge_logit_leaves(gen)
    opts = dict(kl=True, entropy=True, ignore_index=-100, temperature=1.0, softcap=None)
    cot = O.make_cotangents(leaves["targets"], (leaves["hidden"].shape[0],), gen)
    res = run_impl(leaves, cot, None, "triton", device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, **opts)
    zmax = _transformed_max(O.max_abs_logit(res.leaves), 1.0, None)
    assert_stats_match(res, ref, vatol=value_atol(zmax))


def test_triton_split_vocabulary_merge_with_an_empty_split(device: str, gen: torch.Generator,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """V = 100 in 3 splits of whole 32-column tiles: 64 + 36 + 0 columns; the empty split must get
    weight 0 in the merge (its m = -inf, s = 0) instead of producing NaN."""
    monkeypatch.setenv("TOKPO_FORWARD_SPLITS", "3")
    case = Case(token_shape=(2, 5), V=100, D=12, bias=True, **FULL)
    stored, prep, cot = build(case, gen)
    opts = case.opts()
    res = run_impl(stored, cot, prep, "triton", device, torch.float32, opts)
    ref = O.oracle_result(res.leaves, cot, prep=prep, **opts)
    check_structure(res, stored, prep, opts, torch.float32)
    assert_stats_match(res, ref, vatol=1e-4)
