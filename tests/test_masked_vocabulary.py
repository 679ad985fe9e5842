"""Masked vocabulary entries (``−inf`` logits, e.g. a ``−inf`` bias on padded rows of the head).

A masked entry has probability 0, so every statistic and gradient must equal those of the same head
with the masked rows removed (targets renumbered): an independent oracle that needs no special
handling of ``−inf``. Entropy and KL are where ``0·(−inf)`` would otherwise turn into NaN; a row
whose logits are *all* masked in one vocabulary split/shard is the vocabulary-parallel case.
"""

from __future__ import annotations

import pytest
import torch

import tokpo_kernels as tk
from oracle.compare import assert_close, atol_scaled

V, D, N = 45, 7, 6


def _case(masked: torch.Tensor):
    gen = torch.Generator().manual_seed(1)
    keep = torch.ones(V, dtype=torch.bool)
    keep[masked] = False
    kept = keep.nonzero().squeeze(1)
    new_id = torch.full((V,), -100, dtype=torch.long)
    new_id[kept] = torch.arange(kept.numel())
    t = {
        "h": torch.randn(N, D, generator=gen),
        "w": torch.randn(V, D, generator=gen) / D**0.5 * 2,
        "b": 0.3 * torch.randn(V, generator=gen),
        "rh": torch.randn(N, D, generator=gen),
        "rw": torch.randn(V, D, generator=gen) / D**0.5 * 2,
        "rb": 0.3 * torch.randn(V, generator=gen),
    }
    t["b"][masked] = float("-inf")
    t["rb"][masked] = float("-inf")
    y = kept[torch.randint(0, kept.numel(), (N, 2), generator=gen)]
    y[2, 1] = -100
    return t, y, kept, new_id


def _run(t, y, rows, impl, device):
    """Stats of the head restricted to ``rows`` (all rows: the masked head), and their gradients."""
    h = t["h"].to(device).requires_grad_()
    w = t["w"][rows].to(device).requires_grad_()
    b = t["b"][rows].to(device).requires_grad_()
    s = tk.linear_vocab_stats(h, w, y.to(device), bias=b, ref_hidden=t["rh"].to(device),
                              ref_weight=t["rw"][rows].to(device), ref_bias=t["rb"][rows].to(device),
                              kl=True, entropy=True, impl=impl)
    gen = torch.Generator().manual_seed(2)
    outs = {k: getattr(s, k) for k in ("logp", "lse", "ref_logp", "kl", "entropy")}
    sum((o * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs.values()).backward()
    return outs, h.grad, w.grad, b.grad


MASKS = {
    "scattered": torch.tensor([0, 5, 6, 17, 44]),
    "trailing_block": torch.arange(16, 45),
    # The whole first vocabulary tile of the interpreted kernels (BLOCK_V = 32): the online softmax
    # starts from a tile without a finite logit (and, with 2 splits, a split has none at all).
    "first_tile": torch.arange(0, 32),
}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.impls("fused")  # naive forms 0·(−inf) = NaN in its full-logit entropy by design
def test_masked_entries_equal_the_head_without_them(impl: str, impl_device: str, mask: str) -> None:
    _check_against_the_head_without_them(impl, impl_device, mask)


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.impls("interpreted")
def test_masked_entries_with_two_forward_splits(impl: str, impl_device: str, mask: str, monkeypatch) -> None:
    """The kernel forward split over the vocabulary in two: with "first_tile" one split has no
    finite logit at all, and the merge of the split partials must drop it."""
    monkeypatch.setenv("TOKPO_FORWARD_SPLITS", "2")
    _check_against_the_head_without_them(impl, impl_device, mask)


def _check_against_the_head_without_them(impl: str, device: str, mask: str) -> None:
    t, y, kept, new_id = _case(MASKS[mask])
    got, gh, gw, gb = _run(t, y, torch.arange(V), impl, device)
    want, wh, ww, wb = _run(t, torch.where(y >= 0, new_id[y.clamp_min(0)], y), kept, "torch", "cpu")
    for k in want:
        assert_close(got[k], want[k], rtol=1e-5, atol=atol_scaled(1e-5, want[k]), name=k)
    assert_close(gh, wh, rtol=1e-5, atol=atol_scaled(1e-5, wh), name="grad hidden")
    assert_close(gw[kept], ww, rtol=1e-5, atol=atol_scaled(1e-5, ww), name="grad weight (kept rows)")
    assert_close(gb[kept], wb, rtol=1e-5, atol=atol_scaled(1e-5, wb), name="grad bias (kept rows)")
    masked = torch.ones(V, dtype=torch.bool)
    masked[kept] = False
    assert torch.equal(gw[masked].cpu(), torch.zeros_like(gw[masked].cpu())), "masked rows got a gradient"
    assert torch.equal(gb[masked].cpu(), torch.zeros_like(gb[masked].cpu())), "masked bias got a gradient"
