"""TDPO1/TDPO2 (docs/methods.md §2) against the independent float64 oracle in tests/oracle/preference.py."""

from __future__ import annotations

import math

import pytest
import torch

from oracle.compare import assert_close, atol_scaled
from oracle.preference import SHAPES, TINY_SHAPES, compare_with_oracle, make_batch, oracle_tdpo, run_loss
from tokpo_kernels.losses.tdpo import tdpo_loss

METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "kl/chosen", "kl/rejected", "kl/margin", "logps/chosen", "logps/rejected",
)

def compare(batch, grad_keys, impl, *, seed=0, rtol=2e-4, atol=2e-5, **kw):
    return compare_with_oracle(tdpo_loss, oracle_tdpo, METRICS, batch, grad_keys, impl, cotangent_seed=seed + 99,
                               rtol=rtol, atol=atol, **kw)


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_tdpo_matches_oracle(impl, variant, shape):
    B, T, D, V = shape
    batch = make_batch(B, T, D, V, seed=B * 7 + T)
    compare(batch, ("hidden", "weight"), impl, variant=variant, beta=0.7, alpha=0.3)


@pytest.mark.impls("cpu")
def test_tdpo_bias_temperature_softcap_dref(impl):
    batch = make_batch(2, 6, 8, 29, seed=3, bias=True, d_ref=11, scale=3.0)
    compare(batch, ("hidden", "weight", "bias"), impl, variant="tdpo2", beta=0.5, alpha=0.8,
            temperature=0.7, softcap=5.0)


@pytest.mark.impls("cpu")
def test_tdpo_variants_differ_and_tdpo2_detaches_chosen_kl(impl):
    """TDPO2 with alpha=1 has the same value as TDPO1 but a different gradient (sg(K_c))."""
    batch = make_batch(2, 6, 8, 23, seed=11)
    l1, _, g1 = compare(batch, ("hidden",), impl, variant="tdpo1", beta=1.0)
    l2, _, g2 = compare(batch, ("hidden",), impl, variant="tdpo2", beta=1.0, alpha=1.0)
    assert_close(l1, l2, rtol=1e-4, atol=atol_scaled(1e-5, l2), name="value")
    assert (g1["hidden"] - g2["hidden"]).abs().max() > 1e-4


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("B,T,D,V", [(2, 7, 12, 37), (2, 256, 32, 3000)])
def test_tdpo_reference_equal_policy_is_exactly_log2(impl, variant, B, T, D, V):
    """M = 0 and K = 0 give Δ = 0, so the loss is exactly log 2 (fp32). K must come out as (almost)
    exactly 0: rounding noise in a per-token KL summed over a long sequence would move β·Δ by more
    than an fp32 ulp of log 2."""
    batch = make_batch(B, T, D, V, seed=5, bias=True)
    batch["ref_hidden"] = batch["hidden"].clone()
    batch["ref_weight"] = batch["weight"].clone()
    batch["ref_bias"] = batch["bias"].clone()
    out = tdpo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"],
                    bias=batch["bias"], ref_bias=batch["ref_bias"], variant=variant, impl=impl, softcap=10.0)
    assert out.loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()
    for k in ("kl/chosen", "kl/rejected"):
        assert (out.metrics[k] >= 0).all() and (out.metrics[k] <= 1e-7 * T).all(), (k, out.metrics[k])
    assert (out.metrics["rewards/margins"].abs() <= 1e-7 * T).all()


@pytest.mark.impls("cpu")
def test_tdpo_reference_underflow_is_finite(impl):
    """Reference probabilities that underflow to 0 in fp32 (logit gaps ~1e4): the reference code's
    log(softmax) gives NaN in the KL; the loss here stays finite and matches the float64 oracle."""
    batch = make_batch(2, 5, 6, 31, seed=8, scale=1.0)
    batch["ref_weight"] = batch["ref_weight"] * 3000.0
    batch["weight"] = batch["weight"] * 30.0
    # the hazard is real: the naive log(softmax) of the reference logits has -inf → NaN in Σ q log q
    zr = batch["ref_hidden"] @ batch["ref_weight"].t()
    q = torch.softmax(zr, -1)
    logp = torch.log_softmax(batch["hidden"] @ batch["weight"].t(), -1)
    assert torch.isnan((q * (torch.log(q) - logp)).sum(-1)).any()
    loss, metrics, grads = run_loss(tdpo_loss, batch, ("hidden", "weight"), 1.0, impl=impl, beta=0.1)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert all(torch.isfinite(v).all() for v in grads.values())
    o_loss, o_metrics, _ = run_loss(oracle_tdpo, batch, (), 1.0, dtype=torch.float64, beta=0.1)
    assert_close(loss, o_loss, rtol=1e-3, atol=atol_scaled(1e-3, o_loss), name="loss")
    for k in ("kl/chosen", "kl/rejected"):
        assert_close(metrics[k], o_metrics[k], rtol=1e-3, atol=atol_scaled(1e-3, o_metrics[k]), name=k)


@pytest.mark.impls("interpreted")
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_tdpo_triton_matches_oracle(impl, impl_device, variant, shape):
    B, T, D, V = shape
    batch = make_batch(B, T, D, V, seed=21 + T, bias=(variant == "tdpo2"))
    keys = ("hidden", "weight", "bias") if variant == "tdpo2" else ("hidden", "weight")
    compare(batch, keys, impl, variant=variant, beta=0.7, alpha=0.3, device=impl_device)


@pytest.mark.impls("interpreted")
def test_tdpo_triton_reference_equal_policy_is_log2(impl, impl_device):
    batch = make_batch(2, 6, 16, 45, seed=2)
    h, w, y = (batch[k].to(impl_device) for k in ("hidden", "weight", "targets"))
    out = tdpo_loss(h, w, y, h.clone(), w.clone(), impl=impl)
    assert out.loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()


# ------------------------------------------------------------------------------------- validation


def _args(B=2, T=4, D=3, V=7, rows=None):
    rows = 2 * B if rows is None else rows
    h = torch.randn(rows, T, D)
    w = torch.randn(V, D)
    y = torch.randint(0, V, (rows, T))
    return h, w, y, h.clone(), w.clone()


def test_tdpo_rejects_odd_rows():
    with pytest.raises(ValueError, match=r"even.*got 3 rows"):
        tdpo_loss(*_args(rows=3))


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_tdpo_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta: expected a finite number > 0"):
        tdpo_loss(*_args(), beta=beta)


def test_tdpo_rejects_bad_alpha_variant_and_types():
    with pytest.raises(ValueError, match="alpha"):
        tdpo_loss(*_args(), alpha=-1.0)
    with pytest.raises(ValueError, match=r"variant: expected one of \('tdpo1', 'tdpo2'\), got 'tdpo3'"):
        tdpo_loss(*_args(), variant="tdpo3")
    with pytest.raises(TypeError, match="beta: expected a Python number, got Tensor"):
        tdpo_loss(*_args(), beta=torch.tensor(0.1))


def test_tdpo_rejects_bad_shapes_and_missing_reference():
    h, w, y, rh, rw = _args()
    with pytest.raises(ValueError, match=r"hidden: expected shape \(rows, T, D\), got \(16, 3\)"):
        tdpo_loss(h.reshape(-1, 3), w, y, rh, rw)
    with pytest.raises(ValueError, match=r"targets: expected shape \(4, 4\)"):
        tdpo_loss(h, w, y[:, :3], rh, rw)
    with pytest.raises(TypeError, match="targets: expected integer"):
        tdpo_loss(h, w, y.float(), rh, rw)
    with pytest.raises(ValueError, match="ref_hidden.*ref_weight"):
        tdpo_loss(h, w, y, None, rw)


@pytest.mark.impls("cpu")
def test_tdpo_token_stats_are_the_policy_statistics_and_leave_the_loss_alone(impl):
    """``token_stats=True`` (what the trainers log DPOTrainer's token metrics from): the same loss, plus the
    policy's entropy, mean logit and argmax flags of the same pass, against float64 full logits."""
    from oracle.logits import log_softmax64, logits64
    from tokpo_kernels.integrations.trl_metrics import dpo_token_metric_sums

    batch = make_batch(3, 9, 16, 41, seed=21, bias=True)
    z = logits64(batch["hidden"], batch["weight"], batch["bias"], temperature=0.8, softcap=4.0)
    # Every other response label becomes the policy's argmax (logits do not depend on labels), so that
    # the token accuracy is strictly between 0 and 1 and tells a wrong argmax test apart.
    mask = batch["targets"] != -100
    every_other = mask & (torch.arange(mask.shape[1]) % 2 == 0)
    batch["targets"] = torch.where(every_other, z.argmax(-1), batch["targets"])
    kw = dict(bias=batch["bias"], ref_bias=batch["ref_bias"], beta=0.4, softcap=4.0, temperature=0.8, impl=impl)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"])
    plain = tdpo_loss(*args, **kw)
    out = tdpo_loss(*args, token_stats=True, **kw)
    assert plain.stats is None and out.stats is not None
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)

    logp = log_softmax64(z)
    entropy = -(logp.exp() * logp).sum(-1) * mask
    mean_logit = z.mean(-1) * mask
    label = batch["targets"].clamp_min(0)
    top1 = (z.argmax(-1) == label) & mask
    s = out.stats
    assert_close(s.entropy, entropy.float(), rtol=1e-5, atol=1e-5, name="entropy")
    assert_close(s.mean_logit, mean_logit.float(), rtol=1e-5, atol=1e-5, name="mean_logit")
    assert 0 < int(top1[: mask.shape[0] // 2].sum()) < int(mask[: mask.shape[0] // 2].sum())
    sums = dpo_token_metric_sums(s)
    half = mask.shape[0] // 2
    m = mask.double()
    want = {
        "entropy": entropy.sum() / m.sum(),
        "logits/chosen": mean_logit[:half].sum() / m[:half].sum(),
        "logits/rejected": mean_logit[half:].sum() / m[half:].sum(),
        "mean_token_accuracy": top1[:half].double().sum() / m[:half].sum(),
    }
    for name, (total, count) in sums.items():
        assert float(total / count) == pytest.approx(float(want[name]), rel=1e-5, abs=1e-6), name
