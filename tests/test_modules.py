"""nn.Module wrappers give exactly the functional result, reject unknown options, and override per call."""

import pytest
import torch

import tokpo_kernels as tk


def _pair_batch(seed=0, b=2, t=5, d=8, v=23):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * b, t, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    y = torch.randint(0, v, (2 * b, t), generator=g)
    y[:, :2] = -100
    return h, w, y, torch.randn(2 * b, t, d, generator=g), torch.randn(v, d, generator=g)


@pytest.mark.parametrize(
    "module,fn,opts",
    [
        (tk.TDPOLoss, tk.tdpo_loss, dict(beta=0.3, alpha=0.7, variant="tdpo1")),
        (tk.TIDPOLoss, tk.tidpo_loss, dict(beta=0.2, preference="dpo")),
        (tk.DPOLoss, tk.dpo_loss, dict(beta=0.5, loss_type="ipo")),
    ],
    ids=["tdpo", "tidpo", "dpo"],
)
def test_pair_modules_match_functional(module, fn, opts):
    h, w, y, rh, rw = _pair_batch()
    got = module(**opts, impl="torch")(h, w, y, rh, rw)
    want = fn(h, w, y, rh, rw, **opts, impl="torch")
    assert torch.equal(got.loss, want.loss)
    assert got.metrics.keys() == want.metrics.keys()
    g1 = torch.autograd.grad(got.loss, (h, w))
    g2 = torch.autograd.grad(want.loss, (h, w))
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_cross_entropy_module_and_call_time_override():
    h, w, y, _, _ = _pair_batch(seed=1)
    m = tk.LinearCrossEntropyLoss(reduction="sum", impl="torch")
    assert torch.equal(m(h, w, y).loss, tk.linear_cross_entropy(h, w, y, reduction="sum", impl="torch").loss)
    # a call-time keyword wins over the stored one
    assert torch.equal(m(h, w, y, reduction="mean").loss, tk.linear_cross_entropy(h, w, y, impl="torch").loss)


def test_tlpo_and_ppo_modules_match_functional():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 8, generator=g)
    w = torch.randn(19, 8, generator=g)
    cand = torch.randint(0, 19, (3, 4), generator=g)
    adv = torch.randn(3, 4, generator=g)
    ref = torch.randn(3, 4, generator=g) - 3.0
    got = tk.TLPOLoss(kl_beta=0.1, impl="torch")(h, w, cand, adv, ref_logp=ref)
    assert torch.equal(got.loss, tk.tlpo_loss(h, w, cand, adv, ref_logp=ref, kl_beta=0.1, impl="torch").loss)

    hb = torch.randn(2, 5, 8, generator=g)
    y = torch.randint(0, 19, (2, 5), generator=g)
    a = torch.randn(2, 5, generator=g)
    got = tk.PPOLoss(beta=0.0, loss_type="dapo", impl="torch")(hb, w, y, a)
    assert torch.equal(got.loss, tk.ppo_loss(hb, w, y, a, beta=0.0, loss_type="dapo", impl="torch").loss)


def test_unknown_option_raises_naming_the_allowed_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['betta'\].*'beta'"):
        tk.TDPOLoss(betta=0.1)
