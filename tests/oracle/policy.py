"""Independent float64 full-logit oracles for the TLPO, PPO/GRPO and cross-entropy losses, and the
runner that checks a library loss against them.

Written directly from docs/methods.md §4–5 (and the PyTorch / TRL conventions the loss docstrings
name). Nothing here imports tokpo_kernels: logits are materialised in float64 (``oracle.logits``),
and the per-candidate / per-token terms are formed one element at a time in Python loops, so the
structure shares nothing with the statistics path. Gradients come from float64 autograd: pass
float64 leaves (``x.detach().double().requires_grad_()``) and call ``backward`` on the result.

Every oracle returns ``(loss, metrics)`` with metrics as float64 tensors named as the library's.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from oracle.compare import assert_close, atol_normwise
from oracle.logits import log_softmax64, logits64, logsumexp64

Metrics = Dict[str, torch.Tensor]


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


def _k3(ref: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    d = ref - lp
    return torch.exp(d) - d - 1.0


# ------------------------------------------------------------------------------------------------
# TLPO (docs/methods.md §4)
# ------------------------------------------------------------------------------------------------


def tlpo_advantages(probs, rewards, mask=None) -> torch.Tensor:
    """μ = Σπ R/Σπ, w = π(R − μ), A = w/Σ|w| per group; zeros when all (valid) rewards are equal."""
    squeeze = probs.dim() == 1
    p = probs.double().reshape(-1, probs.shape[-1])
    r = rewards.double().reshape(-1, probs.shape[-1])
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else mask.reshape(-1, probs.shape[-1])
    out = torch.zeros_like(p)
    for g in range(p.shape[0]):
        idx = [i for i in range(p.shape[1]) if bool(m[g, i])]
        rs = [float(r[g, i]) for i in idx]
        if len(set(rs)) <= 1:
            continue
        ps = [float(p[g, i]) for i in idx]
        mu = sum(pi * ri for pi, ri in zip(ps, rs, strict=True)) / sum(ps)
        ws = [pi * (ri - mu) for pi, ri in zip(ps, rs, strict=True)]
        l1 = sum(abs(x) for x in ws)
        for i, wi in zip(idx, ws, strict=True):
            out[g, i] = wi / l1
    return out[0] if squeeze else out.reshape(probs.shape)


def tlpo_loss(h, w, cand, adv, *, ref_h=None, ref_w=None, ref_logp=None, old_logp=None, kl_beta=0.04,
              eps_low=0.2, eps_high=0.2, bias=None, ref_bias=None, ignore_index=-100, temperature=1.0,
              softcap=None) -> Tuple[torch.Tensor, Metrics]:
    """loss = −mean_i (min(ρA, clip(ρ)A) − β_KL·k3(ℓ_ref, ℓ)) over the valid candidates."""
    logp_all = log_softmax64(logits64(h, w, bias, temperature=temperature, softcap=softcap))
    ref_all = None
    if ref_h is not None:
        with torch.no_grad():
            ref_all = log_softmax64(logits64(ref_h, ref_w, ref_bias, temperature=temperature, softcap=softcap))
    surr, kls, clipped, ratios, lps, advs = [], [], [], [], [], []
    for g in range(cand.shape[0]):
        for i in range(cand.shape[1]):
            tok = int(cand[g, i])
            if tok == ignore_index:
                continue
            lp = logp_all[g, tok]
            old = lp.detach() if old_logp is None else old_logp[g, i].double()
            rho = torch.exp(lp - old)
            a = float(adv[g, i])
            s = torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)
            surr.append(s)
            if ref_all is not None:
                kls.append(_k3(ref_all[g, tok], lp))
            elif ref_logp is not None:
                kls.append(_k3(ref_logp[g, i].double(), lp))
            r = float(rho.detach())
            clipped.append(1.0 if (r < 1 - eps_low and a < 0) or (r > 1 + eps_high and a > 0) else 0.0)
            ratios.append(rho)
            lps.append(lp)
            advs.append(abs(a))
    n = len(surr)
    if n == 0:
        z = (h.double().sum() + w.double().sum()) * 0.0
        return z, {"num_candidates": _zero()}
    total = sum(surr)
    if kls:
        total = total - kl_beta * sum(kls)
    loss = -total / n
    metrics = {
        "policy_loss": -sum(surr) / n,
        "clip_fraction": torch.tensor(sum(clipped) / n, dtype=torch.float64),
        "ratio/mean": sum(ratios) / n,
        "logps/candidates": sum(lps) / n,
        "advantages/abs_mean": torch.tensor(sum(advs) / n, dtype=torch.float64),
        "num_candidates": torch.tensor(float(n), dtype=torch.float64),
    }
    if kls:
        metrics["kl"] = sum(kls) / n
    return loss, {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# Token-level PPO / GRPO (docs/methods.md §5, TRL GRPOTrainer normalisations)
# ------------------------------------------------------------------------------------------------


def ppo_loss(h, w, targets, adv, *, old_logp=None, ref_h=None, ref_w=None, ref_logp=None, beta=0.04,
             eps_low=0.2, eps_high=0.2, entropy_coef=0.0, loss_type="grpo", max_tokens=None, bias=None,
             ref_bias=None, ignore_index=-100, temperature=1.0, softcap=None) -> Tuple[torch.Tensor, Metrics]:
    """L_t = −min(ρA, clip(ρ)A) + β·k3 − c_H·H_t, reduced per ``loss_type`` (grpo/dapo/dr_grpo)."""
    B, T = targets.shape
    h = h.reshape(B, T, -1)
    logp_all = log_softmax64(logits64(h, w, bias, temperature=temperature, softcap=softcap))  # (B, T, V)
    ref_all = None
    if ref_h is not None:
        with torch.no_grad():
            ref_all = log_softmax64(logits64(ref_h.reshape(B, T, -1), ref_w, ref_bias, temperature=temperature,
                                                softcap=softcap))
    has_ref = ref_all is not None or ref_logp is not None
    seq_losses, all_tok = [], []
    kls, ents, low, high = [], [], [], []
    for b in range(B):
        toks = []
        for t in range(T):
            y = int(targets[b, t])
            if y == ignore_index:
                continue
            lp = logp_all[b, t, y]
            old = lp.detach() if old_logp is None else old_logp[b, t].double()
            rho = torch.exp(lp - old)
            a = float(adv[b]) if adv.dim() == 1 else float(adv[b, t])
            L = -torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)
            if has_ref:
                ref = ref_all[b, t, y] if ref_all is not None else ref_logp[b, t].double()
                kl = _k3(ref, lp)
                kls.append(kl)
                L = L + beta * kl
            if entropy_coef > 0:
                ent = -(logp_all[b, t].exp() * logp_all[b, t]).sum()
                ents.append(ent)
                L = L - entropy_coef * ent
            r = float(rho.detach())
            low.append(1.0 if (r < 1 - eps_low and a < 0) else 0.0)
            high.append(1.0 if (r > 1 + eps_high and a > 0) else 0.0)
            toks.append(L)
        all_tok += toks
        seq_losses.append(sum(toks) / len(toks) if toks else _zero())
    n = len(all_tok)
    zero = (h.double().sum() + w.double().sum()) * 0.0
    total = sum(all_tok) if all_tok else zero
    if loss_type == "grpo":
        loss = sum(seq_losses) / B + zero
    elif loss_type == "dapo":
        loss = total / max(n, 1)
    elif loss_type == "dr_grpo":
        loss = total / (B * (T if max_tokens is None else max_tokens))
    else:
        raise ValueError(loss_type)
    nn_ = max(n, 1)
    metrics = {
        "clip_ratio": torch.tensor((sum(low) + sum(high)) / nn_, dtype=torch.float64),
        "clip_ratio/low": torch.tensor(sum(low) / nn_, dtype=torch.float64),
        "clip_ratio/high": torch.tensor(sum(high) / nn_, dtype=torch.float64),
    }
    if has_ref:
        metrics["kl"] = (sum(kls) / nn_) if kls else _zero()
    if entropy_coef > 0:
        metrics["entropy"] = (sum(ents) / nn_) if ents else _zero()
    return loss, {k: torch.as_tensor(v).detach().double() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# Cross-entropy (docs/methods.md §5; PyTorch's cross_entropy conventions)
# ------------------------------------------------------------------------------------------------


def cross_entropy(h, w, targets, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, token_weights=None, temperature=1.0, softcap=None,
                  weight_normalization="tokens") -> Tuple[torch.Tensor, Metrics]:
    """L_t = w_t((1−ε)(lse − z_y) + ε(lse − mean_v z) + z_loss·lse²), from full float64 logits."""
    z = logits64(h, w, bias, temperature=temperature, softcap=softcap)
    flat_z = z.reshape(-1, z.shape[-1])
    flat_y = targets.reshape(-1)
    flat_w = None if token_weights is None else token_weights.reshape(-1)
    per, nlls, zls, wsum = [], [], [], 0.0
    for i in range(flat_y.numel()):
        y = int(flat_y[i])
        if y == ignore_index:
            per.append(_zero())
            continue
        zi = flat_z[i]
        lse = logsumexp64(zi)
        nll = lse - zi[y]
        smooth = lse - zi.sum() / zi.numel()
        zl = z_loss * lse * lse
        wt = 1.0 if flat_w is None else float(flat_w[i])
        wsum += wt
        per.append(wt * ((1 - label_smoothing) * nll + label_smoothing * smooth + zl))
        nlls.append(nll)
        zls.append(wt * zl)
    n = len(nlls)
    anchor = (h.double().sum() + w.double().sum()) * 0.0
    per_t = torch.stack(per).reshape(targets.shape) + anchor
    if flat_w is not None and weight_normalization == "weights":
        denom = wsum if wsum != 0 else 1.0
    else:
        denom = max(n, 1)
    if reduction == "none":
        loss = per_t
    elif reduction == "sum":
        loss = per_t.sum()
    else:
        loss = per_t.sum() / denom
    metrics = {
        "nll": (sum(nlls) / n) if n else _zero(),
        "num_tokens": torch.tensor(float(n), dtype=torch.float64),
    }
    if z_loss > 0:
        zsum = sum(zls) if zls else _zero()
        metrics["z_loss"] = zsum if reduction == "sum" else zsum / denom
    return loss, {k: torch.as_tensor(v).detach().double() for k, v in metrics.items()}




# ------------------------------------------------------------------------------------------------
# The check of a library loss against its oracle (CE, PPO, TLPO tests)
# ------------------------------------------------------------------------------------------------


def float32_kwargs(kw: Dict[str, object]) -> Dict[str, object]:
    """The library's fp32 arguments from the oracle's float64 ones (ids and flags unchanged)."""
    return {k: (x.float() if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else x) for k, x in kw.items()}


def assert_loss_matches(out, loss64, metrics64, grads, rtol, metric_atol=1e-6) -> None:
    """A library ``LossOutput`` against its float64 oracle, each error bounded norm-wise by
    ``rtol·max|expected| + atol``: an fp32 loss (atol 1e-6), exactly the oracle's metric names, each
    detached (atol ``metric_atol``), and every ``(got, expected, name)`` gradient pair (atol 1e-7)."""
    assert out.loss.dtype == torch.float32, f"loss: expected dtype torch.float32, got {out.loss.dtype}"
    assert_close(out.loss, loss64, rtol=0.0, atol=atol_normwise(rtol, 1e-6, loss64), name="loss")
    assert set(out.metrics) == set(metrics64), f"metric names: expected {sorted(metrics64)}, got {sorted(out.metrics)}"
    for name, val in metrics64.items():
        assert not out.metrics[name].requires_grad, f"metric {name}: expected detached"
        atol = atol_normwise(rtol, metric_atol, val)
        assert_close(out.metrics[name], val, rtol=0.0, atol=atol, name=f"metric {name}")
    for got, expected, name in grads:
        assert_close(got, expected, rtol=0.0, atol=atol_normwise(rtol, 1e-7, expected), name=name)


def run_and_compare(loss_fn: Callable, oracle_fn: Callable, hidden: torch.Tensor, weight: torch.Tensor,
                    args: Sequence[object], kw: Dict[str, object], *, impl: str,
                    cotangent: Union[float, Callable[[Tuple[int, ...]], torch.Tensor]], rtol: float,
                    metric_atol: float = 1e-6, okw: Optional[Dict[str, object]] = None, flatten_hidden: bool = False,
                    device: str = "cpu"):
    """``loss_fn(hidden, weight, *args, impl=impl, **kw)`` in fp32 on ``device`` against
    ``oracle_fn(hidden, weight, *args, **okw)`` in float64 on CPU (``okw`` defaults to ``kw``), on the
    same values, both backpropagated with the same ``cotangent`` (a number, or a function of the
    loss shape giving a float64 tensor); then ``assert_loss_matches`` on the loss, the metrics and
    the gradients of hidden, weight and (when ``kw`` has one) bias. Float64 ``args``/``kw`` tensors
    are cast to fp32 for the library. ``flatten_hidden`` passes the library ``hidden`` as ``(N, D)``.
    Returns the library output and the oracle's metrics.
    """
    okw = dict(kw if okw is None else okw)

    def to_library(x: object) -> object:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    h = hidden.float().to(device).requires_grad_()
    w = weight.float().to(device).requires_grad_()
    kw32 = {k: to_library(x) for k, x in float32_kwargs(kw).items()}
    if kw32.get("bias") is not None:
        kw32["bias"].requires_grad_()
    args32 = [to_library(x) for x in float32_kwargs(dict(enumerate(args))).values()]
    out = loss_fn(h.reshape(-1, h.shape[-1]) if flatten_hidden else h, w, *args32, impl=impl, **kw32)

    h64 = hidden.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    if okw.get("bias") is not None:
        okw["bias"] = okw["bias"].clone().requires_grad_()
    loss64, m64 = oracle_fn(h64, w64, *args, **okw)

    cot = cotangent(tuple(loss64.shape)) if callable(cotangent) else torch.tensor(cotangent, dtype=torch.float64)
    (out.loss * cot.float().to(device)).sum().backward()
    (loss64 * cot).sum().backward()
    grads = [(h.grad, h64.grad, "d hidden"), (w.grad, w64.grad, "d weight")]
    if kw32.get("bias") is not None:
        grads.append((kw32["bias"].grad, okw["bias"].grad, "d bias"))
    assert_loss_matches(out, loss64, m64, grads, rtol, metric_atol)
    return out, m64
