"""TLPO loss and advantages against the independent float64 oracle (tests/oracle/policy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from oracle import policy as po
from oracle.compare import assert_close, atol_normwise
from oracle.logits import log_softmax64, logits64
from oracle.policy import float32_kwargs
from tokpo_kernels.backends import backend_names
from tokpo_kernels.losses.tlpo import tlpo_advantages, tlpo_loss

IGN = -100


def make_batch(g=5, k=4, v=37, d=11, pad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(g, d, generator=gen, dtype=torch.float64) * 0.8
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.5
    cand = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(g)])
    if pad:
        cand[1, k - 1] = IGN
        cand[2, 1:] = IGN
        cand[g - 1, :] = IGN  # a group with no candidate at all
    probs = torch.rand(g, k, generator=gen, dtype=torch.float64)
    rewards = (torch.rand(g, k, generator=gen) < 0.5).double() * 2 - 1
    if k > 1:
        rewards[0, 0], rewards[0, 1] = 1.0, -1.0  # at least one group with varied rewards
    adv = po.tlpo_advantages(probs, rewards, cand != IGN)
    ref_h = h + 0.3 * torch.randn(g, d, generator=gen, dtype=torch.float64)
    ref_w = w + 0.1 * torch.randn(v, d, generator=gen, dtype=torch.float64)
    return dict(h=h, w=w, cand=cand, adv=adv, ref_h=ref_h, ref_w=ref_w, gen=gen)


def _old_logp(b, bias=None, temperature=1.0, softcap=None, spread=0.5):
    """Current candidate log-probs plus noise, so that a fraction of the ratios leaves [0.8, 1.2]."""
    lp = log_softmax64(logits64(b["h"], b["w"], bias, temperature=temperature, softcap=softcap))
    safe = b["cand"].clamp_min(0)
    cur = lp.gather(-1, safe)
    noise = (torch.rand(cur.shape, generator=b["gen"], dtype=torch.float64) * 2 - 1) * spread
    old = cur + noise
    return torch.where(b["cand"] != IGN, old, torch.full_like(old, float("nan")))  # NaN padding must not leak


CASES = ["ref_model", "ref_logp_old", "bias_temp_softcap", "no_kl", "advantage_sign_clip"]


def _setup(case, b):
    kw, okw = {}, {}
    v = b["w"].shape[0]
    adv = b["adv"]
    if case == "ref_model":
        kw.update(ref_hidden=b["ref_h"], ref_weight=b["ref_w"])
        okw.update(ref_h=b["ref_h"], ref_w=b["ref_w"])
    elif case == "ref_logp_old":
        ref_all = log_softmax64(logits64(b["ref_h"], b["ref_w"]))
        ref_lp = ref_all.gather(-1, b["cand"].clamp_min(0))
        ref_lp = torch.where(b["cand"] != IGN, ref_lp, torch.full_like(ref_lp, float("nan")))
        old = _old_logp(b)
        kw.update(ref_logp=ref_lp, old_logp=old, eps_low=0.2, eps_high=0.28, kl_beta=0.1)
        okw.update(ref_logp=ref_lp, old_logp=old, eps_low=0.2, eps_high=0.28, kl_beta=0.1)
    elif case == "bias_temp_softcap":
        bias = torch.randn(v, generator=b["gen"], dtype=torch.float64)
        ref_bias = bias + 0.1
        old = _old_logp(b, bias, 0.7, 3.0)
        common = dict(temperature=0.7, softcap=3.0)
        kw.update(ref_hidden=b["ref_h"], ref_weight=b["ref_w"], bias=bias, ref_bias=ref_bias, old_logp=old, **common)
        okw.update(ref_h=b["ref_h"], ref_w=b["ref_w"], bias=bias, ref_bias=ref_bias, old_logp=old, **common)
    elif case == "no_kl":
        old = _old_logp(b)
        kw.update(kl_beta=0.0, old_logp=old)
        okw.update(kl_beta=0.0, old_logp=old)
    elif case == "advantage_sign_clip":
        # larger advantages of both signs and a wide ratio spread: both clip sides active
        adv = torch.where(b["cand"] != IGN, torch.randn(b["cand"].shape, generator=b["gen"], dtype=torch.float64),
                          torch.full(b["cand"].shape, float("nan"), dtype=torch.float64))
        old = _old_logp(b, spread=1.0)
        kw.update(ref_hidden=b["ref_h"], ref_weight=b["ref_w"], old_logp=old, eps_low=0.1, eps_high=0.3)
        okw.update(ref_h=b["ref_h"], ref_w=b["ref_w"], old_logp=old, eps_low=0.1, eps_high=0.3)
    return adv, kw, okw


def _run_and_compare(case, impl, b, rtol=2e-4, device="cpu"):
    adv, kw, okw = _setup(case, b)
    out, m64 = po.run_and_compare(tlpo_loss, po.tlpo_loss, b["h"], b["w"], [b["cand"], adv], kw, okw=okw, impl=impl,
                                  cotangent=0.731, rtol=rtol, device=device)  # a non-unit cotangent
    assert out.loss.dim() == 0
    return out, m64


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("case", CASES)
def test_tlpo_matches_oracle(case, impl):
    b = make_batch(seed=CASES.index(case) + 100 * backend_names().index(impl))
    out, m64 = _run_and_compare(case, impl, b)
    if case in ("ref_logp_old", "advantage_sign_clip"):
        assert m64["clip_fraction"] > 0, "test data should exercise the clip"


@pytest.mark.impls("cpu")
def test_tlpo_odd_shapes(impl):
    # G = 1, K = 1, D = 1, V = 3
    b = make_batch(g=1, k=1, v=3, d=1, pad=False, seed=3)
    b["adv"] = torch.tensor([[0.7]], dtype=torch.float64)
    _run_and_compare("ref_model", impl, b)
    # wide K with many pads, V not a multiple of anything
    b = make_batch(g=3, k=9, v=53, d=5, seed=4)
    _run_and_compare("ref_logp_old", impl, b)


@pytest.mark.impls("cpu")
def test_tlpo_closed_form_gradient_at_rho_one(impl):
    """docs/methods.md §4: ∂L/∂z_u = −(1/N) Σ_i c_i (e_{t_i} − p_u), c_i = A_i − β(1 − exp(ℓ_ref − ℓ)) at ρ = 1."""
    b = make_batch(seed=11)
    beta = 0.3
    h = b["h"].float().requires_grad_()
    w = b["w"].float().requires_grad_()
    out = tlpo_loss(h, w, b["cand"], b["adv"].float(), b["ref_h"].float(), b["ref_w"].float(), kl_beta=beta,
                    impl=impl)
    out.loss.backward()
    assert out.metrics["clip_fraction"] == 0 and out.metrics["ratio/mean"] == 1

    lp = log_softmax64(logits64(b["h"], b["w"]))
    ref = log_softmax64(logits64(b["ref_h"], b["ref_w"]))
    p = lp.exp()
    dz = torch.zeros_like(lp)
    valid = b["cand"] != IGN
    n = int(valid.sum())
    for g in range(b["cand"].shape[0]):
        for i in range(b["cand"].shape[1]):
            if not valid[g, i]:
                continue
            t = int(b["cand"][g, i])
            c_i = float(b["adv"][g, i]) - beta * (1 - math.exp(float(ref[g, t] - lp[g, t])))
            e = torch.zeros_like(p[g])
            e[t] = 1.0
            dz[g] -= c_i * (e - p[g]) / n
    for got, want, name in ((h.grad, dz @ b["w"], "d hidden"), (w.grad, dz.t() @ b["h"], "d weight")):
        assert_close(got, want, rtol=0.0, atol=atol_normwise(2e-4, 1e-7, want), name=f"closed-form {name}")


@pytest.mark.impls("cpu")
def test_tlpo_reference_equal_policy_has_zero_kl(impl):
    b = make_batch(seed=5)
    h, w = b["h"].float(), b["w"].float()
    out = tlpo_loss(h, w, b["cand"], b["adv"].float(), h, w, impl=impl)
    assert out.metrics["kl"].abs() < 1e-7
    # ρ ≡ 1, KL ≡ 0: loss = −mean_i A_i over valid candidates
    valid = b["cand"] != IGN
    expected = -b["adv"][valid].sum() / valid.sum()
    assert_close(out.loss, expected, rtol=0.0, atol=atol_normwise(1e-5, 1e-7, expected), name="loss")


@pytest.mark.impls("cpu")
def test_tlpo_all_candidates_padded(impl):
    b = make_batch(g=3, k=2, seed=6)
    cand = torch.full_like(b["cand"], IGN)
    h = b["h"].float().requires_grad_()
    w = b["w"].float().requires_grad_()
    adv = torch.full(cand.shape, float("nan"))
    out = tlpo_loss(h, w, cand, adv, b["ref_h"].float(), b["ref_w"].float(), impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert out.metrics["num_candidates"].item() == 0
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() == 0
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() == 0


@pytest.mark.impls("interpreted")
def test_tlpo_triton_tiny(impl, impl_device):
    # The same rtol = 2e-4 as the other backends: measured under the Triton interpreter, the largest
    # error of these cases needs rtol <= 3.2e-7 (fp32 accumulation-order noise, as for impl="torch").
    b = make_batch(g=4, k=3, v=40, d=16, seed=7)
    _run_and_compare("ref_model", impl, b, device=impl_device)
    _run_and_compare("ref_logp_old", impl, b, device=impl_device)


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------


def test_tlpo_advantages_matches_oracle_and_properties():
    gen = torch.Generator().manual_seed(0)
    g, k = 7, 5
    probs = torch.rand(g, k, generator=gen)
    rewards = (torch.rand(g, k, generator=gen) < 0.4).float() * 2 - 1
    rewards[0] = 1.0  # all equal (+1)
    rewards[1] = -1.0  # all equal (−1)
    rewards[2] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    rewards[3] = 0.3  # constant, not ±1: μ may differ from 0.3 by rounding; must still be exactly 0
    mask = torch.ones(g, k, dtype=torch.bool)
    mask[4, 3:] = False
    mask[5, :] = False
    rewards[6] = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0])
    # with these probabilities fp32 gives μ = 0.30000004 ≠ 0.3, so w ≠ 0: only an explicit equal-rewards
    # check yields zeros (normalising the rounding noise would give advantages of size ~0.2)
    probs[3] = torch.tensor([0.6340786814689636, 0.4900934100151062, 0.8964447379112244, 0.455627977848053,
                             0.6323062777519226])
    adv = tlpo_advantages(probs, rewards, mask=mask)
    expected = po.tlpo_advantages(probs, rewards, mask)
    assert adv.dtype == torch.float32 and adv.shape == (g, k)
    assert_close(adv, expected, rtol=0.0, atol=atol_normwise(1e-6, 1e-7, expected), name="advantages")
    assert (adv[0] == 0).all() and (adv[1] == 0).all() and (adv[3] == 0).all() and (adv[5] == 0).all()
    assert (adv[4, 3:] == 0).all()
    varied = [2, 6]
    for r in varied:
        assert abs(adv[r].sum().item()) < 1e-6
        assert abs(adv[r].abs().sum().item() - 1.0) < 1e-6
    # the positive-reward candidate of row 6 gets the positive advantage
    assert adv[6, 0] > 0 and (adv[6, 1:] < 0).all()


def test_tlpo_advantages_single_group_and_int_rewards():
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    rewards = torch.tensor([1, -1, 1])
    adv = tlpo_advantages(probs, rewards)
    assert adv.shape == (3,) and adv.dtype == torch.float64
    # by hand: μ = (0.5 − 0.3 + 0.2)/1 = 0.4; w = (0.3, −0.42, 0.12); Σ|w| = 0.84
    want = torch.tensor([0.3, -0.42, 0.12], dtype=torch.float64) / 0.84
    assert_close(adv, want, rtol=0.0, atol=atol_normwise(1e-12, 1e-14, want), name="adv")


def test_tlpo_advantages_validation():
    with pytest.raises(ValueError, match=r"rewards: expected shape \(2, 3\)"):
        tlpo_advantages(torch.rand(2, 3), torch.rand(3, 2))
    with pytest.raises(ValueError, match="probs: expected shape"):
        tlpo_advantages(torch.rand(2, 3, 4), torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="mask: expected a bool"):
        tlpo_advantages(torch.rand(2, 3), torch.rand(2, 3), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 3\)"):
        tlpo_advantages(torch.rand(2, 3), torch.rand(2, 3), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="probs: expected a floating-point"):
        tlpo_advantages(torch.ones(2, 3, dtype=torch.long), torch.rand(2, 3))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _valid_args():
    b = make_batch(g=3, k=2, v=11, d=4, pad=False, seed=9)
    return (b["h"].float(), b["w"].float(), b["cand"], b["adv"].float(), b["ref_h"].float(), b["ref_w"].float())


@pytest.mark.parametrize(
    "mutate, kwargs, exc, pattern",
    [
        (lambda a: (a[0], a[1], a[2], a[3][:, :1], a[4], a[5]), {}, ValueError, r"advantages: expected shape \(3, 2\)"),
        (lambda a: (a[0], a[1], a[2][:2], a[3], a[4], a[5]), {}, ValueError, r"candidates: expected shape \(G, K\)"),
        (lambda a: (a[0], a[1], a[2][:, 0], a[3], a[4], a[5]), {}, ValueError, r"candidates: expected shape"),
        (lambda a: (a[0], a[1], a[2], a[3].long(), a[4], a[5]), {}, TypeError, r"advantages: expected a floating"),
        (lambda a: a, {"old_logp": torch.zeros(3, 3)}, ValueError, r"old_logp: expected shape \(3, 2\)"),
        (lambda a: (a[0], a[1], a[2], a[3]), {"ref_logp": torch.zeros(2, 2)}, ValueError, r"ref_logp: expected shape"),
        (lambda a: a, {"kl_beta": -0.1}, ValueError, r"kl_beta: expected a finite number >= 0"),
        (lambda a: a, {"eps_low": -0.2}, ValueError, r"eps_low"),
        (lambda a: a, {"eps_high": float("inf")}, ValueError, r"eps_high"),
        (lambda a: a, {"kl_beta": torch.tensor(0.1)}, TypeError, r"kl_beta: expected a Python number"),
        (lambda a: (a[0], a[1], a[2], a[3]), {}, ValueError, r"kl_beta=0.04 > 0 needs a reference"),
        (lambda a: (a[0], a[1], a[2], a[3], a[4]), {}, ValueError, r"needs both ref_hidden and ref_weight"),
        (lambda a: a, {"ref_logp": torch.zeros(3, 2)}, ValueError, r"not both"),
        (lambda a: a, {"impl": "fast"}, ValueError, r"impl: expected one of"),
    ],
)
def test_tlpo_validation(mutate, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        tlpo_loss(*mutate(_valid_args()), **kwargs)


def test_tlpo_kl_beta_zero_needs_no_reference():
    h, w, cand, adv, _, _ = _valid_args()
    out = tlpo_loss(h, w, cand, adv, kl_beta=0.0, impl="torch")
    assert "kl" not in out.metrics and torch.isfinite(out.loss)


def test_tlpo_bf16_inputs():
    b = make_batch(seed=13)
    adv, kw, _ = _setup("ref_logp_old", b)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        h = b["h"].to(dt).requires_grad_()
        w = b["w"].to(dt).requires_grad_()
        out = tlpo_loss(h, w, b["cand"], adv.float(), impl="torch", **float32_kwargs(kw))
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        assert h.grad.dtype == dt and torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()
        outs[dt] = out.loss.detach()
    want = outs[torch.float32]
    assert_close(outs[torch.bfloat16], want, rtol=0.0, atol=atol_normwise(3e-2, 2e-3, want), name="bf16 vs fp32 loss")
