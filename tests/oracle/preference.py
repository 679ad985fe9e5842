"""Independent float64 oracles for the preference losses (docs/methods.md §2, §3, §5), their input
builders and the runner that checks a library loss against them.

Nothing here imports tokpo_kernels: full logits are materialised in float64 (``oracle.logits``),
sequences are reduced with explicit per-row Python loops over the response positions, and packing
for the TI-DPO triplet uses Python lists. Inputs may be any float dtype; they are used as given
(callers pass float64 leaves when they want gradients).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from oracle.compare import assert_close, atol_scaled
from oracle.logits import log_softmax64, logits64

Tensor = torch.Tensor


def token_terms(h, w, y, h_ref, w_ref, *, bias=None, ref_bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """Per row, the lists of (logp, ref_logp, kl) at the response positions, in order.

    Returns ``rows`` = a list (one per row) of lists of ``(ℓ[y_t], ℓ_ref[y_t], KL_t)`` scalars.
    """
    lp = log_softmax64(logits64(h, w, bias, temperature=temperature, softcap=softcap))
    lq = None
    if h_ref is not None:
        lq = log_softmax64(logits64(h_ref, w_ref, ref_bias, temperature=temperature, softcap=softcap)).detach()
    rows = []
    for r in range(y.shape[0]):
        items = []
        for t in range(y.shape[1]):
            yt = int(y[r, t])
            if yt == ignore_index:
                continue
            logp = lp[r, t, yt]
            if lq is None:
                items.append((logp, None, None))
                continue
            q = lq[r, t].exp()
            kl = (q * (lq[r, t] - lp[r, t])).sum()  # KL(q ‖ p) = Σ q (log q − log p)
            items.append((logp, lq[r, t, yt], kl))
        rows.append(items)
    return rows


def _sum(xs: List[Tensor], like: Tensor) -> Tensor:
    out = like.new_zeros(())
    for x in xs:
        out = out + x
    return out


def oracle_tdpo(h, w, y, h_ref, w_ref, *, beta=0.1, alpha=0.5, variant="tdpo2",
                **kw) -> Tuple[Tensor, Dict[str, Tensor]]:
    """docs/methods.md §2."""
    rows = token_terms(h, w, y, h_ref, w_ref, **kw)
    like = h.double()
    M = [_sum([lp - lr for lp, lr, _ in it], like) for it in rows]
    K = [_sum([k for _, _, k in it], like) for it in rows]
    L = [_sum([lp for lp, _, _ in it], like) for it in rows]
    n = len(rows) // 2
    losses, metrics = [], {k: [] for k in (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "kl/chosen", "kl/rejected", "kl/margin", "logps/chosen", "logps/rejected")}
    for b in range(n):
        mc, mr, kc, kr = M[b], M[n + b], K[b], K[n + b]
        if variant == "tdpo1":
            delta = (mc - mr) - (kr - kc)
        else:
            delta = (mc - mr) - alpha * (kr - kc.detach())
        losses.append(-F.logsigmoid(beta * delta))
        rc, rr = beta * (mc + kc), beta * (mr + kr)
        metrics["rewards/chosen"].append(rc)
        metrics["rewards/rejected"].append(rr)
        metrics["rewards/accuracies"].append((rc > rr).double())
        metrics["rewards/margins"].append(rc - rr)
        metrics["kl/chosen"].append(kc)
        metrics["kl/rejected"].append(kr)
        metrics["kl/margin"].append(kc - kr)
        metrics["logps/chosen"].append(L[b])
        metrics["logps/rejected"].append(L[n + b])
    loss = torch.stack(losses).mean()
    return loss, {k: torch.stack(v).detach() for k, v in metrics.items()}


def oracle_tidpo(h, w, y, h_ref, w_ref, *, token_weights=None, anchor_hidden=None, anchor_ref_hidden=None,
                 anchor_targets=None, beta=0.1, alpha=0.5, gamma=0.1, margin=0.01, preference="tdpo2",
                 kl_coef=0.0, **kw) -> Tuple[Tensor, Dict[str, Tensor]]:
    """docs/methods.md §3 (weighted preference + triplet over left-packed log-ratio vectors)."""
    ignore_index = kw.get("ignore_index", -100)
    rows = token_terms(h, w, y, h_ref, w_ref, **kw)
    like = h.double()
    # positions of the response tokens of each row, to look up the weights of the label tokens
    pos = [[t for t in range(y.shape[1]) if int(y[r, t]) != ignore_index] for r in range(y.shape[0])]
    Mw, K, L, dvec = [], [], [], []
    for r, it in enumerate(rows):
        ws = [1.0 if token_weights is None else float(token_weights[r, t]) for t in pos[r]]
        Mw.append(_sum([wt * (lp_ - lr) for wt, (lp_, lr, _) in zip(ws, it, strict=True)], like))
        K.append(_sum([k for _, _, k in it], like))
        L.append(_sum([lp_ for lp_, _, _ in it], like))
        dvec.append([lp_ - lr for lp_, lr, _ in it])  # packed left: response positions in order
    n = len(rows) // 2
    pref = []
    for b in range(n):
        if preference == "tdpo2":
            delta = (Mw[b] - Mw[n + b]) - alpha * (K[n + b] - K[b].detach())
        elif preference == "tdpo1":
            delta = (Mw[b] - Mw[n + b]) - (K[n + b] - K[b])
        else:
            delta = Mw[b] - Mw[n + b]
        pref.append(-F.logsigmoid(beta * delta))
    loss = torch.stack(pref).mean()

    triplet = like.new_zeros(())
    if anchor_hidden is not None and margin > 0:
        arows = token_terms(anchor_hidden, w, anchor_targets, anchor_ref_hidden, w_ref, **kw)
        terms = []
        for b in range(n):
            da = [lp_ - lr for lp_, lr, _ in arows[b]]
            if not da:  # an anchor without response tokens contributes 0 (the authors' code)
                terms.append(like.new_zeros(()))
                continue
            dp = _sum([(a - c) ** 2 for a, c in zip(da, dvec[b], strict=False)], like)  # the overlap only
            dn = _sum([(a - c) ** 2 for a, c in zip(da, dvec[n + b], strict=False)], like)
            terms.append(torch.clamp(dp - dn + margin, min=0.0))
        triplet = torch.stack(terms).mean()
        loss = loss + gamma * triplet
    if kl_coef > 0:
        loss = loss + kl_coef * torch.stack([0.5 * (K[b] + K[n + b]) for b in range(n)]).mean()

    met = {k: [] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                           "kl/chosen", "kl/rejected", "kl/margin", "logps/chosen", "logps/rejected")}
    for b in range(n):
        # docs/methods.md §3: metrics as TDPO with the weighted margin, β(M_w + K), for both preference forms
        rc, rr = beta * (Mw[b] + K[b]), beta * (Mw[n + b] + K[n + b])
        met["rewards/chosen"].append(rc)
        met["rewards/rejected"].append(rr)
        met["rewards/accuracies"].append((rc > rr).double())
        met["rewards/margins"].append(rc - rr)
        met["kl/chosen"].append(K[b])
        met["kl/rejected"].append(K[n + b])
        met["kl/margin"].append(K[b] - K[n + b])
        met["logps/chosen"].append(L[b])
        met["logps/rejected"].append(L[n + b])
    metrics = {k: torch.stack(v).detach() for k, v in met.items()}
    metrics["triplet_loss"] = triplet.detach()
    return loss, metrics


def oracle_dpo(h, w, y, h_ref=None, w_ref=None, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
               ref_logp=None, average_log_prob=None, reference_free=False, **kw) -> Tuple[Tensor, Dict[str, Tensor]]:
    """docs/methods.md §5 with TRL's loss types (IPO on per-token averages)."""
    ignore_index = kw.get("ignore_index", -100)
    if average_log_prob is None:
        average_log_prob = loss_type == "ipo"
    rows = token_terms(h, w, y, h_ref, w_ref, **kw)
    like = h.double()
    logps, refs = [], []
    for r, it in enumerate(rows):
        cnt = max(len(it), 1)
        s = _sum([lp for lp, _, _ in it], like)
        if h_ref is not None:
            rs = _sum([lr for _, lr, _ in it], like)
        elif ref_logp is not None and ref_logp.dim() == 2:
            rs = like.new_tensor(sum(float(ref_logp[r, t]) for t in range(y.shape[1]) if int(y[r, t]) != ignore_index))
        elif ref_logp is not None:
            rs = like.new_tensor(float(ref_logp[r]))
        else:
            rs = like.new_zeros(())
        if average_log_prob:
            s = s / cnt
            if not (ref_logp is not None and ref_logp.dim() == 1):
                rs = rs / cnt
        logps.append(s)
        refs.append(rs)
    n = len(rows) // 2
    losses, met = [], {k: [] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                       "rewards/margins", "logps/chosen", "logps/rejected")}
    for b in range(n):
        rc, rr = logps[b] - refs[b], logps[n + b] - refs[n + b]
        x = rc - rr
        if loss_type == "sigmoid":
            pair = -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)
        elif loss_type == "ipo":
            pair = (x - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            pair = torch.clamp(1 - beta * x, min=0.0)
        else:
            raise ValueError(loss_type)
        losses.append(pair)
        met["rewards/chosen"].append(beta * rc)
        met["rewards/rejected"].append(beta * rr)
        met["rewards/accuracies"].append((beta * rc > beta * rr).double())
        met["rewards/margins"].append(beta * rc - beta * rr)
        met["logps/chosen"].append(logps[b])
        met["logps/rejected"].append(logps[n + b])
    return torch.stack(losses).mean(), {k: torch.stack(v).detach() for k, v in met.items()}


def oracle_importance(scores: Tensor, mask: Tensor, lam: float, sigma_div: float) -> Tensor:
    """docs/methods.md §3 step 2, row by row in Python floats."""
    out = torch.zeros(scores.shape, dtype=torch.float64)
    s2 = scores.reshape(-1, scores.shape[-1])
    m2 = mask.reshape(-1, mask.shape[-1])
    o2 = out.view(-1, out.shape[-1])
    for r in range(s2.shape[0]):
        idx = [t for t in range(s2.shape[1]) if bool(m2[r, t])]
        n = len(idx)
        if n <= 1:
            continue
        vals = [max(float(s2[r, t]), 0.0) for t in idx]
        tot = sum(vals)
        mu, sigma = (n - 1) / 2.0, max(1.0, n / sigma_div)
        prior = [math.exp(-0.5 * ((j - mu) / sigma) ** 2) for j in range(n)]
        ps = sum(prior)
        prior = [p / ps for p in prior]
        if tot > 0:
            wts = [lam * v / tot + (1 - lam) * p for v, p in zip(vals, prior, strict=True)]
        else:
            wts = prior
        mean = sum(wts) / n
        for t, wv in zip(idx, wts, strict=True):
            o2[r, t] = wv / mean
    return out


# ---------------------------------------------------------------------------------------------
# Test-input helpers shared by tests/test_loss_{tdpo,tidpo,dpo}.py (no tokpo_kernels code either)
# ---------------------------------------------------------------------------------------------

# (B pairs, T, D, V): a typical case, a degenerate one (T = D = 1) and one with V a power of two.
SHAPES = [(2, 7, 12, 37), (1, 1, 1, 5), (3, 5, 3, 64)]
TINY_SHAPES = [(2, 6, 16, 45), (1, 3, 5, 7)]  # for the interpreted Triton kernels: 2B <= 4, T <= 8


def response_targets(rows: int, T: int, V: int, gen: torch.Generator, *, ignore_index: int = -100,
                 prompt: bool = True) -> Tensor:
    """Random labels with a random-length ignored prompt per row, some right padding, one interior
    ignored label (a non-contiguous response span) and, when there are >= 2 rows and T >= 3, one
    row with every label ignored."""
    y = torch.randint(0, V, (rows, T), generator=gen)
    if not prompt or T == 1:
        return y
    for r in range(rows):
        p = int(torch.randint(0, T - 1, (1,), generator=gen))
        y[r, :p] = ignore_index
        if r % 2 == 1 and T >= 4:
            y[r, -1] = ignore_index  # right padding
        if r % 3 == 2 and T - p >= 3:
            y[r, p + 1] = ignore_index  # a hole inside the response
    if rows >= 2 and T >= 3:
        y[rows - 1] = ignore_index  # one fully ignored row (M = K = 0)
    return y


def make_batch(B: int, T: int, D: int, V: int, seed: int = 0, *, bias: bool = False, d_ref: Optional[int] = None,
               prompt: bool = True, scale: float = 1.0) -> Dict[str, Tensor]:
    """fp32 policy/reference inputs for ``2B`` stacked rows. The reference is a perturbed policy."""
    gen = torch.Generator().manual_seed(seed)
    d_ref = D if d_ref is None else d_ref
    out = {
        "hidden": torch.randn(2 * B, T, D, generator=gen) * scale,
        "weight": torch.randn(V, D, generator=gen) / math.sqrt(D) * 2.0,
        "targets": response_targets(2 * B, T, V, gen, prompt=prompt),
    }
    if d_ref == D:
        out["ref_hidden"] = out["hidden"] + 0.3 * torch.randn(2 * B, T, D, generator=gen)
        out["ref_weight"] = out["weight"] + 0.3 * torch.randn(V, D, generator=gen) / math.sqrt(D)
    else:
        out["ref_hidden"] = torch.randn(2 * B, T, d_ref, generator=gen) * scale
        out["ref_weight"] = torch.randn(V, d_ref, generator=gen) / math.sqrt(d_ref) * 2.0
    if bias:
        out["bias"] = 0.5 * torch.randn(V, generator=gen)
        out["ref_bias"] = 0.5 * torch.randn(V, generator=gen)
    return out


POSITIONAL = ("hidden", "weight", "targets", "ref_hidden", "ref_weight")


def run_loss(fn, inputs: Dict[str, Tensor], grad_keys, cotangent: float, *, dtype=None, device=None, **kwargs):
    """Call ``fn(hidden, weight, targets, ref_hidden, ref_weight, **rest, **kwargs)`` on fresh leaves
    (cast to ``dtype`` and moved to ``device`` when given; ids keep their dtype), backprop
    ``cotangent · loss`` and return ``(loss, metrics, {name: grad})``. Works for the library losses
    and for the oracles alike."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            leaves[k] = None
            continue
        x = v.detach().clone()
        if device is not None:
            x = x.to(device)
        if x.dtype.is_floating_point:
            if dtype is not None:
                x = x.to(dtype)
            x.requires_grad_(k in grad_keys)
        leaves[k] = x
    pos = [leaves.get(k) for k in POSITIONAL]
    rest = {k: v for k, v in leaves.items() if k not in POSITIONAL}
    out = fn(*pos, **rest, **kwargs)
    loss, metrics = (out.loss, out.metrics) if hasattr(out, "loss") else out
    wanted = [k for k in grad_keys if leaves.get(k) is not None]
    if not wanted:
        return loss.detach(), metrics, {}
    grads = torch.autograd.grad(loss * cotangent, [leaves[k] for k in wanted], allow_unused=True)
    return loss.detach(), metrics, {
        k: (torch.zeros_like(leaves[k]) if g is None else g) for k, g in zip(wanted, grads, strict=True)
    }


def compare_with_oracle(fn, oracle, metric_names, batch, grad_keys, impl, *, cotangent_seed: int, rtol: float = 2e-4,
                        atol: float = 2e-5, device: str = "cpu", **kwargs):
    """Run the library loss ``fn`` (fp32, on ``device``) and its float64 ``oracle`` on the same
    leaves with one random cotangent (drawn from ``cotangent_seed``) and assert they agree: a 0-d
    fp32 loss, exactly the ``metric_names`` (detached, each close to the oracle's, same shape) and
    the gradients of ``grad_keys`` (rtol 1e-3, atol 1e-4), every absolute tolerance ``atol_scaled``.
    Returns the library's ``(loss, metrics, grads)``."""
    g = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(cotangent_seed)).item()
    loss, metrics, grads = run_loss(fn, batch, grad_keys, g, impl=impl, device=device, **kwargs)
    o_loss, o_metrics, o_grads = run_loss(oracle, batch, grad_keys, g, dtype=torch.float64, **kwargs)
    assert loss.dim() == 0 and loss.dtype == torch.float32, f"loss: expected a 0-d fp32 tensor, got {loss}"
    assert_close(loss, o_loss, rtol=rtol, atol=atol_scaled(atol, o_loss), name="loss")
    assert set(metrics) == set(metric_names), f"metric names: expected {sorted(metric_names)}, got {sorted(metrics)}"
    for k in metric_names:
        assert not metrics[k].requires_grad, f"metric {k}: expected detached"
        assert_close(metrics[k], o_metrics[k], rtol=rtol, atol=atol_scaled(atol, o_metrics[k]), name=k)
    for k in grad_keys:
        assert_close(grads[k], o_grads[k], rtol=1e-3, atol=atol_scaled(1e-4, o_grads[k]), name=f"d{k}")
    return loss, metrics, grads
