"""DPO / IPO / hinge (docs/methods.md §5, TRL conventions) against the float64 oracle and Liger-Kernel."""

from __future__ import annotations

import math

import pytest
import torch

from oracle.compare import assert_close, atol_scaled
from oracle.logits import log_softmax64, logits64
from oracle.preference import SHAPES, TINY_SHAPES, compare_with_oracle, make_batch, oracle_dpo, run_loss
from tokpo_kernels.losses.dpo import dpo_loss

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def compare(batch, grad_keys, impl, *, seed=0, rtol=2e-4, atol=2e-5, **kw):
    return compare_with_oracle(dpo_loss, oracle_dpo, METRICS, batch, grad_keys, impl, cotangent_seed=seed + 5,
                               rtol=rtol, atol=atol, **kw)


def ref_token_logp(batch):
    """Per-token reference log-probs (fp32) with NaN at ignored labels (they must never be read)."""
    lq = log_softmax64(logits64(batch["ref_hidden"], batch["ref_weight"], batch.get("ref_bias")))
    y = batch["targets"]
    out = lq.gather(-1, y.clamp_min(0)[..., None])[..., 0].float()
    return torch.where(y == -100, torch.full_like(out, float("nan")), out)


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dpo_matches_oracle(impl, loss_type, shape):
    B, T, D, V = shape
    batch = make_batch(B, T, D, V, seed=B + 5 * T)
    compare(batch, ("hidden", "weight"), impl, beta=0.8, loss_type=loss_type)


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("ref_mode", ["token", "sequence", "free"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_precomputed_and_free_reference(impl, ref_mode, loss_type):
    batch = make_batch(2, 7, 12, 37, seed=17)
    ref = ref_token_logp(batch)
    inp = {k: batch[k] for k in ("hidden", "weight", "targets")}
    kw = {}
    if ref_mode == "token":
        kw["ref_logp"] = ref
    elif ref_mode == "sequence":
        m = batch["targets"] != -100
        s = torch.where(m, ref, torch.zeros_like(ref)).sum(-1)
        kw["ref_logp"] = s / m.sum(-1).clamp_min(1) if loss_type == "ipo" else s
    else:
        kw["reference_free"] = True
    compare(inp, ("hidden", "weight"), impl, beta=0.3, loss_type=loss_type, **kw)
    if ref_mode != "free":  # same as passing the reference model itself
        a = dpo_loss(*[batch[k] for k in ("hidden", "weight", "targets")], impl=impl, beta=0.3,
                     loss_type=loss_type, **kw)
        b = dpo_loss(*[batch[k] for k in ("hidden", "weight", "targets", "ref_hidden", "ref_weight")], impl=impl,
                     beta=0.3, loss_type=loss_type)
        assert_close(a.loss, b.loss, rtol=1e-4, atol=atol_scaled(1e-5, b.loss), name="loss")


@pytest.mark.impls("cpu")
def test_dpo_label_smoothing_average_bias_temperature_softcap(impl):
    batch = make_batch(2, 6, 8, 29, seed=2, bias=True, d_ref=5, scale=2.0)
    compare(batch, ("hidden", "weight", "bias"), impl, beta=0.5, label_smoothing=0.2, average_log_prob=True,
            temperature=0.8, softcap=6.0)
    compare(batch, ("hidden", "weight"), impl, beta=0.5, loss_type="ipo", average_log_prob=False)


@pytest.mark.impls("cpu")
def test_dpo_reference_equal_policy_is_log2(impl):
    batch = make_batch(2, 6, 8, 19, seed=1)
    h, w = batch["hidden"], batch["weight"]
    out = dpo_loss(h, w, batch["targets"], h.clone(), w.clone(), impl=impl)
    assert out.loss.item() == torch.tensor(math.log(2.0), dtype=torch.float32).item()
    out = dpo_loss(h, w, batch["targets"], h.clone(), w.clone(), impl=impl, loss_type="hinge", beta=0.2)
    assert out.loss.item() == 1.0


@pytest.mark.impls("interpreted")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_dpo_triton_matches_oracle(impl, impl_device, loss_type, shape):
    B, T, D, V = shape
    batch = make_batch(B, T, D, V, seed=60 + T, bias=True)
    compare(batch, ("hidden", "weight", "bias"), impl, beta=0.8, loss_type=loss_type, device=impl_device)


# ------------------------------------------------------------------------------------------ Liger


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"liger-kernel cannot be imported ({type(exc).__name__}: {exc}); pip install liger-kernel")
    return LigerFusedLinearDPOLoss


@pytest.mark.impls("cpu")
@pytest.mark.parametrize(
    "loss_type,average,bias", [("sigmoid", False, False), ("sigmoid", True, True), ("hinge", False, False)]
)
def test_dpo_matches_liger(impl, loss_type, average, bias):
    """Same loss, logps, rewards and gradients as LigerFusedLinearDPOLoss on identical fp32 inputs.

    Liger's conventions: ``(weight, hidden, target, bias, ref_hidden, ref_weight, ref_bias)``, rows
    stacked [chosen; rejected], summed log-probs unless ``average_log_prob=True``, loss summed over
    pairs / number of pairs (= our mean). Liger averages 0/0 = NaN for a row without response
    tokens, so every row keeps at least one label here.
    """
    Liger = _liger()
    batch = make_batch(3, 6, 10, 41, seed=31, bias=bias)
    y = batch["targets"]
    y[:, -1] = torch.randint(0, 41, (y.shape[0],), generator=torch.Generator().manual_seed(1))
    g = 0.73
    leaves = {k: v.clone().requires_grad_(k in ("hidden", "weight", "bias")) for k, v in batch.items()
              if k != "targets"}
    liger = Liger(beta=0.4, compiled=False, use_ref_model=True, average_log_prob=average, loss_type=loss_type,
                  compute_nll_loss=False)
    l_loss, aux = liger(leaves["weight"], leaves["hidden"], y, leaves.get("bias"), leaves["ref_hidden"],
                        leaves["ref_weight"], leaves.get("ref_bias"))
    keys = ["hidden", "weight"] + (["bias"] if bias else [])
    l_grads = torch.autograd.grad(l_loss * g, [leaves[k] for k in keys])

    ours_in = {k: v for k, v in batch.items()}
    loss, metrics, grads = run_loss(dpo_loss, ours_in, tuple(keys), g, impl=impl, beta=0.4, loss_type=loss_type,
                                    average_log_prob=average)
    assert_close(loss, l_loss, rtol=1e-5, atol=atol_scaled(1e-6, l_loss), name="loss")
    for name, want, rtol, atol in (("logps/chosen", aux[0], 1e-5, 1e-6), ("logps/rejected", aux[1], 1e-5, 1e-6),
                                   ("rewards/chosen", aux[5], 1e-4, 1e-5), ("rewards/rejected", aux[6], 1e-4, 1e-5)):
        assert_close(metrics[name], want, rtol=rtol, atol=atol_scaled(atol, want), name=name)
    for k, lg in zip(keys, l_grads, strict=True):
        assert_close(grads[k], lg, rtol=1e-4, atol=atol_scaled(1e-5, lg), name=f"d{k}")


# ------------------------------------------------------------------------------------- validation


def _args(B=2, T=4, D=3, V=7, rows=None):
    rows = 2 * B if rows is None else rows
    h = torch.randn(rows, T, D)
    w = torch.randn(V, D)
    y = torch.randint(0, V, (rows, T))
    return h, w, y, h.clone(), w.clone()


def test_dpo_validation():
    h, w, y, rh, rw = _args()
    with pytest.raises(ValueError, match=r"even.*got 1 rows"):
        dpo_loss(*_args(rows=1))
    with pytest.raises(ValueError, match="beta: expected a finite number > 0, got -1"):
        dpo_loss(h, w, y, rh, rw, beta=-1)
    with pytest.raises(ValueError, match=r"loss_type: expected one of \('sigmoid', 'ipo', 'hinge'\), got 'kto'"):
        dpo_loss(h, w, y, rh, rw, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing: expected a finite number >= 0 and < 0.5, got 0.5"):
        dpo_loss(h, w, y, rh, rw, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing: only loss_type='sigmoid' uses it"):
        dpo_loss(h, w, y, rh, rw, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="expected exactly one reference.*got none"):
        dpo_loss(h, w, y)
    with pytest.raises(ValueError, match="expected exactly one reference.*got ref_hidden/ref_weight, ref_logp"):
        dpo_loss(h, w, y, rh, rw, ref_logp=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="needs both ref_hidden and ref_weight"):
        dpo_loss(h, w, y, rh)
    bad_ref = r"ref_logp: expected per-token shape \(4, 4\).*per-sequence shape \(4,\), got \(4, 3\)"
    with pytest.raises(ValueError, match=bad_ref):
        dpo_loss(h, w, y, ref_logp=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="average_log_prob: expected a bool or None"):
        dpo_loss(h, w, y, rh, rw, average_log_prob=1)
