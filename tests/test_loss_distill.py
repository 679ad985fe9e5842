"""Distillation (``distill_loss``) against an independent float64 oracle, on every backend, and Liger.

The oracle materialises the full float64 logits of student and teacher (each with its own hidden
size), forms ``Σ_v q (log q − log p)`` and the label cross-entropy token by token (docs/methods.md
§5). Shapes are tiny because the Triton backend runs under the interpreter on CPU.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

import tokpo_kernels as tk
from oracle import assert_close, log_softmax64, logits64
from oracle.policy import assert_loss_matches
from test_loss_signatures import PAIR, REQUIRED, SHARED, K, P, described

IGN = -100
RTOL = 2e-4  # fp32 against the float64 oracle


def distill64(h, w, y, th, tw, *, temperature=1.0, kl_weight=1.0, ce_weight=0.0, bias=None, teacher_bias=None,
              softcap=None, ignore_index=IGN) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """kl_weight·T²·mean_t KL(q_T ‖ p_T) + ce_weight·mean_t CE(p_1, y) over the labelled tokens."""
    lp = log_softmax64(logits64(h, w, bias, temperature=temperature, softcap=softcap))
    lp1 = log_softmax64(logits64(h, w, bias, temperature=1.0, softcap=softcap))
    with torch.no_grad():
        lq = log_softmax64(logits64(th, tw, teacher_bias, temperature=temperature, softcap=softcap))
    kls, ces = [], []
    for i in range(y.numel()):
        idx = torch.unravel_index(torch.tensor(i), y.shape)
        label = int(y[idx])
        if label == ignore_index:
            continue
        kls.append((lq[idx].exp() * (lq[idx] - lp[idx])).sum())
        ces.append(-lp1[idx][label])
    zero = (lp.sum() + lp1.sum()) * 0.0
    n = len(kls)
    kl = sum(kls) / n if n else zero
    ce = sum(ces) / n if n else zero
    loss = kl_weight * temperature ** 2 * kl + ce_weight * ce
    metrics = {"kl": kl, "num_tokens": torch.tensor(float(n), dtype=torch.float64)}
    if ce_weight > 0:
        metrics["ce"] = ce
    return loss, {k: v.detach() for k, v in metrics.items()}


def make_batch(rows=3, t=4, d=5, d_teacher=7, v=17, seed=0, *, bias=False):
    """Student (D = 5) and teacher (D_teacher = 7, a different hidden size) as float64 leaves; labels
    with a prompt prefix, padding, and a fully ignored row."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, t, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.8
    th = torch.randn(rows, t, d_teacher, generator=gen, dtype=torch.float64)
    tw = torch.randn(v, d_teacher, generator=gen, dtype=torch.float64) * 0.8
    y = torch.randint(0, v, (rows, t), generator=gen)
    y[:, 0] = IGN
    y[0, -1] = IGN
    y[-1] = IGN
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    tb = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    return dict(h=h, w=w, th=th, tw=tw, y=y, b=b, tb=tb, gen=gen)


CASES = {
    "kl_only": dict(),
    "temperature_ce_biases": dict(bias=True, temperature=2.0, kl_weight=0.7, ce_weight=0.5),
    "t1_ce_reuses_pass": dict(temperature=1.0, ce_weight=1.3),
    "softcap_cold": dict(bias=True, temperature=0.6, ce_weight=0.2, softcap=3.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_distill_matches_float64_oracle(case: str, impl: str, impl_device: str) -> None:
    opts = dict(CASES[case])
    bat = make_batch(seed=len(case), bias=opts.pop("bias", False))
    student = [t for t in (bat["h"], bat["w"], bat["b"]) if t is not None]
    x = [t.detach().float().to(impl_device).requires_grad_() for t in student]
    # The teacher is a leaf that asks for a gradient too: it must not get one.
    th = bat["th"].float().to(impl_device).requires_grad_()
    tw = bat["tw"].float().to(impl_device).requires_grad_()
    tb = None if bat["tb"] is None else bat["tb"].float().to(impl_device)
    out = tk.distill_loss(x[0], x[1], bat["y"].to(impl_device), th, tw, bias=x[2] if len(x) > 2 else None,
                          teacher_bias=tb, impl=impl, **opts)
    cot = float(torch.rand((), generator=bat["gen"], dtype=torch.float64)) + 0.5  # a random cotangent
    (out.loss * cot).backward()

    ref = [t.detach().clone().requires_grad_() for t in student]
    loss64, metrics64 = distill64(ref[0], ref[1], bat["y"], bat["th"], bat["tw"],
                                  bias=ref[2] if len(ref) > 2 else None, teacher_bias=bat["tb"], **opts)
    grads64 = torch.autograd.grad(loss64 * cot, ref)

    names = [f"grad {n}" for n in ("hidden", "weight", "bias")[: len(x)]]
    assert_loss_matches(out, loss64, metrics64, list(zip([t.grad for t in x], grads64, names, strict=True)), RTOL)
    assert th.grad is None and tw.grad is None, "the teacher must not receive a gradient"


def test_distill_of_the_student_itself_is_pure_cross_entropy() -> None:
    """Teacher == student: KL = 0, so the loss is ce_weight · CE at T = 1, for any temperature."""
    bat = make_batch(d_teacher=5)
    h, w, y = bat["h"].float(), bat["w"].float(), bat["y"]
    out = tk.distill_loss(h, w, y, h, w, temperature=1.7, ce_weight=0.4, impl="torch")
    ce = tk.linear_cross_entropy(h, w, y, impl="torch").loss
    assert_close(out.metrics["kl"], torch.zeros(()), rtol=0.0, atol=1e-6, name="kl")
    assert_close(out.loss, 0.4 * ce, rtol=1e-6, atol=1e-6, name="loss")


def test_distill_module_matches_functional() -> None:
    bat = make_batch(seed=2)
    args = (bat["h"].float(), bat["w"].float(), bat["y"], bat["th"].float(), bat["tw"].float())
    got = tk.DistillLoss(temperature=2.0, ce_weight=0.1, impl="torch")(*args)
    assert torch.equal(got.loss, tk.distill_loss(*args, temperature=2.0, ce_weight=0.1, impl="torch").loss)


def test_distill_matches_liger_jsd_with_beta_zero() -> None:
    """Liger's ``LigerFusedLinearJSDLoss(beta=0)`` is the same quantity with ``weight_soft_loss = T²``
    (Liger does not scale by T²) and its hard loss at T = 1; teacher and student hidden sizes differ."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    T, ce_weight = 2.0, 0.3
    bat = make_batch(seed=4, bias=True)
    leaves = [bat[k].float().requires_grad_() for k in ("h", "w", "b")]
    th, tw, tb, y = bat["th"].float(), bat["tw"].float(), bat["tb"].float(), bat["y"]
    ours = tk.distill_loss(leaves[0], leaves[1], y, th, tw, bias=leaves[2], teacher_bias=tb, temperature=T,
                           ce_weight=ce_weight, impl="torch").loss
    g_ours = torch.autograd.grad(ours, leaves)
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=ce_weight, weight_soft_loss=T * T, beta=0.0, ignore_index=IGN,
                                    temperature=T, compiled=False)
    d, dt = leaves[0].shape[-1], th.shape[-1]
    theirs = liger(leaves[0].reshape(-1, d), leaves[1], th.reshape(-1, dt), tw, y.reshape(-1), leaves[2], tb)
    g_theirs = torch.autograd.grad(theirs, leaves)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6, name="loss vs Liger")
    for name, a, e in zip(("hidden", "weight", "bias"), g_ours, g_theirs, strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-6, name=f"grad {name} vs Liger")


def _valid():
    bat = make_batch()
    return bat["h"].float(), bat["w"].float(), bat["y"], bat["th"].float(), bat["tw"].float()


@pytest.mark.parametrize(
    "mutate, kwargs, exc, pattern",
    [
        (lambda a: a, {"temperature": 0.0}, ValueError, r"temperature: expected a finite number > 0"),
        (lambda a: a, {"temperature": 1e3}, ValueError, r"temperature: expected a finite number > 0 and <= 100"),
        (lambda a: a, {"kl_weight": -1.0}, ValueError, r"kl_weight: expected a finite number >= 0"),
        (lambda a: a, {"ce_weight": float("nan")}, ValueError, r"ce_weight"),
        (lambda a: a[:3] + (a[3][:, :2], a[4]), {}, ValueError,
         r"teacher_hidden: expected shape \(3, 4\) \+ \(D_teacher,\)"),
        (lambda a: a[:4] + (a[4][:, :3],), {}, ValueError, r"teacher_weight: expected shape \(17, 7\)"),
        (lambda a: a[:4] + (a[4][:5],), {}, ValueError, r"teacher_weight: expected shape \(17, 7\)"),
        (lambda a: a[:3] + (a[3].long(), a[4]), {}, TypeError, r"teacher_hidden: expected a floating-point tensor"),
        (lambda a: a, {"teacher_bias": torch.zeros(5)}, ValueError, r"teacher_bias: expected shape \(17,\)"),
        (lambda a: a, {"teacher_bias": torch.zeros(17, dtype=torch.long)}, TypeError,
         r"teacher_bias: expected a floating-point tensor"),
        (lambda a: a, {"ref_bias": torch.zeros(17)}, TypeError, r"ref_bias"),
        (lambda a: (a[0], a[1], a[2][:, :2]) + a[3:], {}, ValueError, r"targets: expected shape"),
    ],
)
def test_distill_validation(mutate, kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        tk.distill_loss(*mutate(_valid()), **kwargs)


def test_signature_is_pinned() -> None:
    """The public signature, parameter by parameter (a contract: keywords may only be appended)."""
    own = [("teacher_hidden", P, REQUIRED), ("teacher_weight", P, REQUIRED), ("temperature", K, 1.0),
           ("kl_weight", K, 1.0), ("ce_weight", K, 0.0), ("teacher_bias", K, None)]
    shared = [o for o in SHARED if o[0] not in ("ref_bias", "temperature")]
    assert described(tk.distill_loss) == PAIR + own + shared
