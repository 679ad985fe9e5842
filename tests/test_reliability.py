"""Reliability (issue 13): inputs that used to crash or silently misbehave either work exactly or are
refused clearly, on every backend.

* a bias (or ``ref_bias``) of another dtype than its weight: used at the accumulation precision on
  every backend, its gradient in its own dtype;
* non-finite values (NaN, ±inf) in ignored rows reach no statistic and no gradient (``naive`` too);
* ``torch.func.grad`` / ``torch.func.vjp`` through the statistics and a loss match plain autograd;
  ``torch.vmap`` is refused with a clear error;
* meta tensors: shapes and dtypes of every statistic, of losses and of the backward, nothing read;
* ``validate=`` of the target-range check: ``"async"`` (device assert on CUDA) or ``"sync"`` (one
  host sync, ``ValueError``); CUDA is simulated on CPU by patching the device test.

Every comparison is against the independent float64 oracle (``tests/oracle``) or, for the functorch
transforms, against plain autograd of the same backend.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch

import tokpo_kernels as tk
from oracle import assert_close, logits64
from oracle.compare import atol_normwise, atol_scaled
from oracle.stats import oracle_vocab_stats
from tokpo_kernels import _validation
from tokpo_kernels.backends import backend_entry, impl_choices

DIFF = ("logp", "lse", "kl", "entropy", "mean_logit")


def _supports(impl: str, *dtypes: torch.dtype) -> None:
    missing = [d for d in dtypes if d not in backend_entry(impl).dtypes]
    if missing:
        pytest.skip(f"impl={impl!r} does not take {missing}")


def _leaves(gen: torch.Generator, n: int = 9, v: int = 37, d: int = 16, d_ref: int = 12) -> Dict[str, torch.Tensor]:
    """float64 leaves with ignored tokens (rows 1, 4 and 7)."""
    y = torch.randint(0, v, (n,), generator=gen)
    y[1::3] = -100
    return dict(
        hidden=torch.randn(n, d, generator=gen, dtype=torch.float64),
        weight=torch.randn(v, d, generator=gen, dtype=torch.float64) / d ** 0.5 * 2,
        bias=torch.randn(v, generator=gen, dtype=torch.float64) * 0.5,
        ref_hidden=torch.randn(n, d_ref, generator=gen, dtype=torch.float64),
        ref_weight=torch.randn(v, d_ref, generator=gen, dtype=torch.float64) / d_ref ** 0.5 * 2,
        ref_bias=torch.randn(v, generator=gen, dtype=torch.float64) * 0.5,
        targets=y,
    )


def _cotangents(gen: torch.Generator, n: int) -> Dict[str, torch.Tensor]:
    return {k: torch.randn(n, generator=gen, dtype=torch.float64) for k in DIFF}


def _objective(stats, cot: Dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((getattr(stats, k).double() * cot[k].to(getattr(stats, k).device)).sum() for k in DIFF)


def _oracle(leaves: Dict[str, torch.Tensor], cot: Dict[str, torch.Tensor]):
    """float64 statistics (with ``mean_logit``) and gradients of ``_objective`` w.r.t. h, W, b."""
    grads = {k: leaves[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    s = oracle_vocab_stats(grads["hidden"], grads["weight"], leaves["targets"], bias=grads["bias"],
                           ref_hidden=leaves["ref_hidden"], ref_weight=leaves["ref_weight"],
                           ref_bias=leaves["ref_bias"], kl=True, entropy=True)
    z = logits64(grads["hidden"], grads["weight"], grads["bias"])
    s.mean_logit = torch.where(s.mask, z.mean(-1), torch.zeros((), dtype=torch.float64))
    s.max_logit = torch.where(s.mask, z.detach().amax(-1), torch.zeros((), dtype=torch.float64))
    _objective(s, cot).backward()
    return s, {k: t.grad for k, t in grads.items()}


def _run(leaves: Dict[str, torch.Tensor], cot: Dict[str, torch.Tensor], impl: str, device: str,
         dtypes: Dict[str, torch.dtype], **kw):
    """The library's statistics and gradients for leaves cast to ``dtypes`` (float32 by default)."""
    ins = {k: (t.to(device=device, dtype=dtypes.get(k, torch.float32)) if t.is_floating_point() else t.to(device))
           for k, t in leaves.items()}
    for k in ("hidden", "weight", "bias"):
        ins[k].requires_grad_()
    s = tk.linear_vocab_stats(ins["hidden"], ins["weight"], ins["targets"], bias=ins["bias"],
                              ref_hidden=ins["ref_hidden"], ref_weight=ins["ref_weight"], ref_bias=ins["ref_bias"],
                              kl=True, entropy=True, max_logit=True, mean_logit=True, impl=impl, **kw)
    _objective(s, cot).backward()
    return s, {k: ins[k].grad for k in ("hidden", "weight", "bias")}, ins


def _assert_matches(got, got_grads, want, want_grads) -> None:
    for k in DIFF + ("ref_logp", "max_logit"):
        e = getattr(want, k)
        assert_close(getattr(got, k), e, rtol=1e-4, atol=atol_scaled(1e-4, e), name=k)
    for k, e in want_grads.items():
        # A gradient returned in a narrower dtype than fp32 carries its final rounding (one unit roundoff).
        narrow = got_grads[k].dtype in (torch.bfloat16, torch.float16)
        rounding = torch.finfo(got_grads[k].dtype).eps / 2 if narrow else 0.0
        assert_close(got_grads[k], e, rtol=rounding, atol=atol_normwise(1e-4, 1e-4, e), name=f"grad {k}")


# --------------------------------------------------------------------------------------------
# A bias (or ref_bias) of another dtype than its weight
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_bias_of_another_dtype_than_the_weight(impl: str, impl_device: str, bias_dtype: torch.dtype,
                                               gen: torch.Generator) -> None:
    """fp32 heads with a bias and a ref_bias of another dtype: as exact as same-dtype biases, with the
    bias at its own values (the oracle sees them unrounded) and ``∂b`` in the bias's dtype."""
    leaves = _leaves(gen)
    for k in ("bias", "ref_bias"):  # values the narrow dtypes hold exactly
        leaves[k] = leaves[k].to(bias_dtype).double()
    cot = _cotangents(gen, leaves["hidden"].shape[0])
    want, want_grads = _oracle(leaves, cot)
    got, got_grads, _ = _run(leaves, cot, impl, impl_device, {"bias": bias_dtype, "ref_bias": bias_dtype})
    assert got_grads["bias"].dtype == bias_dtype and got.lse.dtype == torch.float32
    _assert_matches(got, got_grads, want, want_grads)


@pytest.mark.parametrize("weight_dtype,bias_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
                                                     (torch.float16, torch.float32), (torch.float64, torch.float32)],
                         ids=str)
def test_bias_is_used_at_the_accumulation_precision(impl: str, impl_device: str, weight_dtype: torch.dtype,
                                                    bias_dtype: torch.dtype, gen: torch.Generator) -> None:
    """The documented rule: a bias of another dtype enters at ``accum_dtype(weight.dtype)`` (fp32 for
    bf16/fp16 heads, fp64 for fp64 ones), so the call equals the one with the bias cast to that dtype
    by the caller, bit for bit; its gradient comes back in the bias's own dtype."""
    _supports(impl, weight_dtype)
    acc = torch.promote_types(weight_dtype, torch.float32)
    leaves = _leaves(gen)
    leaves["bias"] = leaves["bias"].to(bias_dtype).double()
    leaves["ref_bias"] = leaves["ref_bias"].to(bias_dtype).double()
    cot = _cotangents(gen, leaves["hidden"].shape[0])
    heads = {k: weight_dtype for k in ("hidden", "weight", "ref_hidden", "ref_weight")}
    got, got_grads, _ = _run(leaves, cot, impl, impl_device, {**heads, "bias": bias_dtype, "ref_bias": bias_dtype})
    want, want_grads, _ = _run(leaves, cot, impl, impl_device, {**heads, "bias": acc, "ref_bias": acc})
    for k in DIFF + ("ref_logp", "max_logit"):
        torch.testing.assert_close(getattr(got, k), getattr(want, k), rtol=0, atol=0, msg=k)
    for k in ("hidden", "weight"):
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=0, atol=0, msg=k)
    assert got_grads["bias"].dtype == bias_dtype
    torch.testing.assert_close(got_grads["bias"], want_grads["bias"].to(bias_dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Non-finite values in ignored rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_values_in_ignored_rows_reach_nothing(impl: str, impl_device: str, bad: float,
                                                        gen: torch.Generator) -> None:
    """Ignored rows of ``hidden`` and ``ref_hidden`` hold NaN/±inf: every statistic, ``∂h``, ``∂W`` and
    ``∂b`` equal the oracle's on the same inputs with those rows zeroed, and ``∂h`` is 0 there."""
    leaves = _leaves(gen)
    ignored = leaves["targets"] == -100
    cot = _cotangents(gen, leaves["hidden"].shape[0])
    want, want_grads = _oracle(leaves, cot)  # the ignored rows hold ordinary values here
    poisoned = dict(leaves)
    for k in ("hidden", "ref_hidden"):
        poisoned[k] = leaves[k].clone()
        poisoned[k][ignored] = bad
    got, got_grads, _ = _run(poisoned, cot, impl, impl_device, {})
    _assert_matches(got, got_grads, want, want_grads)
    assert bool((got_grads["hidden"][ignored.to(impl_device)] == 0).all())


# --------------------------------------------------------------------------------------------
# torch.func
# --------------------------------------------------------------------------------------------


def _f32(leaves: Dict[str, torch.Tensor], device: str) -> Dict[str, torch.Tensor]:
    return {k: (t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device))
            for k, t in leaves.items()}


def test_torch_func_grad_and_vjp_match_autograd(impl: str, impl_device: str, gen: torch.Generator) -> None:
    """``torch.func.grad`` of a scalar of every differentiable statistic, and ``torch.func.vjp`` of the
    statistics with random cotangents, w.r.t. hidden, weight and bias: equal to plain autograd (the same
    kernels run) and to the float64 oracle."""
    leaves = _leaves(gen)
    cot = _cotangents(gen, leaves["hidden"].shape[0])
    t = _f32(leaves, impl_device)

    def stats(h, w, b):
        s = tk.linear_vocab_stats(h, w, t["targets"], bias=b, ref_hidden=t["ref_hidden"], ref_weight=t["ref_weight"],
                                  ref_bias=t["ref_bias"], kl=True, entropy=True, mean_logit=True, impl=impl)
        return tuple(getattr(s, k) for k in DIFF)

    def objective(h, w, b):
        return sum((o.double() * cot[k].to(o.device)).sum() for k, o in zip(DIFF, stats(h, w, b), strict=True))

    primals = (t["hidden"], t["weight"], t["bias"])
    leaves_ag = [p.clone().requires_grad_() for p in primals]
    objective(*leaves_ag).backward()
    autograd = [p.grad for p in leaves_ag]

    by_grad = torch.func.grad(objective, argnums=(0, 1, 2))(*primals)
    outs, vjp_fn = torch.func.vjp(stats, *primals)
    by_vjp = vjp_fn(tuple(cot[k].to(o) for k, o in zip(DIFF, outs, strict=True)))
    _, want_grads = _oracle(leaves, cot)
    for name, a, g, v in zip(("hidden", "weight", "bias"), autograd, by_grad, by_vjp, strict=True):
        torch.testing.assert_close(g, a, rtol=0, atol=0, msg=f"torch.func.grad {name}")
        torch.testing.assert_close(v, a, rtol=0, atol=0, msg=f"torch.func.vjp {name}")
        e = want_grads[name]
        assert_close(g, e, rtol=0, atol=atol_normwise(1e-4, 1e-4, e), name=f"grad {name} vs oracle")


def test_torch_func_grad_through_a_loss(impl: str, impl_device: str, gen: torch.Generator) -> None:
    """A preference loss (TDPO: logp, lse and a full-vocabulary KL) under ``torch.func.grad``."""
    leaves = _leaves(gen, n=8)
    t = _f32(leaves, impl_device)
    h, y = t["hidden"].reshape(2, 4, -1), t["targets"].reshape(2, 4)
    rh = t["ref_hidden"].reshape(2, 4, -1)

    def loss(hh, w):
        return tk.tdpo_loss(hh, w, y, rh, t["ref_weight"], impl=impl).loss

    hg, wg = h.clone().requires_grad_(), t["weight"].clone().requires_grad_()
    loss(hg, wg).backward()
    gh, gw = torch.func.grad(loss, argnums=(0, 1))(h, t["weight"])
    torch.testing.assert_close(gh, hg.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, wg.grad, rtol=0, atol=0)


@pytest.mark.impls("cpu")
def test_torch_func_jacrev_matches_autograd(impl: str, gen: torch.Generator) -> None:
    """``jacrev`` vmaps the backward over the output's basis: row by row equal to autograd."""
    h, w = torch.randn(5, 8, generator=gen), torch.randn(13, 8, generator=gen)
    y = torch.tensor([1, -100, 12, 0, 7])

    def entropy(hh):
        return tk.linear_vocab_stats(hh, w, y, entropy=True, impl=impl).entropy

    jac = torch.func.jacrev(entropy)(h)
    hh = h.clone().requires_grad_()
    ent = entropy(hh)
    rows = [torch.autograd.grad(ent[i], hh, retain_graph=True)[0] for i in range(5)]
    torch.testing.assert_close(jac, torch.stack(rows), rtol=0, atol=0)


def test_second_order_and_forward_mode_are_refused_clearly(gen: torch.Generator) -> None:
    """Not silently zero: ``grad`` of ``grad`` raises when the second derivative is needed (as eager
    double backward does), forward-mode AD before any kernel."""
    h, w, y = torch.randn(4, 8, generator=gen), torch.randn(11, 8, generator=gen), torch.tensor([1, 2, -100, 3])

    def f(hh):
        return tk.linear_vocab_stats(hh, w, y, entropy=True, impl="torch").entropy.sum()

    with pytest.raises(RuntimeError, match="second-order derivatives through linear_vocab_stats are not supported"):
        torch.func.grad(lambda hh: torch.func.grad(f)(hh).sum())(h)
    for transform in (lambda: torch.func.jvp(f, (h,), (torch.ones_like(h),)), lambda: torch.func.jacfwd(f)(h),
                      lambda: torch.func.hessian(f)(h)):
        with pytest.raises(ValueError, match="forward-mode AD.*use torch.func.vjp, grad or jacrev"):
            transform()


def test_vmap_is_refused_clearly() -> None:
    h, w, y = torch.randn(3, 4, 8), torch.randn(11, 8), torch.randint(0, 11, (3, 4))
    with pytest.raises(ValueError, match="torch.vmap.*leading"):
        torch.vmap(lambda hh, yy: tk.linear_vocab_stats(hh, w, yy, impl="torch").lse)(h, y)


# --------------------------------------------------------------------------------------------
# Meta tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", impl_choices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_meta_statistics_have_the_right_shapes(impl: str, dtype: torch.dtype) -> None:
    """All-meta inputs (out-of-range ids included: nothing is read) give meta statistics of the real
    shapes and dtypes, and a meta backward gives meta gradients of the inputs' shapes and dtypes."""
    if impl != "auto":
        _supports(impl, dtype)
    m = dict(device="meta", dtype=dtype)
    h = torch.empty(2, 5, 16, **m, requires_grad=True)
    w = torch.empty(37, 16, **m, requires_grad=True)
    b = torch.empty(37, **m, requires_grad=True)
    rh, rw, rb = torch.empty(2, 5, 12, **m), torch.empty(37, 12, **m), torch.empty(37, **m)
    acc = torch.promote_types(dtype, torch.float32)
    for y in (torch.empty(2, 5, dtype=torch.long, device="meta"),
              torch.empty(2, 5, 3, dtype=torch.int32, device="meta")):
        s = tk.linear_vocab_stats(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, kl=True, entropy=True,
                                  max_logit=True, mean_logit=True, impl=impl)
        for k in ("logp", "ref_logp"):
            t = getattr(s, k)
            assert (t.device.type, t.shape, t.dtype) == ("meta", y.shape, acc), k
        for k in ("lse", "kl", "entropy", "max_logit", "mean_logit"):
            t = getattr(s, k)
            assert (t.device.type, t.shape, t.dtype) == ("meta", (2, 5), acc), k
        assert (s.mask.device.type, s.mask.shape, s.mask.dtype) == ("meta", (2, 5), torch.bool)
        h.grad = w.grad = b.grad = None
        (s.logp.sum() + s.lse.sum() + s.kl.sum() + s.entropy.sum() + s.mean_logit.sum()).backward()
        for leaf in (h, w, b):
            assert (leaf.grad.device.type, leaf.grad.shape, leaf.grad.dtype) == ("meta", leaf.shape, dtype)


@pytest.mark.parametrize("loss", ["tdpo_loss", "dpo_loss", "ppo_loss", "linear_cross_entropy"])
def test_meta_losses(loss: str) -> None:
    """A few losses on meta inputs: a meta scalar loss, meta metrics, and a meta backward."""
    m = dict(device="meta")
    h = torch.empty(4, 6, 16, **m, requires_grad=True)
    w = torch.empty(37, 16, **m, requires_grad=True)
    y = torch.empty(4, 6, dtype=torch.long, **m)
    rh, rw = torch.empty(4, 6, 12, **m), torch.empty(37, 12, **m)
    call = {
        "tdpo_loss": lambda: tk.tdpo_loss(h, w, y, rh, rw),
        "dpo_loss": lambda: tk.dpo_loss(h, w, y, rh, rw),
        "ppo_loss": lambda: tk.ppo_loss(h, w, y, torch.empty(4, **m), ref_hidden=rh, ref_weight=rw, entropy_coef=0.1),
        "linear_cross_entropy": lambda: tk.linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-4),
    }[loss]
    out = call()
    assert out.loss.device.type == "meta" and out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.metrics and all(v.device.type == "meta" for v in out.metrics.values())
    out.loss.backward()
    assert h.grad.device.type == "meta" and h.grad.shape == h.shape
    assert w.grad.device.type == "meta" and w.grad.shape == w.shape


def test_meta_resolves_impl_without_running_anything() -> None:
    """``"auto"`` resolves on meta as on the host (every dtype); an explicit name is checked for its
    dtypes but not for availability (nothing runs); an unknown name still raises."""
    assert tk.backends.resolve_impl("auto", "meta") == tk.backends.resolve_impl("auto", "cpu")
    for name in tk.backends.backend_names():
        assert tk.backends.resolve_impl(name, "meta") == name
    with pytest.raises(ValueError, match="impl: expected one of"):
        tk.backends.resolve_impl("nope", "meta")


# --------------------------------------------------------------------------------------------
# validate=: the target-range check
# --------------------------------------------------------------------------------------------


def _bad_call(gen: torch.Generator, **kw):
    h, w = torch.randn(5, 8, generator=gen), torch.randn(23, 8, generator=gen)
    y = torch.tensor([1, -100, 23, 4, 30])
    return tk.linear_vocab_stats(h, w, y, impl="torch", **kw)


@pytest.mark.parametrize("validate", ["async", "sync"])
def test_cpu_range_check_raises_value_error_in_every_mode(validate: str, gen: torch.Generator) -> None:
    with pytest.raises(ValueError, match=r"expected ids in \[0, 23\) or ignore_index=-100, got 23 \(2 bad id"):
        _bad_call(gen, validate=validate)


@pytest.mark.parametrize("value", ["eager", "", None, 1, True])
def test_validate_value_is_checked(value: object, gen: torch.Generator) -> None:
    h, w, y = torch.randn(2, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"validate: expected one of \('async', 'sync'\), got"):
        tk.linear_vocab_stats(h, w, y, validate=value)


def test_simulated_cuda_async_asserts_on_the_device_and_sync_raises(gen: torch.Generator,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the device test patched to say "CUDA": ``"async"`` goes through ``torch._assert_async``
    (no host read; on CPU it fails at once, as a RuntimeError), ``"sync"`` reads one result on the
    host and raises ValueError without asserting on the device; valid ids pass both."""
    asserted = []
    real = torch._assert_async

    def spy(cond, msg=""):
        asserted.append(msg)
        return real(cond, msg)

    monkeypatch.setattr(_validation, "_asserts_on_device", lambda device: True)
    monkeypatch.setattr(torch, "_assert_async", spy)
    with pytest.raises(RuntimeError, match=r"target ids must be in \[0, 23\) or ignore_index=-100"):
        _bad_call(gen)
    assert len(asserted) == 1
    with pytest.raises(ValueError, match=r"expected ids in \[0, 23\).*got 23 \(2 bad id"):
        _bad_call(gen, validate="sync")
    assert len(asserted) == 1
    h, w = torch.randn(3, 8, generator=gen), torch.randn(23, 8, generator=gen)
    for mode in ("async", "sync"):
        tk.linear_vocab_stats(h, w, torch.tensor([0, -100, 22]), impl="torch", validate=mode)
    assert len(asserted) == 2


def test_range_check_path_selection() -> None:
    """Where the check runs: on the host for CPU tensors and for ``"sync"``; on the device for CUDA
    ``"async"`` and whenever compiling; nowhere on meta."""
    where = _validation.target_check_site
    cuda, cpu, meta = torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")
    assert [where(d, "async") for d in (cuda, cpu, meta)] == ["device", "host", "skip"]
    assert [where(d, "sync") for d in (cuda, cpu, meta)] == ["host", "host", "skip"]


def test_compiling_always_asserts_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _validation.target_check_site(torch.device("cuda"), "sync") == "device"
    assert _validation.target_check_site(torch.device("cpu"), "sync") == "device"


def test_validate_sync_compiles_without_a_graph_break(gen: torch.Generator) -> None:
    """Under ``torch.compile(fullgraph=True)`` ``"sync"`` traces to the device assert, no host read."""
    h, w, y = torch.randn(4, 8, generator=gen), torch.randn(11, 8, generator=gen), torch.tensor([1, -100, 10, 0])

    def lse(hh):
        return tk.linear_vocab_stats(hh, w, y, impl="torch", validate="sync").lse

    torch.testing.assert_close(torch.compile(lse, backend="aot_eager", fullgraph=True)(h), lse(h), rtol=0, atol=0)


def test_losses_take_validate(gen: torch.Generator) -> None:
    """Every loss takes ``validate`` (a shared option) and passes it to the statistics."""
    for spec in tk.losses.LOSSES:
        assert "validate" in spec.options, spec.name
    h, w = torch.randn(2, 3, 8, generator=gen), torch.randn(11, 8, generator=gen)
    y = torch.tensor([[1, 2, 11], [0, -100, 3]])
    with pytest.raises(ValueError, match=r"expected ids in \[0, 11\)"):
        tk.linear_cross_entropy(h, w, y, validate="sync")
    with pytest.raises(ValueError, match="validate: expected one of"):
        tk.linear_cross_entropy(h, w, y.clamp_max(10), validate="later")


def test_losses_pass_validate_to_the_statistics(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokpo_kernels.losses import _options

    seen = []
    real = _options.linear_vocab_stats
    monkeypatch.setattr(_options, "linear_vocab_stats", lambda *a, **kw: seen.append(kw["validate"]) or real(*a, **kw))
    h, w = torch.randn(2, 3, 8, generator=gen), torch.randn(11, 8, generator=gen)
    y = torch.tensor([[1, 2, 10], [0, -100, 3]])
    tk.dpo_loss(h, w, y, h, w, validate="sync")
    tk.dpo_loss(h, w, y, h, w)
    assert seen == ["sync", "async"]


# --------------------------------------------------------------------------------------------
# Found by an independent bad-input probe: an ignore_index beyond int64 and non-bool flags
# --------------------------------------------------------------------------------------------


def test_ignore_index_beyond_int64_is_refused_clearly() -> None:
    """Compared with int64 ids, a larger Python int raised OverflowError inside torch."""
    h, w, y = torch.randn(7, 6), torch.randn(17, 6), torch.randint(0, 17, (7,))
    with pytest.raises(ValueError, match=r"ignore_index: expected an int64 value .* got 1180591620717411303424"):
        tk.linear_vocab_stats(h, w, y, ignore_index=2**70, impl="torch")


@pytest.mark.parametrize("flag", ["kl", "entropy", "max_logit", "mean_logit"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_yes_no_options_must_be_bools(flag: str, value: object) -> None:
    """``entropy="no"`` read as true before; every yes/no option now takes a bool only."""
    h, w, y = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
    ref = dict(ref_hidden=torch.randn(5, 4), ref_weight=torch.randn(9, 4))
    with pytest.raises(TypeError, match=rf"{flag}: expected a bool \(True or False\), got"):
        tk.linear_vocab_stats(h, w, y, impl="torch", **ref, **{flag: value})
