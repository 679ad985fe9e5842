"""TI-DPO (docs/methods.md §3): importance weights and the weighted preference + triplet loss, against the
independent float64 oracle in tests/oracle/preference.py."""

from __future__ import annotations

import math

import pytest
import torch

from oracle.compare import assert_close, atol_scaled
from oracle.preference import (
    SHAPES,
    TINY_SHAPES,
    compare_with_oracle,
    make_batch,
    oracle_importance,
    oracle_tidpo,
    response_targets,
    run_loss,
)
from tokpo_kernels.losses.importance import token_importance_weights
from tokpo_kernels.losses.tdpo import tdpo_loss
from tokpo_kernels.losses.tidpo import tidpo_loss

METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "kl/chosen", "kl/rejected", "kl/margin", "logps/chosen", "logps/rejected", "triplet_loss",
)


def with_extras(batch, *, seed, weights=True, anchor_T=None):
    """Add importance-like token weights and an anchor (own length, own prompt mask) to a batch."""
    gen = torch.Generator().manual_seed(seed)
    rows, T, D = batch["hidden"].shape
    V = batch["weight"].shape[0]
    d_ref = batch["ref_hidden"].shape[-1]
    out = dict(batch)
    if weights:
        w = 0.2 + 1.8 * torch.rand(rows, T, generator=gen)
        w[batch["targets"] == -100] = float("nan")  # never read off the mask
        out["token_weights"] = w
    if anchor_T is not None:
        B = rows // 2
        out["anchor_hidden"] = torch.randn(B, anchor_T, D, generator=gen)
        out["anchor_ref_hidden"] = torch.randn(B, anchor_T, d_ref, generator=gen)
        out["anchor_targets"] = response_targets(B, anchor_T, V, gen)
    return out


def compare(batch, grad_keys, impl, *, seed=0, rtol=2e-4, atol=2e-5, **kw):
    return compare_with_oracle(tidpo_loss, oracle_tidpo, METRICS, batch, grad_keys, impl, cotangent_seed=seed + 7,
                               rtol=rtol, atol=atol, **kw)


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("preference", ["tdpo2", "tdpo1", "dpo"])
@pytest.mark.parametrize("shape", SHAPES)
def test_tidpo_matches_oracle(impl, preference, shape):
    B, T, D, V = shape
    seed = 3 * B + T
    batch = with_extras(make_batch(B, T, D, V, seed=seed), seed=seed, anchor_T=max(1, T - 2) if T > 1 else 1)
    _, metrics, _ = compare(
        batch, ("hidden", "weight", "anchor_hidden"), impl, seed=seed,
        beta=0.6, alpha=0.4, gamma=0.5, margin=0.05, preference=preference,
    )


@pytest.mark.impls("cpu")
def test_tidpo_anchor_longer_than_responses_bias_softcap_kl_coef(impl):
    batch = with_extras(make_batch(2, 5, 8, 29, seed=4, bias=True, d_ref=6), seed=4, anchor_T=8)
    _, metrics, grads = compare(
        batch, ("hidden", "weight", "bias", "anchor_hidden"), impl, seed=4,
        beta=0.3, gamma=2.0, margin=30.0, kl_coef=0.3, temperature=1.3, softcap=4.0,
    )
    assert metrics["triplet_loss"] > 0  # margin large: the hinge is active for every pair
    assert grads["anchor_hidden"].abs().max() > 0


@pytest.mark.impls("cpu")
def test_tidpo_triplet_hinge_inactive_and_skipped(impl):
    batch = with_extras(make_batch(2, 6, 8, 23, seed=9, prompt=False), seed=9, anchor_T=6)
    kw = dict(beta=0.5, gamma=1.0, impl=impl)
    args = [batch[k] for k in ("hidden", "weight", "targets", "ref_hidden", "ref_weight")]
    anchor = {k: batch[k] for k in ("anchor_hidden", "anchor_ref_hidden", "anchor_targets")}
    base = tidpo_loss(*args, token_weights=batch["token_weights"], **kw)
    assert base.metrics["triplet_loss"].item() == 0.0
    for m in (0.0, -1.0):  # margin <= 0: skipped even with an anchor
        out = tidpo_loss(*args, token_weights=batch["token_weights"], margin=m, **anchor, **kw)
        assert out.loss.item() == base.loss.item() and out.metrics["triplet_loss"].item() == 0.0
    # anchor == chosen: D+ = 0 < D- - margin, the hinge is inactive, no gradient reaches the anchor;
    # anchor == rejected: D- = 0, the triplet term is D+ + margin
    B = batch["hidden"].shape[0] // 2
    for side, active in ((slice(0, B), False), (slice(B, 2 * B), True)):
        ah = batch["hidden"][side].clone().requires_grad_(True)
        anchor_same = dict(anchor_hidden=ah, anchor_ref_hidden=batch["ref_hidden"][side].clone(),
                           anchor_targets=batch["targets"][side].clone())
        out = tidpo_loss(*args, token_weights=batch["token_weights"], margin=1e-3, **anchor_same, **kw)
        o_loss, o_met, _ = run_loss(oracle_tidpo, {**batch, **anchor_same}, (), 1.0, dtype=torch.float64,
                                 beta=0.5, gamma=1.0, margin=1e-3)
        assert_close(out.loss, o_loss, rtol=1e-4, atol=atol_scaled(1e-5, o_loss), name="loss")
        want = o_met["triplet_loss"]
        assert_close(out.metrics["triplet_loss"], want, rtol=1e-4, atol=atol_scaled(1e-5, want), name="triplet")
        (g,) = torch.autograd.grad(out.loss, ah)
        if active:
            assert out.metrics["triplet_loss"] > 1e-3 and g.abs().max() > 0
        else:
            assert out.metrics["triplet_loss"] == 0 and (g == 0).all()


@pytest.mark.impls("cpu")
def test_tidpo_empty_anchor_row_contributes_no_triplet_term(impl):
    """An anchor without response tokens (sampled as an immediate EOS) adds 0 for its pair, as in the
    authors' code, instead of max(0, 0 − 0 + margin) = margin; the other pairs are unaffected."""
    batch = with_extras(make_batch(3, 6, 8, 23, seed=17), seed=17, anchor_T=5)
    batch["anchor_targets"] = batch["anchor_targets"].clone()
    batch["anchor_targets"][1] = -100  # pair 1: empty anchor
    _, metrics, grads = compare(batch, ("hidden", "weight", "anchor_hidden"), impl, seed=17,
                                beta=0.5, gamma=1.0, margin=30.0)  # hinge active for the other pairs
    assert metrics["triplet_loss"] > 0
    assert (grads["anchor_hidden"][1] == 0).all()
    # Every anchor empty: the triplet term is exactly 0 (it was `margin` before).
    batch["anchor_targets"][:] = -100
    args = [batch[k] for k in ("hidden", "weight", "targets", "ref_hidden", "ref_weight")]
    anchor = {k: batch[k] for k in ("anchor_hidden", "anchor_ref_hidden", "anchor_targets")}
    out = tidpo_loss(*args, token_weights=batch["token_weights"], margin=30.0, gamma=1.0, impl=impl, **anchor)
    assert out.metrics["triplet_loss"].item() == 0.0


@pytest.mark.impls("cpu")
def test_tidpo_tdpo1_base_with_unit_weights_equals_tdpo1(impl):
    batch = make_batch(2, 7, 12, 37, seed=13)
    args = [batch[k] for k in ("hidden", "weight", "targets", "ref_hidden", "ref_weight")]
    a = tidpo_loss(*args, beta=0.4, preference="tdpo1", impl=impl)
    c = tdpo_loss(*args, beta=0.4, variant="tdpo1", impl=impl)
    assert a.loss.item() == c.loss.item()


@pytest.mark.impls("cpu")
def test_tidpo_unit_weights_no_anchor_equals_tdpo2(impl):
    batch = make_batch(2, 7, 12, 37, seed=12)
    args = [batch[k] for k in ("hidden", "weight", "targets", "ref_hidden", "ref_weight")]
    a = tidpo_loss(*args, beta=0.4, alpha=0.7, impl=impl)
    b = tidpo_loss(*args, beta=0.4, alpha=0.7, impl=impl, token_weights=torch.ones(batch["targets"].shape))
    c = tdpo_loss(*args, beta=0.4, alpha=0.7, variant="tdpo2", impl=impl)
    assert a.loss.item() == c.loss.item() == b.loss.item()
    for k in c.metrics:
        assert torch.equal(a.metrics[k], c.metrics[k]), k


@pytest.mark.impls("cpu")
def test_tidpo_reference_equal_policy_is_log2(impl):
    batch = make_batch(2, 6, 8, 19, seed=1)
    h, w = batch["hidden"], batch["weight"]
    tw = torch.rand(batch["targets"].shape) * 2
    for pref in ("tdpo2", "tdpo1", "dpo"):
        out = tidpo_loss(h, w, batch["targets"], h.clone(), w.clone(), token_weights=tw, preference=pref, impl=impl)
        assert out.loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()


@pytest.mark.impls("interpreted")
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_tidpo_triton_matches_oracle(impl, impl_device, shape):
    B, T, D, V = shape
    batch = with_extras(make_batch(B, T, D, V, seed=40 + T), seed=40 + T, anchor_T=T + 1)
    compare(batch, ("hidden", "weight", "anchor_hidden"), impl, seed=40,
            beta=0.6, gamma=0.5, margin=0.05, kl_coef=0.1, device=impl_device)


# ------------------------------------------------------------------------------- importance weights


@pytest.mark.parametrize("lam,sigma_div", [(0.7, 4.0), (0.2, 8.0), (0.0, 1.0), (1.0, 2.5)])
def test_importance_weights_match_oracle(lam, sigma_div):
    gen = torch.Generator().manual_seed(int(lam * 10 + sigma_div))
    scores = torch.randn(3, 7, 11, generator=gen).abs()
    mask = torch.rand(3, 7, 11, generator=gen) > 0.3  # non-contiguous spans
    mask[0, 0] = False  # n = 0
    mask[0, 1] = False
    mask[0, 1, 4] = True  # n = 1
    scores[0, 2] = -torch.rand(11, generator=gen)  # no positive attribution: prior alone
    mask[0, 3] = False
    mask[0, 3, 2:9] = True  # contiguous span
    scores[0, 4, 5] = float("nan")
    mask[0, 4, 5] = False  # a NaN off the span is never read
    w = token_importance_weights(scores, mask, lam=lam, sigma_div=sigma_div)
    assert w.shape == scores.shape and w.dtype == torch.float32 and not w.requires_grad
    ref = oracle_importance(scores, mask, lam, sigma_div)
    assert_close(w, ref, rtol=1e-5, atol=atol_scaled(1e-6, ref), name="weights")
    assert (w[~mask] == 0).all()
    n = mask.sum(-1)
    means = (w.double().sum(-1) / n.clamp_min(1))[n > 1]
    ones = torch.ones_like(means)
    assert_close(means, ones, rtol=1e-4, atol=atol_scaled(1e-5, ones), name="mean 1 over the span")
    assert (w[0, 0] == 0).all() and (w[0, 1] == 0).all()


def test_importance_weights_defaults_and_dtypes():
    scores = torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    w = token_importance_weights(scores, mask)  # paper defaults lam=0.7, sigma_div=4
    assert w.dtype == torch.float32
    want = oracle_importance(scores.float(), mask.bool(), 0.7, 4.0)
    assert_close(w, want, rtol=1e-5, atol=atol_scaled(1e-5, want), name="w")
    w64 = token_importance_weights(scores.double().requires_grad_(), mask.bool())
    assert w64.dtype == torch.float64 and not w64.requires_grad


# ------------------------------------------------------------------------------------- validation


def _args(B=2, T=4, D=3, V=7, rows=None):
    rows = 2 * B if rows is None else rows
    h = torch.randn(rows, T, D)
    w = torch.randn(V, D)
    y = torch.randint(0, V, (rows, T))
    return h, w, y, h.clone(), w.clone()


def test_tidpo_validation():
    h, w, y, rh, rw = _args()
    with pytest.raises(ValueError, match=r"even.*got 5 rows"):
        tidpo_loss(*_args(rows=5))
    with pytest.raises(ValueError, match="beta: expected a finite number > 0, got 0"):
        tidpo_loss(h, w, y, rh, rw, beta=0)
    with pytest.raises(ValueError, match="gamma"):
        tidpo_loss(h, w, y, rh, rw, gamma=-0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        tidpo_loss(h, w, y, rh, rw, kl_coef=-1.0)
    with pytest.raises(ValueError, match=r"preference: expected one of \('tdpo2', 'tdpo1', 'dpo'\), got 'ipo'"):
        tidpo_loss(h, w, y, rh, rw, preference="ipo")
    with pytest.raises(ValueError, match=r"token_weights: expected shape \(4, 4\).*got \(4, 3\)"):
        tidpo_loss(h, w, y, rh, rw, token_weights=torch.ones(4, 3))
    with pytest.raises(TypeError, match="token_weights: expected a floating-point tensor"):
        tidpo_loss(h, w, y, rh, rw, token_weights=torch.ones(4, 4, dtype=torch.long))
    ah, ay = torch.randn(2, 5, 3), torch.randint(0, 7, (2, 5))
    together = "must be given together: got anchor_hidden, anchor_targets but not anchor_ref_hidden"
    with pytest.raises(ValueError, match=together):
        tidpo_loss(h, w, y, rh, rw, anchor_hidden=ah, anchor_targets=ay)
    with pytest.raises(ValueError, match=r"anchor_hidden: expected one anchor per pair, B=2 rows, got 3"):
        tidpo_loss(h, w, y, rh, rw, anchor_hidden=torch.randn(3, 5, 3), anchor_ref_hidden=torch.randn(3, 5, 3),
                   anchor_targets=torch.randint(0, 7, (3, 5)))
    with pytest.raises(ValueError, match=r"anchor_targets: expected shape \(2, 5\)"):
        tidpo_loss(h, w, y, rh, rw, anchor_hidden=ah, anchor_ref_hidden=ah.clone(), anchor_targets=ay[:, :4])
    with pytest.raises(ValueError, match=r"anchor_hidden: expected shape \(2, 5, 3\).*got \(2, 5, 4\)"):
        tidpo_loss(h, w, y, rh, rw, anchor_hidden=torch.randn(2, 5, 4), anchor_ref_hidden=ah, anchor_targets=ay)
    with pytest.raises(ValueError, match=r"anchor_ref_hidden: expected shape \(2, 5, 3\).*got \(2, 4, 3\)"):
        tidpo_loss(h, w, y, rh, rw, anchor_hidden=ah, anchor_ref_hidden=ah[:, :4], anchor_targets=ay)
    with pytest.raises(ValueError, match="ref_hidden.*ref_weight"):
        tidpo_loss(h, w, y, rh, None)


def test_importance_validation():
    s = torch.rand(2, 5)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 5\).*got \(2, 4\)"):
        token_importance_weights(s, m[:, :4])
    with pytest.raises(ValueError, match=r"lam: expected a finite number >= 0 and <= 1, got 1.5"):
        token_importance_weights(s, m, lam=1.5)
    with pytest.raises(ValueError, match="sigma_div"):
        token_importance_weights(s, m, sigma_div=0.0)
    # Below 1 the prior would be wider than the span (σ = n / sigma_div > n): refused, not flattened.
    with pytest.raises(ValueError, match=r"sigma_div: expected a finite number >= 1.*got 0.5"):
        token_importance_weights(s, m, sigma_div=0.5)
    with pytest.raises(TypeError, match="mask: expected a bool"):
        token_importance_weights(s, m.float())
    with pytest.raises(TypeError, match="scores: expected a floating-point tensor"):
        token_importance_weights(m.long(), m)
