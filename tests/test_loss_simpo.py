"""SimPO (``simpo_loss``) against an independent float64 oracle, on every backend, and against Liger.

The oracle materialises the full float64 logits, takes the label log-probs one token at a time and
averages them per row in Python (docs/methods.md §5); nothing is shared with the statistics path.
Shapes are tiny because the Triton backend runs under the interpreter on CPU.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

import tokpo_kernels as tk
from oracle import assert_close, log_softmax64, logits64
from oracle.policy import assert_loss_matches
from test_loss_signatures import PAIR, SHARED, K, described

IGN = -100
RTOL = 2e-4  # fp32 against the float64 oracle


def simpo64(h, w, y, *, beta=2.0, gamma=0.5, bias=None, temperature=1.0, softcap=None,
            ignore_index=IGN) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """loss = mean_b −log σ(β(L̄_c − L̄_r) − γ), L̄ = the mean label log-prob of a row's response tokens."""
    lp = log_softmax64(logits64(h, w, bias, temperature=temperature, softcap=softcap))
    avg = []
    for r in range(y.shape[0]):
        toks = [lp[r, t, int(y[r, t])] for t in range(y.shape[1]) if int(y[r, t]) != ignore_index]
        avg.append(sum(toks) / len(toks) if toks else lp.sum() * 0.0)
    b = y.shape[0] // 2
    chosen, rejected = torch.stack(avg[:b]), torch.stack(avg[b:])
    loss = F.softplus(-(beta * (chosen - rejected) - gamma)).mean()  # −log σ(x) = softplus(−x)
    rc, rr = beta * chosen, beta * rejected
    metrics = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).double(),
               "rewards/margins": rc - rr, "logps/chosen": chosen, "logps/rejected": rejected}
    return loss, {k: v.detach() for k, v in metrics.items()}


def make_batch(pairs=2, t=5, d=6, v=19, seed=0, *, empty_row=True, bias=False):
    """float64 leaves; rows have prompt prefixes of different lengths, right padding, and (optionally)
    one rejected row without any response token (its L̄ is 0)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * pairs, t, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.7
    y = torch.randint(0, v, (2 * pairs, t), generator=gen)
    for r in range(2 * pairs):
        y[r, : 1 + r % 3] = IGN
    y[0, -1] = IGN
    if empty_row:
        y[-1] = IGN
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    return h, w, y, b, gen


CASES = {
    "defaults": dict(),
    "bias_beta_gamma": dict(bias=True, beta=2.5, gamma=1.2),
    "temperature_softcap": dict(temperature=0.8, softcap=4.0, beta=1.5, gamma=0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_simpo_matches_float64_oracle(case: str, impl: str, impl_device: str) -> None:
    opts = dict(CASES[case])
    use_bias = opts.pop("bias", False)
    h, w, y, b, gen = make_batch(seed=len(case), bias=use_bias)
    leaves = [h, w] + ([b] if b is not None else [])
    x = [t.detach().float().to(impl_device).requires_grad_() for t in leaves]
    out = tk.simpo_loss(x[0], x[1], y.to(impl_device), bias=x[2] if b is not None else None, impl=impl, **opts)
    cot = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.5  # a random cotangent
    grads = torch.autograd.grad(out.loss * cot, x)

    ref = [t.detach().clone().requires_grad_() for t in leaves]
    loss64, metrics64 = simpo64(ref[0], ref[1], y, bias=ref[2] if b is not None else None, **opts)
    grads64 = torch.autograd.grad(loss64 * cot, ref)

    names = [f"grad {n}" for n in ("hidden", "weight", "bias")[: len(x)]]
    assert_loss_matches(out, loss64, metrics64, list(zip(grads, grads64, names, strict=True)), RTOL)


def test_simpo_of_identical_pairs_is_softplus_gamma() -> None:
    """chosen == rejected: the margin is 0 and loss = −log σ(−γ) = log(1 + e^γ), whatever the policy."""
    h, w, y, _, _ = make_batch(empty_row=False)
    b = y.shape[0] // 2
    h[b:], y[b:] = h[:b], y[:b]
    out = tk.simpo_loss(h.float(), w.float(), y, gamma=0.7, impl="torch")
    assert_close(out.loss, torch.log1p(torch.exp(torch.tensor(0.7, dtype=torch.float64))), rtol=1e-6, atol=1e-7,
                 name="loss of identical pairs")
    assert torch.equal(out.metrics["rewards/margins"], torch.zeros(b))


def test_simpo_module_matches_functional() -> None:
    h, w, y, _, _ = make_batch(seed=3)
    h, w = h.float(), w.float()
    got = tk.SimPOLoss(beta=3.0, gamma=0.2, impl="torch")(h, w, y)
    assert torch.equal(got.loss, tk.simpo_loss(h, w, y, beta=3.0, gamma=0.2, impl="torch").loss)


def test_simpo_matches_liger() -> None:
    """Liger's ``LigerFusedLinearSimPOLoss`` (no NLL term, no label smoothing) computes the same loss."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

    h, w, y, b, _ = make_batch(seed=5, empty_row=False, bias=True)  # Liger divides by n_b: no empty row
    leaves = [t.float().requires_grad_() for t in (h, w, b)]
    ours = tk.simpo_loss(leaves[0], leaves[1], y, bias=leaves[2], beta=2.0, gamma=0.5, impl="torch").loss
    g_ours = torch.autograd.grad(ours, leaves)
    liger = LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=False)
    theirs = liger(leaves[1], leaves[0].reshape(y.shape[0], y.shape[1], -1), y, leaves[2])
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    g_theirs = torch.autograd.grad(theirs, leaves)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6, name="loss vs Liger")
    for name, a, e in zip(("hidden", "weight", "bias"), g_ours, g_theirs, strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-6, name=f"grad {name} vs Liger")


def _valid() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w, y, _, _ = make_batch()
    return h.float(), w.float(), y


@pytest.mark.parametrize(
    "mutate, kwargs, exc, pattern",
    [
        (lambda a: (a[0][:3], a[1], a[2][:3]), {}, ValueError, r"even.*got 3 rows"),
        (lambda a: a, {"beta": 0.0}, ValueError, r"beta: expected a finite number > 0, got 0.0"),
        (lambda a: a, {"gamma": float("inf")}, ValueError, r"gamma: expected a finite number, got inf"),
        (lambda a: a, {"gamma": torch.tensor(0.5)}, TypeError, r"gamma: expected a Python number"),
        (lambda a: (a[0], a[1], a[2][:, :3]), {}, ValueError, r"targets: expected shape \(4, 5\)"),
        (lambda a: (a[0], a[1], a[2].float()), {}, TypeError, r"targets: expected integer"),
        (lambda a: a, {"ref_bias": torch.zeros(19)}, TypeError, r"ref_bias"),
        (lambda a: a, {"impl": "fast"}, ValueError, r"impl"),
    ],
)
def test_simpo_validation(mutate, kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        tk.simpo_loss(*mutate(_valid()), **kwargs)


def test_signature_is_pinned() -> None:
    """The public signature, parameter by parameter (a contract: keywords may only be appended)."""
    shared = [o for o in SHARED if o[0] != "ref_bias"]
    assert described(tk.simpo_loss) == PAIR + [("beta", K, 2.0), ("gamma", K, 0.5)] + shared
