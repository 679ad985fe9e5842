"""``max_logit`` and ``mean_logit`` on every backend, against a float64 full-logits computation.

``max_logit`` is the row max of the transformed policy logits (no gradient: it is returned
detached); ``mean_logit = Σ_v z_v / V`` is differentiable with ``∂/∂z_v = 1/V``. Both are checked
with softcap/temperature, a bias, ignored tokens, several targets per token, V not a multiple of
any block, and random cotangents on ``mean_logit`` together with ``logp`` (so the extra gradient
term is checked inside the full universal gradient, not alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import tokpo_kernels as tk
from oracle import logits64
from tokpo_kernels.backends import available_backends, backend_names

IGNORE = -100


@dataclass(frozen=True)
class Case:
    n: int = 7
    v: int = 37
    d: int = 12
    j: int = 0  # 0: one target per token, targets shaped (N,); else (N, J)
    bias: bool = False
    softcap: Optional[float] = None
    temperature: float = 1.0
    scale: float = 1.0
    ignored: Tuple[int, ...] = ()


CASES = [
    pytest.param(Case(), id="plain"),
    pytest.param(Case(n=9, v=41, d=16, bias=True, softcap=3.0, temperature=0.7, scale=4.0, ignored=(0, 5)),
                 id="bias-softcap-temperature-ignored"),
    pytest.param(Case(n=5, v=23, d=1, j=3, ignored=(2,)), id="d1-multi-target"),
    pytest.param(Case(n=4, v=29, d=8, ignored=(0, 1, 2, 3)), id="all-ignored"),
]


def _impls():
    return [
        pytest.param(name, marks=pytest.mark.skipif(
            name not in available_backends("cuda" if torch.cuda.is_available() else "cpu"),
            reason=f"backend {name!r} cannot run here"))
        for name in backend_names()
    ]


def _inputs(case: Case, gen: torch.Generator):
    h = torch.randn(case.n, case.d, generator=gen, dtype=torch.float64) * case.scale / case.d ** 0.5
    w = torch.randn(case.v, case.d, generator=gen, dtype=torch.float64)
    b = torch.randn(case.v, generator=gen, dtype=torch.float64) if case.bias else None
    shape = (case.n,) if case.j == 0 else (case.n, case.j)
    y = torch.randint(0, case.v, shape, generator=gen)
    if case.j:
        y[:, -1] = IGNORE  # a padded slot in every row
    for row in case.ignored:
        y[row] = IGNORE
    return h, w, b, y


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("case", CASES)
def test_max_and_mean_logit_values_and_grads(case: Case, impl: str, device: str, gen: torch.Generator) -> None:
    h64, w64, b64, y = _inputs(case, gen)
    valid_tok = (y != IGNORE) if case.j == 0 else (y != IGNORE).any(-1)
    g_mean = torch.randn(case.n, generator=gen, dtype=torch.float64)
    g_logp = torch.randn(y.shape, generator=gen, dtype=torch.float64)

    # Oracle: float64 full logits, plain formulas, autograd.
    leaves64 = [t.clone().requires_grad_() for t in (h64, w64) + ((b64,) if b64 is not None else ())]
    z = logits64(leaves64[0], leaves64[1], leaves64[2] if b64 is not None else None,
                 temperature=case.temperature, softcap=case.softcap)
    logp_all = torch.log_softmax(z, -1)
    yy = y if case.j else y[:, None]
    logp64 = torch.where(yy != IGNORE, logp_all.gather(-1, yy.clamp_min(0)), 0.0).reshape(y.shape)
    max64 = torch.where(valid_tok, z.amax(-1), 0.0).detach()
    mean64 = torch.where(valid_tok, z.mean(-1), 0.0)
    ((g_mean * mean64).sum() + (g_logp * logp64).sum()).backward()

    leaves = [t.float().to(device).requires_grad_() for t in (h64, w64) + ((b64,) if b64 is not None else ())]
    stats = tk.linear_vocab_stats(
        leaves[0], leaves[1], y.to(device), bias=leaves[2] if b64 is not None else None,
        temperature=case.temperature, softcap=case.softcap, impl=impl, max_logit=True, mean_logit=True,
    )
    assert stats.max_logit.shape == valid_tok.shape and stats.mean_logit.shape == valid_tok.shape
    assert stats.max_logit.dtype == torch.float32 and stats.mean_logit.dtype == torch.float32
    assert not stats.max_logit.requires_grad, "max_logit is documented as detached"
    zmax = max(1.0, z.detach().abs().max().item())
    torch.testing.assert_close(stats.max_logit.cpu().double(), max64, rtol=1e-4, atol=1e-5 * zmax)
    torch.testing.assert_close(stats.mean_logit.detach().cpu().double(), mean64.detach(), rtol=1e-4, atol=1e-5 * zmax)
    loss = (g_mean.float().to(device) * stats.mean_logit).sum() + (g_logp.float().to(device) * stats.logp).sum()
    if leaves[0].requires_grad and loss.requires_grad:
        loss.backward()
    # Without case.bias there is no bias leaf on either side: both lists have the same length.
    for name, got, ref in zip(("hidden", "weight", "bias")[: len(leaves)], leaves, leaves64, strict=True):
        expected = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        actual = got.grad if got.grad is not None else torch.zeros_like(got)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual.cpu().double(), expected, rtol=2e-4, atol=2e-4 * scale,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("impl", _impls())
def test_target_is_argmax_exactly_when_its_logit_equals_max_logit(impl: str, device: str,
                                                                   gen: torch.Generator) -> None:
    """The token-accuracy identity: ``logp + lse == max_logit`` iff the target is the argmax."""
    h64, w64, _, _ = _inputs(Case(n=10, v=31, d=16, scale=3.0), gen)
    z = logits64(h64, w64)
    argmax = z.argmax(-1)
    y = torch.where(torch.arange(10) % 2 == 0, argmax, (argmax + 1) % 31)  # half right, half wrong
    stats = tk.linear_vocab_stats(h64.float().to(device), w64.float().to(device), y.to(device), impl=impl,
                                  max_logit=True)
    target_logit = (stats.logp + stats.lse).cpu()
    hit = torch.isclose(target_logit, stats.max_logit.cpu(), rtol=0.0, atol=1e-5)
    assert torch.equal(hit, y == argmax), (hit, y == argmax)


@pytest.mark.parametrize("impl", _impls())
def test_not_asked_for_is_none(impl: str, device: str, gen: torch.Generator) -> None:
    h64, w64, _, y = _inputs(Case(), gen)
    stats = tk.linear_vocab_stats(h64.float().to(device), w64.float().to(device), y.to(device), impl=impl)
    assert stats.max_logit is None and stats.mean_logit is None
    only_mean = tk.linear_vocab_stats(h64.float().to(device), w64.float().to(device), y.to(device), impl=impl,
                                      mean_logit=True)
    assert only_mean.max_logit is None and only_mean.mean_logit is not None


def _bf16_run(impl: str, device: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, g: torch.Tensor):
    hl, wl = (t.to(device).requires_grad_() for t in (h, w))
    stats = tk.linear_vocab_stats(hl, wl, y.to(device), impl=impl, max_logit=True, mean_logit=True, softcap=5.0)
    (g.to(device) * stats.mean_logit).sum().backward()
    return stats.max_logit, stats.mean_logit.detach(), hl.grad, wl.grad


def _normwise(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.cpu().double() - e).abs().max() / max(1.0, e.abs().max().item())).item()


@pytest.mark.parametrize("impl", [p for p in _impls() if p.values[0] != "naive"])
def test_bf16_three_way(impl: str, device: str, gen: torch.Generator) -> None:
    """err(impl in bf16 vs fp64) <= err(naive in bf16 vs fp64) + u (u = 2^-8, one bf16 rounding),
    the fp64 oracle seeing exactly the rounded bf16 inputs."""
    h64, w64, _, y = _inputs(Case(n=11, v=43, d=16, scale=4.0, ignored=(3,)), gen)
    h, w = h64.bfloat16(), w64.bfloat16()
    g = torch.randn(11, generator=gen)
    hr, wr = (t.double().requires_grad_() for t in (h, w))
    z = logits64(hr, wr, softcap=5.0)
    valid = y != IGNORE
    mean64 = torch.where(valid, z.mean(-1), 0.0)
    (g.double() * mean64).sum().backward()
    ref = (torch.where(valid, z.amax(-1), 0.0).detach(), mean64.detach(), hr.grad, wr.grad)
    got = _bf16_run(impl, device, h, w, y, g)
    base = _bf16_run("naive", device, h, w, y, g)
    for name, a, b, e in zip(("max_logit", "mean_logit", "grad hidden", "grad weight"), got, base, ref, strict=True):
        assert a.dtype == (torch.float32 if "grad" not in name else torch.bfloat16), name
        e_impl, e_base = _normwise(a, e), _normwise(b, e)
        assert e_impl <= e_base + 2.0 ** -8, f"{name}: err {e_impl:.3e} > naive bf16 err {e_base:.3e} + 2^-8"
