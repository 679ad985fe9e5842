"""The two Triton strategies' structure: what the backward computes with, and what it never does.

Values and gradients of both strategies against the float64 oracle are tested with every other
backend (``impl`` parametrisation from the registry); here the properties of the design are:

* the backward is deterministic, bit for bit, run to run;
* per vocabulary chunk it runs one ``∂z`` kernel and GEMMs, with every ``∂W`` row written once in
  the weight's dtype: no (V, D) fp32 buffer and no zero-fill of one, no atomics (the sm_90 machine
  code is checked by ``tests/test_cuda_codegen.py``);
* ignored rows are compacted once per step (one argsort, in the forward);
* the chunk width follows the budget (``kernels/chunking.py``) and does not change the result;
* ``impl="triton"`` runs the device's default strategy.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokpo_kernels as tk
from oracle import assert_close, atol_scaled, log_softmax64, logits64
from tokpo_kernels.kernels import chunking
from tokpo_kernels.ops import vocab_stats as vocab_stats_op

pytestmark = pytest.mark.impls("interpreted")

N, D, V = 21, 24, 150


def _case(gen: torch.Generator, dtype: torch.dtype, device: str):
    h = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.4
    b = torch.randn(V, generator=gen) * 0.1
    rh = h + 0.1 * torch.randn(N, D, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    y[:4] = -100  # prompt tokens: compacted away
    leaves = [x.to(device=device, dtype=dtype).requires_grad_(i < 3) for i, x in enumerate((h, w, b, rh))]
    cot = {k: torch.randn(N, generator=gen, dtype=torch.float64) for k in ("logp", "lse", "kl", "entropy")}
    return leaves, y.to(device), cot


def _step(impl: str, leaves, y, cot, **kw) -> Tuple[torch.Tensor, ...]:
    h, w, b, rh = leaves
    s = tk.linear_vocab_stats(h, w, y, bias=b, ref_hidden=rh, ref_weight=w.detach(), kl=True, entropy=True,
                              impl=impl, **kw)
    loss = sum((cot[k].to(s.lse.device) * getattr(s, k).double()).sum() for k in cot)
    grads = torch.autograd.grad(loss, (h, w, b))
    return (s.logp, s.lse, s.kl, s.entropy) + tuple(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_is_deterministic_bit_for_bit(impl, impl_device, gen, monkeypatch, dtype):
    monkeypatch.setenv(chunking.COLUMNS_ENV, "64")  # three chunks: the cross-chunk ∂h sum is exercised
    leaves, y, cot = _case(gen, dtype, impl_device)
    first = _step(impl, leaves, y, cot)
    second = _step(impl, leaves, y, cot)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c), "two runs of the same step must agree bit for bit"


class _Recorder(TorchDispatchMode):
    """Records every aten op and the (shape, dtype) of every tensor it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []
        self.created: List[Tuple[Tuple[int, ...], torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops.append(name)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.created.append((tuple(t.shape), t.dtype, name))
        return out


def test_backward_is_dz_chunks_and_gemms(impl, impl_device, gen, monkeypatch):
    """Per sub-chunk one ∂z kernel and one ∂W GEMM (plus the logit recompute GEMMs of the chunked
    strategy), per window one ∂h GEMM; ∂W written in the weight's dtype chunk by chunk, never as a
    zero-filled (V, D) fp32 accumulator; one argsort per step (the forward's)."""
    monkeypatch.setenv(chunking.COLUMNS_ENV, "32")  # sub-chunks of 32 columns, ∂h windows of 64
    subs, windows = -(-V // 32), -(-V // 64)
    leaves, y, cot = _case(gen, torch.bfloat16, impl_device)
    from tokpo_kernels.kernels import backward_chunks

    launches = {"dz": 0}
    for name in ("launch_dz_from_logits", "launch_dz_recompute"):
        real = getattr(backward_chunks, name)

        def spy(*a, _real=real, **k):
            launches["dz"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(backward_chunks, name, spy)
    # The backend runs inside the custom ops, where a dispatch mode entered outside sees only the
    # op itself: record inside, around the backend's two passes (ops._backend is the seam for it).
    fwd, bwd = _Recorder(), _Recorder()

    class Recorded:
        def __init__(self, backend):
            self.backend = backend

        def forward(self, *args):
            with fwd:
                return self.backend.forward(*args)

        def backward(self, *args):
            with bwd:
                return self.backend.backward(*args)

    real_backend = vocab_stats_op._backend
    monkeypatch.setattr(vocab_stats_op, "_backend", lambda name: Recorded(real_backend(name)))
    h, w, b, rh = leaves
    s = tk.linear_vocab_stats(h, w, y, bias=b, ref_hidden=rh, ref_weight=w.detach(), kl=True, impl=impl)
    loss = (s.logp.double() * cot["logp"]).sum() + (s.kl.double() * cot["kl"]).sum()
    dh, dw, db = torch.autograd.grad(loss, (h, w, b))
    assert launches["dz"] == subs
    gemms = [op for op in bwd.ops if op in ("mm", "addmm", "addmm_")]
    recompute = subs * 2 if impl == "triton_chunked" else 0  # policy + reference logits (KL flows)
    assert len(gemms) == recompute + subs + windows, f"expected {recompute} + {subs} + {windows} GEMMs, got {gemms}"
    assert fwd.ops.count("argsort") == 1 and bwd.ops.count("argsort") == 0, "compaction once per step"
    full_fp32 = [c for c in bwd.created if c[0] == (V, D) and c[1] == torch.float32]
    assert not full_fp32, f"a (V, D) fp32 buffer was created: {full_fp32}"
    assert dw.dtype == torch.bfloat16 and not [c for c in bwd.created if c[0] == (V, D) and c[2] == "zeros"]


@pytest.mark.parametrize("columns", ["16", "128", "1000"])
def test_chunk_width_does_not_change_the_result(impl, impl_device, gen, monkeypatch, columns):
    """Any chunk width gives the float64 oracle's values and gradients (fp32 inputs)."""
    monkeypatch.setenv(chunking.COLUMNS_ENV, columns)
    leaves, y, cot = _case(gen, torch.float32, impl_device)
    got = _step(impl, leaves, y, cot)
    h, w, b, rh = (x.detach().double().cpu().requires_grad_(i < 3) for i, x in enumerate(leaves))
    yc = y.cpu()
    valid = yc != -100
    logp = log_softmax64(logits64(h, w, b))
    logq = log_softmax64(logits64(rh, w.detach()))  # _step passes no ref_bias
    safe = yc.clamp_min(0)
    want_logp = torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0)
    lse = torch.logsumexp(logits64(h, w, b), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    ent = -(logp.exp() * logp).sum(-1)
    vals = [want_logp] + [torch.where(valid, x, 0.0) for x in (lse, kl, ent)]
    loss = sum((cot[k] * v).sum() for k, v in zip(("logp", "lse", "kl", "entropy"), vals, strict=True))
    grads = torch.autograd.grad(loss, (h, w, b))
    for name, g, e in zip(("logp", "lse", "kl", "entropy", "dh", "dw", "db"), got, vals + list(grads), strict=True):
        # fp32 tolerance of the suite: normwise 1e-4 · max(1, max|expected|) (docs/numerics.md).
        assert_close(g.cpu().double(), e.detach(), rtol=0.0, atol=atol_scaled(1e-4, e.detach()), name=name)


def test_triton_runs_the_default_strategy(device, gen, monkeypatch):
    """``impl="triton"`` dispatches to ``DEFAULT_STRATEGY`` of the device type."""
    pytest.importorskip("triton")
    from tokpo_kernels.kernels import launch
    from tokpo_kernels.kernels.strategy import DEFAULT_STRATEGY

    seen = []
    real_fwd, real_bwd = launch.triton_forward, launch.triton_backward
    monkeypatch.setattr(launch, "triton_forward", lambda *a: seen.append(a[-1]) or real_fwd(*a))
    monkeypatch.setattr(launch, "triton_backward", lambda *a: seen.append(a[-1]) or real_bwd(*a))
    leaves, y, cot = _case(gen, torch.float32, device)
    _step("triton", leaves, y, cot)
    assert seen == [DEFAULT_STRATEGY[torch.device(device).type]] * 2


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), "0.1", True])
def test_chunk_budget_is_validated(bad):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises((TypeError, ValueError), match="chunk_budget"):
        tk.linear_vocab_stats(h, w, y, chunk_budget=bad)


def test_chunk_plan_follows_the_budget(monkeypatch):
    """At the Llama-3-8B head the chunk buffers fit the allowance, in whole 128-column steps."""
    monkeypatch.delenv(chunking.COLUMNS_ENV, raising=False)
    monkeypatch.delenv(chunking.BUDGET_ENV, raising=False)
    n, v, d = 16384, 128256, 4096
    floor = chunking.floor_bytes(n, v, d, 2, 2)
    assert floor == v * d * 2 + n * d * 6
    allowed = 0.10 * floor + n * d * 2  # the returned ∂h is not alive during the chunk loop
    for strategy in chunking.STRATEGIES:
        for has_ref, kl_grad in ((False, False), (True, False), (True, True)):
            plan = chunking.chunk_plan(strategy, n, v, d, in_bytes=2, has_ref=has_ref, kl_grad=kl_grad)
            assert plan.forward % 128 == 0 and plan.sub % 128 == 0 and plan.window % plan.sub == 0
            assert plan.forward * n * 4 * (2 if has_ref else 1) <= allowed
            logits = n * 4 * (2 if kl_grad else 1) if strategy == "chunked" else 0
            used = plan.sub * (logits + d * 4) + plan.window * n * 2
            assert used <= allowed, (strategy, has_ref, kl_grad, plan)
            # The ∂h GEMM stays compute-bound (module docstring of chunking): a window of ≥ 2048 columns.
            assert plan.window >= chunking.MIN_WINDOW, plan
    # Every core-tier head and N (and a tight case found by the cost model's sweep): the ∂h window
    # never falls below MIN_WINDOW, and sub-chunks tile it.
    for rows, vocab, hidden in ((4096, 152064, 3584), (65536, 256000, 2304), (26624, 256000, 2304)):
        for strategy in chunking.STRATEGIES:
            plan = chunking.chunk_plan(strategy, rows, vocab, hidden, in_bytes=2, has_ref=True, kl_grad=True)
            assert plan.window >= chunking.MIN_WINDOW and plan.window % plan.sub == 0, (rows, vocab, strategy, plan)
    wide = chunking.chunk_plan("chunked", n, v, d, in_bytes=2, budget=0.5)
    assert wide.window > chunking.chunk_plan("chunked", n, v, d, in_bytes=2).window
    monkeypatch.setenv(chunking.BUDGET_ENV, "0.5")
    assert chunking.chunk_plan("chunked", n, v, d, in_bytes=2) == wide
    monkeypatch.setenv(chunking.COLUMNS_ENV, "100")
    assert chunking.chunk_plan("chunked", n, v, d, in_bytes=2) == chunking.ChunkPlan(100, 100, 200)
    # Far more rows than columns: at least one 128-column step, never more than V.
    monkeypatch.delenv(chunking.COLUMNS_ENV)
    assert chunking.chunk_plan("chunked", 10**7, 50, 64, in_bytes=4) == chunking.ChunkPlan(50, 50, 50)


_BAD_ENVIRONMENT = [(chunking.BUDGET_ENV, "zero"), (chunking.BUDGET_ENV, "-1"), (chunking.BUDGET_ENV, "inf"),
                    (chunking.BUDGET_ENV, "nan"), (chunking.BUDGET_ENV, "200"),
                    (chunking.COLUMNS_ENV, "0"), (chunking.COLUMNS_ENV, "wide")]


@pytest.mark.parametrize("env,value", _BAD_ENVIRONMENT)
def test_chunk_environment_is_validated(monkeypatch, env, value):
    monkeypatch.delenv(chunking.COLUMNS_ENV, raising=False)
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env):
        chunking.chunk_plan("chunked", 10, 300, 8, in_bytes=4)


@pytest.mark.parametrize("env,value", _BAD_ENVIRONMENT[::2])
def test_bad_chunk_environment_is_refused_before_any_kernel(impl, impl_device, monkeypatch, env, value):
    """Every Triton strategy refuses a malformed chunk variable at the forward, before its first
    kernel, even where no chunk is sized (the streaming forward, under no_grad)."""
    monkeypatch.delenv(chunking.COLUMNS_ENV, raising=False)
    monkeypatch.setenv(env, value)
    from tokpo_kernels.kernels import launch

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched before the malformed variable was refused")

    for name in ("launch_forward_stats", "launch_row_stats", "launch_target_logits"):
        monkeypatch.setattr(launch, name, no_kernel)
    h, w, y = torch.randn(6, 16), torch.randn(40, 16), torch.randint(0, 40, (6,))
    with torch.no_grad(), pytest.raises(ValueError, match=env):
        tk.linear_vocab_stats(h.to(impl_device), w.to(impl_device), y.to(impl_device), impl=impl)
