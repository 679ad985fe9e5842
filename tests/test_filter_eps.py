"""``filter_eps``: the opt-in backward tile filter of the Triton implementation.

Construction: columns >= 128 carry a bias of -30, so their probabilities (~1e-13) are far below
``filter_eps``; the interpreter's 32-wide vocabulary tiles 4..6 hold only such columns. With the
filter those tiles are skipped (their bias gradient is exactly 0), except a tile that holds a
target id, which must still be processed. Everything else stays within fp32 noise of the exact
gradient, and the forward statistics are untouched.
"""

import pytest
import torch

import tokpo_kernels as tk

V, D, N, LOW = 200, 16, 12, 128


def _inputs(gen: torch.Generator, target_in_low_tile: bool):
    h = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.5
    b = torch.zeros(V)
    b[LOW:] = -30.0
    rh = h + 0.05 * torch.randn(N, D, generator=gen)
    t = torch.randint(0, LOW, (N,), generator=gen)
    t[0] = -100
    if target_in_low_tile:
        t[3] = 170  # tile 5 (columns 160..191) now holds a target
    return h, w, b, rh, t


def _grads(impl, h, w, b, rh, t, filter_eps, device):
    h, w, b = (x.to(device).clone().requires_grad_() for x in (h, w, b))
    s = tk.linear_vocab_stats(h, w, t.to(device), bias=b, ref_hidden=rh.to(device), ref_weight=w.detach(),
                              ref_bias=b.detach(),
                              kl=True, impl=impl, filter_eps=filter_eps)
    g = torch.Generator().manual_seed(7)
    loss = sum((torch.randn(x.shape, generator=g).to(device) * x).sum() for x in (s.logp, s.lse, s.kl))
    return s, torch.autograd.grad(loss, (h, w, b))


@pytest.mark.impls("interpreted")  # every Triton strategy
@pytest.mark.parametrize("target_in_low_tile", [False, True], ids=["no-target", "target-in-low-tile"])
def test_filter_skips_negligible_tiles_only(target_in_low_tile, impl, device, gen):
    h, w, b, rh, t = _inputs(gen, target_in_low_tile)
    s_exact, (dh0, dw0, db0) = _grads(impl, h, w, b, rh, t, None, device)
    s_filt, (dh1, dw1, db1) = _grads(impl, h, w, b, rh, t, 1e-6, device)
    for a, c in zip((s_exact.logp, s_exact.lse, s_exact.kl), (s_filt.logp, s_filt.lse, s_filt.kl), strict=True):
        assert torch.equal(a, c), "the filter must not change forward statistics"
    assert (db0[LOW:] != 0).any(), "construction: exact gradient has tiny non-zero entries there"
    skipped = db1[LOW:].reshape(-1)
    if target_in_low_tile:
        tile = slice(160 - LOW, 192 - LOW)
        assert skipped[tile].ne(0).all(), "a tile holding a target must not be filtered"
        assert torch.allclose(db1[160:192], db0[160:192], rtol=1e-5, atol=1e-7)
        others = torch.cat([skipped[: 160 - LOW], skipped[192 - LOW:]])
        assert (others == 0).all()
    else:
        assert (skipped == 0).all(), "tiles with every p, q < filter_eps and no target are skipped"
    for exact, approx in ((dh0, dh1), (dw0, dw1), (db0, db1)):
        assert torch.allclose(exact, approx, rtol=1e-5, atol=1e-9)


def test_filter_auto_is_bf16_resolution_and_torch_ignores_it(gen):
    from tokpo_kernels._types import resolve_filter_eps

    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-7
    assert resolve_filter_eps(None, torch.bfloat16) is None
    h, w, b, rh, t = _inputs(gen, False)
    _, exact = _grads("torch", h, w, b, rh, t, None, "cpu")
    _, ignored = _grads("torch", h, w, b, rh, t, "auto", "cpu")
    for a, c in zip(exact, ignored, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("bad", [-1e-3, 1.0, float("nan"), "big", True])
def test_filter_eps_validation(bad):
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="filter_eps: expected None, 'auto' or a number in \\[0, 1\\), got"):
        tk.linear_vocab_stats(h, w, t, impl="torch", filter_eps=bad)
