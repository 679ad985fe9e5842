"""torch.compile: every loss traces with ``fullgraph=True`` (no graph break) and matches eager.

The two passes are ``torch.library`` custom ops with fake implementations, so Dynamo treats them
as opaque nodes of known shape; the losses around them are plain PyTorch. The TDPO step goes through
Inductor (the acceptance check); the other losses use the ``aot_eager`` backend, which runs the same
Dynamo + AOTAutograd tracing (forward and backward graphs) without Inductor's code generation, to
keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
import torch._dynamo.testing

import tokpo_kernels as tk
from oracle.compare import assert_close, atol_scaled
from oracle.preference import make_batch

V = 37


def _inputs(device: str = "cpu") -> Dict[str, torch.Tensor]:
    t = make_batch(2, 5, 8, V, seed=11, bias=True)
    return {k: v.to(device) for k, v in t.items()}


def _compare(step: Callable[..., torch.Tensor], leaves: Dict[str, torch.Tensor], backend: str, **compile_kw) -> None:
    """Eager vs compiled (fullgraph): loss, metrics and the gradients of every float leaf."""
    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True, **compile_kw)):
        ins = {k: (v.clone().requires_grad_() if v.is_floating_point() and not k.startswith("ref") else v)
               for k, v in leaves.items()}
        out = fn(**ins)
        (out.loss * 1.7).backward()
        grads = {k: v.grad for k, v in ins.items() if isinstance(v, torch.Tensor) and v.grad is not None}
        results.append((out, grads))
    (eager, eg), (comp, cg) = results
    assert_close(comp.loss, eager.loss, rtol=1e-6, atol=atol_scaled(1e-6, eager.loss), name="loss")
    assert set(comp.metrics) == set(eager.metrics)
    for k in eager.metrics:
        assert_close(comp.metrics[k], eager.metrics[k], rtol=1e-6, atol=atol_scaled(1e-6, eager.metrics[k]), name=k)
    assert set(cg) == set(eg) and eg, "expected gradients on the policy leaves"
    for k in eg:
        assert_close(cg[k], eg[k], rtol=1e-5, atol=atol_scaled(1e-6, eg[k]), name=f"grad {k}")


def _tdpo(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias, impl="torch"):
    return tk.tdpo_loss(hidden, weight, targets, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, impl=impl)


def test_compiled_tdpo_step_has_no_graph_break_and_matches_eager() -> None:
    t = _inputs()
    explanation = torch._dynamo.explain(_tdpo)(**t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    _compare(_tdpo, t, "inductor")


def _tidpo(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    w = torch.sigmoid(hidden.detach().sum(-1))
    return tk.tidpo_loss(hidden, weight, targets, ref_hidden, ref_weight, token_weights=w, bias=bias,
                         ref_bias=ref_bias, impl="torch")


def _dpo(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    return tk.dpo_loss(hidden, weight, targets, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, impl="torch")


def _ppo(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    adv = torch.linspace(-1, 1, targets.shape[0])
    return tk.ppo_loss(hidden, weight, targets, adv, ref_hidden=ref_hidden, ref_weight=ref_weight, bias=bias,
                       ref_bias=ref_bias, entropy_coef=0.01, impl="torch")


def _tlpo(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    cand = torch.stack([torch.arange(8) * 4 + i for i in range(4)])  # (G=4, K=8) distinct ids < 37
    cand[1, 6:] = -100
    adv = torch.linspace(-1, 1, 32).reshape(4, 8)
    return tk.tlpo_loss(hidden[:, 0], weight, cand, adv, ref_hidden[:, 0], ref_weight, impl="torch")


def _cross_entropy(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    return tk.linear_cross_entropy(hidden, weight, targets, bias=bias, label_smoothing=0.1, z_loss=1e-3, impl="torch")


def _stats(hidden, weight, targets, ref_hidden, ref_weight, bias, ref_bias):
    s = tk.linear_vocab_stats(hidden, weight, targets, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              kl=True, entropy=True, impl="torch")
    loss = (s.logp * 0.3).sum() + (s.lse * 0.1).sum() + s.kl.sum() - (s.entropy * 0.2).sum()
    return tk.LossOutput(loss, {"ref_logp": s.ref_logp.detach()})


@pytest.mark.parametrize("step", [_tidpo, _dpo, _ppo, _tlpo, _cross_entropy, _stats], ids=lambda f: f.__name__[1:])
def test_every_loss_compiles_fullgraph(step) -> None:
    _compare(step, _inputs(), "aot_eager")


def test_new_lengths_reuse_the_dynamic_graph() -> None:
    """The fake implementations are shape-generic: after Dynamo's one automatic-dynamic recompile
    (the second length), a third sequence length reuses the dynamic graph."""
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(_tdpo, backend=counter, fullgraph=True)
    for T in (5, 7, 9):
        t = make_batch(2, T, 8, V, seed=T, bias=True)
        t["hidden"].requires_grad_()
        fn(**t).loss.backward()
        assert t["hidden"].grad is not None
    assert counter.frame_count == 2, f"compiled {counter.frame_count} frames for 3 lengths"


@pytest.mark.impls("interpreted")
def test_triton_impl_compiles_fullgraph(impl: str, impl_device: str) -> None:
    """The Triton implementation behind the same custom op (interpreted on CPU, compiled on a GPU)."""
    t = _inputs(impl_device)
    step = lambda **k: _tdpo(**k, impl=impl)  # noqa: E731
    _compare(step, t, "inductor" if impl_device == "cuda" else "aot_eager")


def _op_samples():
    gen = torch.Generator().manual_seed(3)
    n, j, d, v = 6, 2, 5, 13
    h = torch.randn(d, n, generator=gen).t()  # transposed: outputs must still be contiguous
    w = torch.randn(v, d, generator=gen)
    b = torch.randn(v, generator=gen)
    ids = torch.randint(0, v, (n, j), generator=gen)
    ids[1] = -1
    tvalid = ids >= 0
    rh, rw = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen)
    return h, w, b, rh, rw, ids, tvalid


def test_custom_ops_pass_opcheck() -> None:
    """``torch.library.opcheck``: schema, fake (meta) implementation, autograd registration and
    Dynamo/AOT tracing of both ops agree with the real implementation (strides included)."""
    from tokpo_kernels.ops.vocab_stats import vocab_stats_backward, vocab_stats_forward

    h, w, b, rh, rw, ids, tvalid = _op_samples()
    for flag, ref in ((True, True), (False, False)):
        kwargs = dict(hidden=h.clone().requires_grad_(), weight=w.clone().requires_grad_(), bias=b,
                      ref_hidden=rh if ref else None, ref_weight=rw if ref else None, ref_bias=None, ids=ids,
                      target_valid=tvalid, temperature=0.9, softcap=None, kl=flag, entropy=flag, max_logit=flag,
                      logit_sum=flag, filter_eps=None, impl="torch", group_name="")
        torch.library.opcheck(vocab_stats_forward, (), kwargs)
    n = ids.shape[0]
    kwargs = dict(hidden=h, weight=w, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=None, ids=ids, target_valid=tvalid,
                  lse=torch.randn(n), ref_lse=torch.randn(n), entropy=torch.rand(n), g_lse=torch.randn(n),
                  g_tgt=torch.randn(ids.shape), g_kl=torch.randn(n), g_entropy=torch.randn(n),
                  g_logit_sum=torch.randn(n),
                  temperature=0.9, softcap=3.0, filter_eps=None, impl="torch", group_name="", need_dh=True,
                  need_dw=True, need_db=True)
    torch.library.opcheck(vocab_stats_backward, (), kwargs)
