"""Token-level PPO/GRPO loss against the independent float64 oracle and Liger-Kernel's GRPO loss."""

from __future__ import annotations

import pytest
import torch

from oracle import policy as po
from oracle.compare import assert_close, atol_normwise
from oracle.logits import log_softmax64, logits64
from oracle.policy import float32_kwargs
from tokpo_kernels.backends import backend_names
from tokpo_kernels.losses.ppo import ppo_loss

IGN = -100


def make_batch(bsz=4, t=7, v=41, d=13, seed=0, prompt=(2, 0, 3, 1)):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(bsz, t, d, generator=gen, dtype=torch.float64) * 0.8
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (bsz, t), generator=gen)
    mask = torch.ones(bsz, t, dtype=torch.bool)
    for r in range(bsz):
        mask[r, : prompt[r % len(prompt)]] = False  # prompt tokens
    mask[min(1, bsz - 1), t - 2:] = False  # right padding
    if bsz >= 3:
        mask[bsz - 1] = False  # a sequence with no response token at all
    ignored = torch.where(mask, targets, torch.full_like(targets, IGN))
    ref_h = h + 0.3 * torch.randn(bsz, t, d, generator=gen, dtype=torch.float64)
    ref_w = w + 0.1 * torch.randn(v, d, generator=gen, dtype=torch.float64)
    return dict(h=h, w=w, targets=ignored, raw_targets=targets, mask=mask, ref_h=ref_h, ref_w=ref_w, gen=gen)


def _cur_logp(b, bias=None, temperature=1.0, softcap=None):
    lp = log_softmax64(logits64(b["h"], b["w"], bias, temperature=temperature, softcap=softcap))
    return lp.gather(-1, b["raw_targets"][..., None]).squeeze(-1)


def _noisy_old(b, spread=0.6, **kw):
    cur = _cur_logp(b, **kw)
    old = cur + (torch.rand(cur.shape, generator=b["gen"], dtype=torch.float64) * 2 - 1) * spread
    return torch.where(b["mask"], old, torch.full_like(old, float("nan")))  # NaN at ignored: must not leak


def _setup(case, b):
    """(advantages, library kwargs, oracle kwargs) for a named case."""
    gen = b["gen"]
    bsz, t = b["targets"].shape
    v = b["w"].shape[0]
    seq_adv = torch.randn(bsz, generator=gen, dtype=torch.float64)
    tok_adv = torch.randn(bsz, t, generator=gen, dtype=torch.float64)
    tok_adv = torch.where(b["mask"], tok_adv, torch.full_like(tok_adv, float("nan")))
    kw, okw = {}, {}
    if case.startswith("seqadv_ref_model"):
        loss_type = case.split(":")[1]
        old = _noisy_old(b)
        kw.update(old_logp=old, ref_hidden=b["ref_h"], ref_weight=b["ref_w"], loss_type=loss_type)
        okw.update(old_logp=old, ref_h=b["ref_h"], ref_w=b["ref_w"], loss_type=loss_type)
        return seq_adv, kw, okw
    if case == "tokadv_ref_logp_entropy_dapo":
        ref_all = log_softmax64(logits64(b["ref_h"], b["ref_w"]))
        ref_lp = ref_all.gather(-1, b["raw_targets"][..., None]).squeeze(-1)
        ref_lp = torch.where(b["mask"], ref_lp, torch.full_like(ref_lp, float("nan")))
        old = _noisy_old(b)
        common = dict(beta=0.1, eps_low=0.2, eps_high=0.28, entropy_coef=0.05, loss_type="dapo")
        kw.update(old_logp=old, ref_logp=ref_lp, **common)
        okw.update(old_logp=old, ref_logp=ref_lp, **common)
        return tok_adv, kw, okw
    if case == "bias_temp_softcap_drgrpo":
        bias = torch.randn(v, generator=gen, dtype=torch.float64)
        common = dict(temperature=0.7, softcap=4.0, loss_type="dr_grpo", max_tokens=12, entropy_coef=0.01)
        old = _noisy_old(b, bias=bias, temperature=0.7, softcap=4.0)
        kw.update(old_logp=old, ref_hidden=b["ref_h"], ref_weight=b["ref_w"], bias=bias, ref_bias=bias * 0.5,
                  **common)
        okw.update(old_logp=old, ref_h=b["ref_h"], ref_w=b["ref_w"], bias=bias, ref_bias=bias * 0.5, **common)
        return tok_adv, kw, okw
    if case == "no_ref_beta0_rho1":
        kw.update(beta=0.0)
        okw.update(beta=0.0)
        return seq_adv, kw, okw
    raise AssertionError(case)


CASES = [
    "seqadv_ref_model:grpo",
    "seqadv_ref_model:dapo",
    "seqadv_ref_model:dr_grpo",
    "tokadv_ref_logp_entropy_dapo",
    "bias_temp_softcap_drgrpo",
    "no_ref_beta0_rho1",
]


def _run_and_compare(case, impl, b, rtol=2e-4, flatten=False, device="cpu"):
    adv, kw, okw = _setup(case, b)
    out, m64 = po.run_and_compare(ppo_loss, po.ppo_loss, b["h"], b["w"], [b["targets"], adv], kw, okw=okw, impl=impl,
                                  cotangent=1.37, rtol=rtol, flatten_hidden=flatten, device=device)
    assert out.loss.dim() == 0
    return out, m64


@pytest.mark.impls("cpu")
@pytest.mark.parametrize("case", CASES)
def test_ppo_matches_oracle(case, impl):
    b = make_batch(seed=CASES.index(case) + 50 * backend_names().index(impl))
    out, m64 = _run_and_compare(case, impl, b)
    if case != "no_ref_beta0_rho1":  # every other case passes a noisy old_logp
        assert m64["clip_ratio"] > 0, "test data should exercise the clip"


@pytest.mark.impls("cpu")
def test_ppo_flattened_hidden_and_odd_shapes(impl):
    _run_and_compare("seqadv_ref_model:grpo", impl, make_batch(seed=3), flatten=True)
    # B = 1, T = 1, D = 1
    _run_and_compare("seqadv_ref_model:dapo", impl, make_batch(bsz=1, t=1, v=5, d=1, seed=4, prompt=(0,)))


@pytest.mark.parametrize("impl", ["torch"])
def test_ppo_normalisations_differ_as_documented(impl):
    """Same per-token terms, three reductions: check the ratios between them directly."""
    b = make_batch(seed=8)
    adv = torch.randn(b["targets"].shape[0], generator=b["gen"]).float()
    h, w, y = b["h"].float(), b["w"].float(), b["targets"]
    kw = dict(beta=0.0, impl=impl)
    dapo = ppo_loss(h, w, y, adv, loss_type="dapo", **kw).loss
    dr = ppo_loss(h, w, y, adv, loss_type="dr_grpo", **kw).loss
    dr20 = ppo_loss(h, w, y, adv, loss_type="dr_grpo", max_tokens=20, **kw).loss
    n = b["mask"].sum()
    bsz, t = y.shape
    assert_close(dr * (bsz * t), dapo * n, rtol=0.0, atol=atol_normwise(1e-5, 1e-7, dapo * n), name="dapo vs dr_grpo")
    assert_close(dr20 * 20, dr * t, rtol=0.0, atol=atol_normwise(1e-5, 1e-7, dr * t), name="dr_grpo max_tokens")


@pytest.mark.impls("interpreted")
def test_ppo_triton_tiny(impl, impl_device):
    # The same rtol = 2e-4 as the other backends: measured under the Triton interpreter, the largest
    # error of these cases needs rtol <= 3.2e-7 (fp32 accumulation-order noise, as for impl="torch").
    b = make_batch(bsz=3, t=4, v=40, d=16, seed=7)
    _run_and_compare("seqadv_ref_model:grpo", impl, b, device=impl_device)
    _run_and_compare("tokadv_ref_logp_entropy_dapo", impl, b, device=impl_device)


@pytest.mark.impls("cpu")
def test_ppo_all_tokens_ignored(impl):
    b = make_batch(bsz=2, t=3, seed=9)
    y = torch.full_like(b["targets"], IGN)
    h = b["h"].float().requires_grad_()
    w = b["w"].float().requires_grad_()
    for lt in ("grpo", "dapo", "dr_grpo"):
        out = ppo_loss(h, w, y, torch.randn(2), None, b["ref_h"].float(), b["ref_w"].float(), loss_type=lt,
                       entropy_coef=0.1, impl=impl)
        out.loss.backward()
        assert out.loss.item() == 0.0
        assert all(torch.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() == 0
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() == 0


# ------------------------------------------------------------------------------------------------
# Liger-Kernel's LigerFusedLinearGRPOLoss (chunked PyTorch, runs on CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ppo_matches_liger_grpo(loss_type):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    b = make_batch(bsz=4, t=6, v=48, d=16, seed=21)
    h32, w32 = b["h"].float(), b["w"].float()
    rh32, rw32 = b["ref_h"].float(), b["ref_w"].float()
    adv = torch.randn(4, generator=b["gen"]).float()
    old = _noisy_old(b, spread=1.0, temperature=0.9).float()
    old_for_liger = torch.where(b["mask"], old, torch.zeros_like(old))
    max_len = 9
    kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9)

    h1, w1 = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref_mod = liger.LigerFusedLinearGRPOLoss(
        beta=kw["beta"], compiled=False, use_ref_model=True, chunk_size=1, epsilon_low=kw["eps_low"],
        epsilon_high=kw["eps_high"], loss_type=loss_type, max_completion_length=max_len,
        temperature=kw["temperature"],
    )
    ref_loss, ref_metrics = ref_mod(
        h1, w1, b["raw_targets"], b["mask"].long(), adv, old_per_token_logps=old_for_liger,
        ref_input=rh32, ref_weight=rw32,
    )
    ref_loss.backward()

    h2, w2 = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    out = ppo_loss(h2, w2, b["targets"], adv, old, rh32, rw32, loss_type=loss_type, max_tokens=max_len,
                   impl="torch", **kw)
    out.loss.backward()
    assert_close(out.loss, ref_loss, rtol=0.0, atol=atol_normwise(1e-5, 1e-6, ref_loss), name="loss vs Liger")
    assert_close(h2.grad, h1.grad, rtol=0.0, atol=atol_normwise(1e-4, 1e-7, h1.grad), name="d hidden vs Liger")
    assert_close(w2.grad, w1.grad, rtol=0.0, atol=atol_normwise(1e-4, 1e-7, w1.grad), name="d weight vs Liger")
    # Liger's metrics: (kl, clip_ratio), both token means over the batch
    for name, want, rtol in (("kl", ref_metrics[0], 1e-4), ("clip_ratio", ref_metrics[1], 1e-6)):
        assert_close(out.metrics[name], want, rtol=0.0, atol=atol_normwise(rtol, 1e-7, want), name=f"{name} vs Liger")
    assert out.metrics["clip_ratio"] > 0


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _valid_args():
    b = make_batch(bsz=2, t=3, v=11, d=4, seed=12)
    return b["h"].float(), b["w"].float(), b["targets"], torch.randn(2), None, b["ref_h"].float(), b["ref_w"].float()


@pytest.mark.parametrize(
    "mutate, kwargs, exc, pattern",
    [
        (lambda a: (a[0], a[1], a[2], torch.randn(3)) + a[4:], {}, ValueError, r"advantages: expected shape \(2,\)"),
        (lambda a: (a[0], a[1], a[2], torch.randn(2, 4)) + a[4:], {}, ValueError,
         r"advantages: expected shape \(2, 3\)"),
        (lambda a: (a[0], a[1], a[2], torch.ones(2, dtype=torch.long)) + a[4:], {}, TypeError, r"advantages"),
        (lambda a: (a[0][:, :2],) + a[1:], {}, ValueError, r"hidden: expected shape \(B, T, D\)"),
        (lambda a: (a[0], a[1], a[2][0]) + a[3:], {}, ValueError, r"targets: expected shape \(B, T\)"),
        (lambda a: a[:4] + (torch.zeros(2, 2),) + a[5:], {}, ValueError, r"old_logp: expected shape \(2, 3\)"),
        (lambda a: a[:5], {"ref_logp": torch.zeros(3, 3)}, ValueError, r"ref_logp: expected shape \(2, 3\)"),
        (lambda a: a, {"loss_type": "bnpo2"}, ValueError, r"loss_type: expected one of \('grpo', 'dapo', 'dr_grpo'\)"),
        (lambda a: a, {"beta": -1.0}, ValueError, r"beta: expected a finite number >= 0"),
        (lambda a: a, {"entropy_coef": -0.01}, ValueError, r"entropy_coef"),
        (lambda a: a, {"eps_low": -0.1}, ValueError, r"eps_low"),
        (lambda a: a, {"eps_high": float("nan")}, ValueError, r"eps_high"),
        (lambda a: a, {"max_tokens": 0}, ValueError, r"max_tokens: expected a positive int"),
        (lambda a: a, {"max_tokens": 3.5}, ValueError, r"max_tokens"),
        (lambda a: a[:5], {}, ValueError, r"beta=0.04 > 0 needs a reference"),
        (lambda a: a[:6], {}, ValueError, r"needs both ref_hidden and ref_weight"),
        (lambda a: a, {"ref_logp": torch.zeros(2, 3)}, ValueError, r"not both"),
        (lambda a: a[:5] + (a[5][:, :2],) + a[6:], {}, ValueError, r"ref_hidden: expected shape"),
        (lambda a: a, {"impl": "cuda"}, ValueError, r"impl: expected one of"),
    ],
)
def test_ppo_validation(mutate, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ppo_loss(*mutate(_valid_args()), **kwargs)


def test_ppo_bf16_inputs():
    b = make_batch(seed=14)
    adv, kw, _ = _setup("tokadv_ref_logp_entropy_dapo", b)
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        h = b["h"].to(dt).requires_grad_()
        w = b["w"].to(dt).requires_grad_()
        out = ppo_loss(h, w, b["targets"], adv.float(), impl="torch", **float32_kwargs(kw))
        out.loss.backward()
        assert out.loss.dtype == torch.float32
        assert h.grad.dtype == dt and torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()
        outs[dt] = out.loss.detach()
    want = outs[torch.float32]
    assert_close(outs[torch.bfloat16], want, rtol=0.0, atol=atol_normwise(3e-2, 2e-3, want), name="bf16 vs fp32 loss")
