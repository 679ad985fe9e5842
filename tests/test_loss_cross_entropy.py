"""linear_cross_entropy against torch.nn.functional.linear_cross_entropy and the float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import policy as po
from oracle.compare import assert_close, atol_normwise
from tokpo_kernels.backends import backend_names
from tokpo_kernels.losses.cross_entropy import linear_cross_entropy

IGN = -100
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")


def make_batch(shape=(3, 5), v=43, d=12, seed=0, ignore_index=IGN, n_ignored=4):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=gen, dtype=torch.float64) * 0.8
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.3
    y = torch.randint(0, v, shape, generator=gen)
    if ignore_index >= 0:
        y = torch.where(y == ignore_index, (y + 1) % v, y)  # only the chosen positions are ignored
    flat = y.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:n_ignored]
    flat[idx] = ignore_index
    tw = torch.rand(shape, generator=gen, dtype=torch.float64) * 2
    return dict(h=h, w=w, bias=bias, y=y, tw=tw, gen=gen)


# ------------------------------------------------------------------------------------------------
# torch.nn.functional.linear_cross_entropy (PyTorch >= 2.13)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="needs torch.nn.functional.linear_cross_entropy (PyTorch >= 2.13)")
@pytest.mark.impls("cpu")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("ignore_index, use_bias", [(IGN, True), (3, False)])
def test_ce_matches_torch_linear_cross_entropy(impl, reduction, label_smoothing, ignore_index, use_bias):
    seed = ["mean", "sum", "none"].index(reduction) + 7 * (ignore_index == 3)
    b = make_batch(shape=(13,), seed=seed, ignore_index=ignore_index)
    h0, w0, b0 = b["h"].float(), b["w"].float(), b["bias"].float()
    cot = torch.randn(13, generator=b["gen"]) if reduction == "none" else torch.tensor(0.83)

    h1, w1, bb1 = h0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    ref = F.linear_cross_entropy(h1, w1, b["y"], linear_bias=bb1 if use_bias else None, reduction=reduction,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing)
    (ref * cot).sum().backward()

    h2, w2, bb2 = h0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
    out = linear_cross_entropy(h2, w2, b["y"], bias=bb2 if use_bias else None, reduction=reduction,
                               ignore_index=ignore_index, label_smoothing=label_smoothing, impl=impl)
    (out.loss * cot).sum().backward()

    assert out.loss.shape == ref.shape
    assert_close(out.loss, ref, rtol=0.0, atol=atol_normwise(2e-5, 1e-6, ref), name="loss vs torch")
    grads = [(h2.grad, h1.grad, "d hidden"), (w2.grad, w1.grad, "d weight")]
    grads += [(bb2.grad, bb1.grad, "d bias")] if use_bias else []
    for got, want, name in grads:
        assert_close(got, want, rtol=0.0, atol=atol_normwise(2e-4, 1e-7, want), name=f"{name} vs torch")
    if reduction == "none":
        assert (out.loss[b["y"] == ignore_index] == 0).all()


# ------------------------------------------------------------------------------------------------
# float64 oracle: the options PyTorch does not have
# ------------------------------------------------------------------------------------------------

CASES = {
    "zloss_weights_tokens": dict(z_loss=1e-3, token_weights=True, reduction="mean"),
    "zloss_weights_weights": dict(z_loss=2e-3, token_weights=True, reduction="mean", weight_normalization="weights"),
    "smooth_temp_bias_sum": dict(label_smoothing=0.2, temperature=0.6, bias=True, reduction="sum", z_loss=1e-4),
    "softcap_weights_none": dict(softcap=2.5, temperature=1.3, token_weights=True, reduction="none", z_loss=5e-3),
    "plain_mean_3d": dict(reduction="mean"),
}


def _run_case(name, impl, b, rtol=2e-4, device="cpu"):
    spec = dict(CASES[name])
    kw = {k: v for k, v in spec.items() if k not in ("token_weights", "bias")}
    if spec.get("token_weights"):
        # NaN at ignored tokens: must never be read
        kw["token_weights"] = torch.where(b["y"] != IGN, b["tw"], torch.full_like(b["tw"], float("nan")))
    if spec.get("bias"):
        kw["bias"] = b["bias"]
    po.run_and_compare(linear_cross_entropy, po.cross_entropy, b["h"], b["w"], [b["y"]], kw, impl=impl, rtol=rtol,
                       metric_atol=1e-7, device=device,
                       cotangent=lambda shape: torch.randn(shape, generator=b["gen"], dtype=torch.float64))


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("case", list(CASES))
def test_ce_matches_oracle(case, impl):
    shape = (2, 3, 4) if case == "plain_mean_3d" else (3, 5)
    b = make_batch(shape=shape, seed=list(CASES).index(case) + 10 * backend_names().index(impl))
    _run_case(case, impl, b)


@pytest.mark.impls("cpu")
def test_ce_odd_shapes(impl):
    # N = 1, D = 1, V = 2
    _run_case("zloss_weights_tokens", impl, make_batch(shape=(1,), v=2, d=1, seed=1, n_ignored=0))
    _run_case("smooth_temp_bias_sum", impl, make_batch(shape=(5,), v=67, d=3, seed=2, n_ignored=1))


@pytest.mark.impls("interpreted")
def test_ce_triton_tiny(impl, impl_device):
    # The same rtol = 2e-4 as the other backends: measured under the Triton interpreter, the largest
    # error of these cases needs rtol <= 3.2e-7 (fp32 accumulation-order noise, as for impl="torch").
    b = make_batch(shape=(6,), v=40, d=16, seed=5, n_ignored=2)
    _run_case("smooth_temp_bias_sum", impl, b, device=impl_device)
    _run_case("zloss_weights_tokens", impl, b, device=impl_device)


@pytest.mark.impls("cpu")
def test_ce_all_tokens_ignored(impl):
    b = make_batch(shape=(4,), seed=6)
    y = torch.full_like(b["y"], IGN)
    h = b["h"].float().requires_grad_()
    w = b["w"].float().requires_grad_()
    out = linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-3, impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0.0  # documented: PyTorch returns NaN here
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_ce_token_weights_of_one_match_unweighted():
    b = make_batch(shape=(9,), seed=7)
    h, w = b["h"].float(), b["w"].float()
    a = linear_cross_entropy(h, w, b["y"], label_smoothing=0.1, impl="torch").loss
    for norm in ("tokens", "weights"):
        c = linear_cross_entropy(h, w, b["y"], label_smoothing=0.1, token_weights=torch.ones(9),
                                 weight_normalization=norm, impl="torch").loss
        assert_close(c, a, rtol=0.0, atol=atol_normwise(1e-6, 1e-7, a), name=f"unit weights ({norm})")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _args():
    b = make_batch(shape=(4,), v=11, d=5, seed=8)
    return b["h"].float(), b["w"].float(), b["y"]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, pattern",
    [
        (lambda a: a, {"reduction": "avg"}, ValueError, r"reduction: expected one of \('mean', 'sum', 'none'\)"),
        (lambda a: a, {"label_smoothing": 1.5}, ValueError,
         r"label_smoothing: expected a finite number >= 0(\.0)? and <= 1(\.0)?"),
        (lambda a: a, {"label_smoothing": -0.1}, ValueError, r"label_smoothing"),
        (lambda a: a, {"z_loss": -1e-4}, ValueError, r"z_loss: expected a finite number >= 0"),
        (lambda a: a, {"token_weights": torch.ones(5)}, ValueError, r"token_weights: expected shape \(4,\)"),
        (lambda a: a, {"token_weights": torch.ones(4, dtype=torch.long)}, TypeError,
         r"token_weights: expected a floating"),
        (lambda a: a, {"label_smoothing": 0.1, "softcap": 30.0}, ValueError,
         r"label_smoothing=0.1 > 0 is not supported together with softcap"),
        (lambda a: a, {"weight_normalization": "sum"}, ValueError, r"weight_normalization: expected one of"),
        (lambda a: (a[0], a[1], a[2][:, None].expand(4, 2)), {}, ValueError, r"targets: expected shape \(4,\)"),
        (lambda a: (a[0], a[1], a[2][:3]), {}, ValueError, r"targets: expected shape \(4,\)"),
        (lambda a: a, {"impl": "gpu"}, ValueError, r"impl: expected one of"),
        (lambda a: a, {"temperature": 0.0}, ValueError, r"temperature"),
    ],
)
def test_ce_validation(mutate, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        linear_cross_entropy(*mutate(_args()), **kwargs)


def test_ce_bf16_inputs_with_label_smoothing():
    b = make_batch(shape=(9,), seed=15)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        h = b["h"].to(dt).requires_grad_()
        w = b["w"].to(dt).requires_grad_()
        bias = b["bias"].to(dt).requires_grad_()
        out = linear_cross_entropy(h, w, b["y"], bias=bias, label_smoothing=0.1, z_loss=1e-3, impl="torch")
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        for g in (h.grad, w.grad, bias.grad):
            assert g.dtype == dt and torch.isfinite(g.float()).all()
        outs[dt] = out.loss.detach()
    want = outs[torch.float32]
    assert_close(outs[torch.bfloat16], want, rtol=0.0, atol=atol_normwise(1e-2, 1e-3, want), name="bf16 vs fp32 loss")
