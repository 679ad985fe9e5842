"""The float64 oracle, input builder and rounding-aware comparison of the property-based tests
(tests/test_property_based.py). Nothing here imports tokpo_kernels.

One drawn configuration (``StatsDraw``) becomes float64 tensors stored in a drawn layout (transposed
views, sliced hidden states, strided targets), cast to the drawn dtypes; the oracle sees exactly the
rounded values the library was given, upcast to float64, and computes every statistic from the full
float64 logits of ``oracle.logits.logits64`` (written out here, independent of ``oracle.stats``):

    ℓ = z − lse(z),  logp_j = ℓ[y_j],  H = −Σ p ℓ,  KL = Σ q (ℓ_ref − ℓ) (value clamped at 0),
    max_logit = max_v z_v,  mean_logit = Σ_v z_v / V;  fully ignored tokens: 0 and no gradient.

Gradients are float64 autograd of ``Σ_s Σ cot_s · s`` with random cotangents (also on ignored entries).

Why the tolerance depends on the draw. A draw may have logits of magnitude 1e4 with near-ties, where
no fp32 implementation can meet a fixed 1e-4: one fp32 rounding of a logit is then ~1e-3, and the
softmax passes that on. So each comparison allows the project's fixed tolerance (1e-4 for fp32,
1e-10 for fp64, as tests/test_vocab_stats_values_and_grads.py) *plus* ``K`` times what unavoidable
rounding of the logits costs on this very draw, computed from the oracle itself:

* every raw logit ``r = h·w + b`` may carry ``Δ = (D + 2)·u_acc·(Σ_d |h_d w_d| + |b|) + u_z·|r|``
  (the textbook dot-product error bound in the accumulation dtype, plus one rounding of the logit
  in the dtype it is materialised in: fp32 for the fused backends, the input dtype for ``naive``);
* a value may be off by its first-order worst case ``Σ_v |∂stat/∂r_v|·Δ_v`` (exact derivatives of the
  oracle, by autograd through an added zero perturbation of the logits), plus ``(V + 2)·u_acc`` per
  unit of the statistic for the fp32 sums over the vocabulary;
* a gradient may be off by ``|δc| @ |W|`` (``|δc|ᵀ @ |h|`` for ``∂W``, ``Σ_n |δc|`` for ``∂b``), where
  ``c = ∂L/∂r`` and ``|δc_v| = Σ_u |∂c_v/∂r_u|·Δ_u + (V + 2)·u_acc·|c_v|`` (its first-order worst case
  from the logits' errors, by double backward, and the dot-product bound of the final product in the
  accumulation dtype), plus one rounding to the output dtype.

On well-conditioned draws these terms are far below the fixed tolerance, so the check is the
project's; they matter only where the logits are huge, and never exceed what rounding of the inputs
to the matmul forces on any implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from oracle.logits import logits64

POLICY = ("hidden", "weight", "bias")
REFERENCE = ("ref_hidden", "ref_weight", "ref_bias")
STATS = ("logp", "lse", "ref_logp", "kl", "entropy", "max_logit", "mean_logit")
DIFF = ("logp", "lse", "kl", "entropy", "mean_logit")  # the differentiable statistics

# Unit roundoff u = eps/2 of each dtype.
UNIT = {dt: torch.finfo(dt).eps / 2 for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
# The project's fixed tolerances (tests/test_vocab_stats_values_and_grads.py): fp32 1e-4, fp64 1e-10.
FIXED_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# Headroom over the draw's first-order worst-case rounding bounds (second-order terms stay far below).
K_ROUNDING = 4.0


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64 (docs/numerics.md)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# A drawn configuration and its tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsDraw:
    """One ``linear_vocab_stats`` input configuration (hypothesis draws these fields)."""

    token_shape: Tuple[int, ...]
    V: int
    D: int
    dtype: torch.dtype
    J: Optional[int] = None               # several target ids per token, padded with ignore_index
    ref_dtype: Optional[torch.dtype] = None  # None: no reference
    D_ref: int = 1
    bias: bool = False
    ref_bias: bool = False
    kl: bool = False
    entropy: bool = False
    max_logit: bool = False
    mean_logit: bool = False
    temperature: float = 1.0
    softcap: Optional[float] = None
    scale: float = 1.0                    # std of the raw policy logits
    ref_scale: float = 1.0
    mask: str = "some"                    # "none" | "some" | "rows" (whole tokens) | "all"
    ignore_index: int = -100
    weight_layout: str = "contiguous"     # "contiguous" | "transpose" ((D, V) storage read as .t()) | "slice"
    hidden_layout: str = "contiguous"     # "contiguous" | "transpose" (token dims last in storage) | "slice"
    poison_ignored: bool = False          # NaN/inf in the hidden states of fully ignored tokens
    seed: int = 0

    def opts(self) -> Dict[str, object]:
        return dict(kl=self.kl, entropy=self.entropy, ignore_index=self.ignore_index,
                    temperature=self.temperature, softcap=self.softcap, max_logit=self.max_logit,
                    mean_logit=self.mean_logit)


def _targets(d: StatsDraw, gen: torch.Generator) -> torch.Tensor:
    n = 1
    for s in d.token_shape:
        n *= s
    j = d.J or 1
    ids = torch.randint(0, d.V, (n, j), generator=gen)
    if d.ignore_index >= 0:
        # An ignore_index inside [0, V) is a real id that means "no target": draw the others around it.
        ids = torch.where(ids == d.ignore_index, (ids + 1) % d.V, ids) if d.V > 1 else ids
    slot_ign = torch.zeros(n, j, dtype=torch.bool)
    if d.mask in ("some", "rows"):
        slot_ign = torch.rand(n, j, generator=gen) < 0.3
    if d.mask == "rows":
        slot_ign |= (torch.rand(n, 1, generator=gen) < 0.4)  # whole tokens ignored
    if d.mask == "all":
        slot_ign[:] = True
    elif n > 0 and bool(slot_ign.all()):
        slot_ign[0, 0] = False  # "some"/"rows" keep one valid token ("all" is its own case)
    ids[slot_ign] = d.ignore_index
    return ids.reshape(*d.token_shape, j) if d.J else ids.reshape(d.token_shape)


def logical_leaves(d: StatsDraw) -> Dict[str, Optional[torch.Tensor]]:
    """float64 tensors of the draw, in their logical shapes (raw logits have std ≈ scale)."""
    gen = torch.Generator().manual_seed(d.seed)
    out: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(POLICY + REFERENCE)
    out["hidden"] = torch.randn(*d.token_shape, d.D, generator=gen, dtype=torch.float64)
    out["weight"] = torch.randn(d.V, d.D, generator=gen, dtype=torch.float64) * (d.scale / d.D ** 0.5)
    if d.bias:
        out["bias"] = torch.randn(d.V, generator=gen, dtype=torch.float64) * (0.5 * d.scale)
    if d.ref_dtype is not None:
        out["ref_hidden"] = torch.randn(*d.token_shape, d.D_ref, generator=gen, dtype=torch.float64)
        out["ref_weight"] = (torch.randn(d.V, d.D_ref, generator=gen, dtype=torch.float64)
                             * (d.ref_scale / d.D_ref ** 0.5))
        if d.ref_bias:
            out["ref_bias"] = torch.randn(d.V, generator=gen, dtype=torch.float64) * (0.5 * d.ref_scale)
    out["targets"] = _targets(d, gen)
    if d.poison_ignored:
        tg = out["targets"] if d.J else out["targets"].unsqueeze(-1)
        dead = ~(tg != d.ignore_index).any(-1)
        poison = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        for name in ("hidden", "ref_hidden"):
            if out[name] is not None and bool(dead.any()):
                h = out[name].clone()
                h[dead] = poison[torch.randint(0, 3, (int(dead.sum()), 1), generator=gen)].expand(-1, h.shape[-1])
                out[name] = h
    out["cot_seed"] = torch.tensor(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return out


def _store(t: torch.Tensor, layout: str, kind: str) -> torch.Tensor:
    """The storage a leaf is allocated as (what receives ``.grad``); ``_view`` reads it back."""
    if layout == "transpose":
        return t.movedim(-1, 0).contiguous() if kind == "hidden" else t.t().contiguous()
    if layout == "slice":
        # Junk NaN columns before the data: a kernel reading outside the view returns NaN.
        pad = torch.full((*t.shape[:-1], 3), float("nan"), dtype=t.dtype)
        return torch.cat([pad, t], dim=-1)
    return t


def _view(t: torch.Tensor, layout: str, kind: str) -> torch.Tensor:
    if layout == "transpose":
        return t.movedim(0, -1) if kind == "hidden" else t.t()
    if layout == "slice":
        return t[..., 3:]
    return t


@dataclass
class Inputs:
    """The stored leaves of one call (cast and on their device) and how to view them logically."""

    stored: Dict[str, Optional[torch.Tensor]]
    targets: torch.Tensor
    draw: StatsDraw

    def views(self) -> Dict[str, Optional[torch.Tensor]]:
        d, s = self.draw, self.stored
        return dict(
            hidden=_view(s["hidden"], d.hidden_layout, "hidden"),
            weight=_view(s["weight"], d.weight_layout, "weight"),
            bias=s["bias"],
            ref_hidden=None if s["ref_hidden"] is None else _view(s["ref_hidden"], d.hidden_layout, "hidden"),
            ref_weight=None if s["ref_weight"] is None else _view(s["ref_weight"], d.weight_layout, "weight"),
            ref_bias=s["ref_bias"],
        )


def make_inputs(d: StatsDraw, logical: Dict[str, Optional[torch.Tensor]], device: str) -> Inputs:
    """Leaves in the draw's dtypes and layouts on ``device``; policy leaves require grad."""
    stored: Dict[str, Optional[torch.Tensor]] = {}
    for name in POLICY + REFERENCE:
        t = logical[name]
        if t is None:
            stored[name] = None
            continue
        dtype = d.dtype if name in POLICY else d.ref_dtype
        kind = "hidden" if name.endswith("hidden") else "weight"
        layout = d.hidden_layout if kind == "hidden" else d.weight_layout
        s = _store(t, layout, kind) if t.dim() > 1 else t
        stored[name] = s.to(device=device, dtype=dtype).requires_grad_(name in POLICY)
    tg = logical["targets"]
    if tg.dim() >= 1 and tg.numel() > 0:
        # Targets as a strided view (every other id of a longer buffer), as a sliced batch gives them.
        buf = torch.full((*tg.shape[:-1], 2 * tg.shape[-1]), 2**40, dtype=torch.long)
        buf[..., ::2] = tg
        tg = buf.to(device)[..., ::2]
    else:
        tg = tg.to(device)
    return Inputs(stored, tg, d)


def oracle_leaves(inp: Inputs) -> Dict[str, Optional[torch.Tensor]]:
    """Exactly the values the library got (logical views), as fresh float64 CPU leaves."""
    return {k: (None if v is None else v.detach().cpu().double().clone().requires_grad_(k in POLICY))
            for k, v in inp.views().items()}


def make_cotangents(d: StatsDraw, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(d.seed + 1)
    return {
        "logp": torch.randn(tuple(targets.shape), generator=gen, dtype=torch.float64),
        **{s: torch.randn(d.token_shape, generator=gen, dtype=torch.float64)
           for s in ("lse", "kl", "entropy", "mean_logit")},
    }


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def oracle_stats(x: Dict[str, Optional[torch.Tensor]], targets: torch.Tensor, d: StatsDraw,
                 eps: Optional[torch.Tensor] = None, eps_ref: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Every statistic from full float64 logits; ``eps``/``eps_ref`` are added to the raw logits
    (zeros: they only carry derivatives for the rounding bounds)."""
    targets = targets.cpu()
    multi = d.J is not None
    tg = targets if multi else targets.unsqueeze(-1)
    tvalid = tg != d.ignore_index
    row = tvalid.any(-1)
    safe = torch.where(tvalid, tg, torch.zeros_like(tg))
    zero = torch.zeros((), dtype=torch.float64)
    # Fully ignored tokens influence nothing: their (possibly non-finite) hidden states are replaced
    # before any arithmetic, so neither a value nor a gradient can see them.
    h = torch.where(row[..., None], x["hidden"], zero)
    raw = logits64(h, x["weight"], x["bias"])
    if eps is not None:
        raw = raw + eps
    z = logits64_transform(raw, d)
    lse = _lse(z)
    ell = z - lse[..., None]
    logp = torch.where(tvalid, ell.gather(-1, safe), zero)
    out: Dict[str, object] = dict.fromkeys(STATS)
    out.update(logp=logp if multi else logp.squeeze(-1), lse=torch.where(row, lse, zero), mask=row)
    if d.entropy:
        out["entropy"] = torch.where(row, -(ell.exp() * ell).sum(-1), zero)
    if d.max_logit:
        out["max_logit"] = torch.where(row, z.amax(-1), zero)
    if d.mean_logit:
        out["mean_logit"] = torch.where(row, z.mean(-1), zero)
    if d.ref_dtype is not None:
        rh = torch.where(row[..., None], x["ref_hidden"].detach(), zero)
        rb = None if x["ref_bias"] is None else x["ref_bias"].detach()
        raw_r = logits64(rh, x["ref_weight"].detach(), rb)
        if eps_ref is not None:
            raw_r = raw_r + eps_ref
        zr = logits64_transform(raw_r, d)
        ell_r = zr - _lse(zr)[..., None]
        ref_logp = torch.where(tvalid, ell_r.gather(-1, safe), zero)
        out["ref_logp"] = ref_logp if multi else ref_logp.squeeze(-1)
        if d.kl:
            kl_raw = (ell_r.exp() * (ell_r - ell)).sum(-1)
            kl = kl_raw + (kl_raw.clamp_min(0.0) - kl_raw).detach()  # value clamped, gradient unclamped
            out["kl"] = torch.where(row, kl, zero)
    return out


def logits64_transform(raw: torch.Tensor, d: StatsDraw) -> torch.Tensor:
    z = raw if d.softcap is None else d.softcap * torch.tanh(raw / d.softcap)
    return z / d.temperature


def _lse(z: torch.Tensor) -> torch.Tensor:
    if z.shape[-1] == 0:
        return z.sum(-1)
    m = z.amax(-1, keepdim=True).detach()
    return m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))


def weighted_loss(values: Dict[str, object], cot: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """``Σ_s Σ cot_s · s`` over the differentiable statistics present (in the values' dtype/device)."""
    loss = None
    for s in DIFF:
        v = values.get(s)
        if v is None or not v.requires_grad:
            continue
        term = (cot[s].to(device=v.device, dtype=v.dtype) * v).sum()
        loss = term if loss is None else loss + term
    return loss


# --------------------------------------------------------------------------------------------
# The rounding scale of a draw
# --------------------------------------------------------------------------------------------


def _logit_rounding(x: Dict[str, Optional[torch.Tensor]], pre: str, u_acc: float, u_z: float,
                    rows: torch.Tensor) -> torch.Tensor:
    """Per raw logit: ``(D + 2)·u_acc·(Σ_d |h_d w_d| + |b|) + (u_z + 4·u_acc)·|r|`` (0 on ignored tokens)."""
    h = torch.where(rows[..., None], x[pre + "hidden"].detach(), torch.zeros((), dtype=torch.float64))
    w = x[pre + "weight"].detach()
    b = x[pre + "bias"]
    absdot = h.abs() @ w.abs().t() + (0.0 if b is None else b.detach().abs())
    r = h @ w.t() + (0.0 if b is None else b.detach())
    return (h.shape[-1] + 2) * u_acc * absdot + (u_z + 4 * u_acc) * r.abs()


@dataclass
class Bounds:
    values: Dict[str, torch.Tensor]       # elementwise allowance per statistic (before the fixed tolerance)
    grads: Dict[str, torch.Tensor]        # elementwise allowance per gradient
    linear: bool = True                   # False: the logits' rounding is too large for first order


# Beyond this worst error of a transformed logit (in nats) first-order bounds no longer hold (a
# rounding of 4 nats can swap the argmax): only the statistics that are Lipschitz in the logits are
# checked then, with their global constants (lse, max_logit, mean_logit: 1; logp, ref_logp: 2).
LINEAR_LIMIT = 0.1
LIPSCHITZ = {"lse": 1.0, "max_logit": 1.0, "mean_logit": 1.0, "logp": 2.0, "ref_logp": 2.0}


def rounding_bounds(x: Dict[str, Optional[torch.Tensor]], targets: torch.Tensor, d: StatsDraw,
                    cot: Dict[str, torch.Tensor], *, u_acc: float, u_z: float, u_ref_z: float,
                    u_out: float, u_c: float = 0.0) -> Bounds:
    """What unavoidable rounding of the logits costs on this draw (module docstring), from the oracle.

    ``u_acc``: unit roundoff of the accumulation; ``u_z``/``u_ref_z``: of the dtype the policy /
    reference logits are materialised in; ``u_out``: of the gradients' dtype; ``u_c``: of the dtype
    ``∂L/∂r`` is rounded to before the backward products (the input dtype for ``naive``).
    """
    x = {k: (None if v is None else v.detach().requires_grad_(k in POLICY)) for k, v in x.items()}
    tg = targets.cpu() if d.J is not None else targets.cpu().unsqueeze(-1)
    rows = (tg != d.ignore_index).any(-1)
    delta = _logit_rounding(x, "", u_acc, u_z, rows)
    delta_r = _logit_rounding(x, "ref_", u_acc, u_ref_z, rows) if d.ref_dtype is not None else None
    dz = max(float(delta.max()) if delta.numel() else 0.0,
             float(delta_r.max()) if delta_r is not None and delta_r.numel() else 0.0) / d.temperature
    if dz > LINEAR_LIMIT:
        o = oracle_stats(x, targets, d)
        vb = {s: LIPSCHITZ[s] * dz + (d.V + 2) * u_acc * (1.0 + o[s].detach().abs())
              for s in LIPSCHITZ if o[s] is not None}
        return Bounds(vb, {}, linear=False)
    eps = torch.zeros_like(delta, requires_grad=True)
    eps_r = None if delta_r is None else torch.zeros_like(delta_r, requires_grad=True)
    o = oracle_stats(x, targets, d, eps, eps_r)
    V = d.V
    vb: Dict[str, torch.Tensor] = {}
    for s in STATS:
        v = o[s]
        if v is None:
            continue
        sums = (V + 2) * u_acc * (1.0 + v.detach().abs())  # the fp32 sums over the vocabulary
        # Each entry of a statistic depends on its own token's logits only, so the gradient of the sum
        # of one target slot's entries holds ∂stat_n/∂r_n,v for every token n.
        slots = [v] if not (s in ("logp", "ref_logp") and d.J is not None) else list(v.unbind(-1))
        parts = []
        for sv in slots:
            wrt = [t for t in (eps, eps_r) if t is not None]
            gs = torch.autograd.grad(sv.sum(), wrt, retain_graph=True, allow_unused=True)
            b = torch.zeros(sv.shape, dtype=torch.float64)
            for g, dl in zip(gs, [delta, delta_r][: len(wrt)], strict=True):
                if g is not None:
                    b = b + (g.abs() * dl).sum(-1)
            parts.append(b)
        first_order = torch.stack(parts, -1) if len(slots) > 1 or v.dim() > len(d.token_shape) else parts[0]
        vb[s] = first_order + sums
    gb: Dict[str, torch.Tensor] = {}
    loss = weighted_loss(o, cot)
    leaves = [x[k] for k in POLICY if x[k] is not None]
    names = [k for k in POLICY if x[k] is not None]
    if loss is None:
        return Bounds(vb, {k: torch.zeros_like(x[k]) for k in names})
    grads = torch.autograd.grad(loss, leaves + [eps], create_graph=True, allow_unused=True)
    c = grads[-1]  # ∂L/∂r (raw logits), with a graph
    # Worst first-order error of c from the logits' errors: |δc_nv| ≤ Σ_u |∂c_nv/∂r_nu| Δ_nu (+ the
    # reference's). c_n depends on token n's logits only, so one batched backward per vocabulary column
    # v gives ∂c_nv/∂r_nu for every n and u.
    dc = torch.zeros_like(delta)
    if c is not None and c.requires_grad and V > 0:
        onehot = torch.eye(V, dtype=torch.float64).reshape(V, *([1] * (c.dim() - 1)), V).expand(V, *c.shape)
        wrt = [t for t in (eps, eps_r) if t is not None]
        hess = torch.autograd.grad(c, wrt, grad_outputs=onehot.contiguous(), is_grads_batched=True,
                                   retain_graph=True, allow_unused=True)
        for hs, dl in zip(hess, [delta, delta_r][: len(wrt)], strict=True):
            if hs is not None:
                dc = dc + (hs.abs() * dl).sum(-1).movedim(0, -1)
    h = torch.where(rows[..., None], x["hidden"].detach(), torch.zeros((), dtype=torch.float64))
    cabs = torch.zeros_like(delta) if c is None else c.detach().abs()
    n_tok = h[..., 0].numel()
    # The backward products in the accumulation dtype (and the rounding of c to u_c first) add the
    # dot-product bound of each product.
    ch = ((V + 2) * u_acc + u_c) * cabs + dc
    cw = ((n_tok + 2) * u_acc + u_c) * cabs + dc
    hflat = h.reshape(-1, h.shape[-1]).abs()
    product = {
        "hidden": ch @ x["weight"].detach().abs(),
        "weight": cw.reshape(-1, V).t() @ hflat,
        "bias": cw.reshape(-1, V).sum(0),
    }
    for k, g in zip(names, grads[:-1], strict=True):
        gb[k] = product[k] + (0.0 if g is None else u_out * g.detach().abs())
    return Bounds(vb, gb)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, allowance: torch.Tensor,
                fixed: float, *, normwise: bool) -> None:
    """``|a − e| ≤ fixed·(1 + |e|) + K·allowance`` elementwise, or for ``normwise`` (gradients)
    ``|a − e| ≤ fixed·max(1, max|e|) + K·allowance``; the message names the worst element."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert a.shape == e.shape, f"{name}: expected shape {tuple(e.shape)}, got {tuple(a.shape)}"
    assert bool(torch.isfinite(a).all()), f"{name}: expected finite values, got {a}"
    floor = fixed * (max(1.0, float(e.abs().max())) if e.numel() else 1.0) if normwise else fixed * (1 + e.abs())
    tol = floor + K_ROUNDING * allowance
    assert torch.broadcast_shapes(tol.shape, a.shape) == a.shape, (
        f"{name}: tolerance of shape {tuple(tol.shape)} for a value of shape {tuple(a.shape)}")
    err = (a - e).abs()
    bad = err > tol
    if not bool(bad.any()):
        return
    worst = int(torch.where(bad, err / tol, torch.zeros_like(err)).reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {a.numel()} elements outside tolerance; worst at {idx}: expected "
        f"{float(e.reshape(-1)[worst]):.9g}, got {float(a.reshape(-1)[worst]):.9g} (|diff| "
        f"{float(err.reshape(-1)[worst]):.3e}, allowed {float(tol.reshape(-1)[worst]):.3e})"
    )


def normwise_error(a: Optional[torch.Tensor], e: Optional[torch.Tensor]) -> float:
    """``max|a − e| / max(1, max|e|)`` (the three-way criterion's measure)."""
    if e is None or e.numel() == 0:
        return 0.0
    return float((a.detach().cpu().double() - e.detach()).abs().max() / max(1.0, float(e.detach().abs().max())))


def run(fn: Callable[..., object], inp: Inputs, cot: Dict[str, torch.Tensor], **kwargs) -> Tuple[Dict, Dict]:
    """``fn(**views, targets, **kwargs)``, its statistics and the gradients of the policy's stored leaves."""
    for v in inp.stored.values():
        if v is not None:
            v.grad = None
    x = inp.views()
    st = fn(x["hidden"], x["weight"], inp.targets, bias=x["bias"], ref_hidden=x["ref_hidden"],
            ref_weight=x["ref_weight"], ref_bias=x["ref_bias"], **kwargs)
    values = {s: getattr(st, s) for s in STATS}
    values["mask"] = st.mask
    loss = weighted_loss(values, cot)
    leaves = [k for k in POLICY if inp.stored[k] is not None]
    grads: Dict[str, torch.Tensor] = {}
    if loss is not None:
        gs = torch.autograd.grad(loss, [inp.stored[k] for k in leaves], allow_unused=True)
        grads = {k: (torch.zeros_like(inp.stored[k]) if g is None else g) for k, g in zip(leaves, gs, strict=True)}
    else:
        grads = {k: torch.zeros_like(inp.stored[k]) for k in leaves}
    # Gradients of the storage read back through the layout (junk columns must get exactly 0).
    d = inp.draw
    logical = {"hidden": _view(grads["hidden"], d.hidden_layout, "hidden"),
               "weight": _view(grads["weight"], d.weight_layout, "weight")}
    if "bias" in grads:
        logical["bias"] = grads["bias"]
    for k, layout in (("hidden", d.hidden_layout), ("weight", d.weight_layout)):
        if layout == "slice":
            junk = grads[k][..., :3]
            assert bool((junk == 0).all()), f"grad {k}: the columns outside the sliced view must get 0, got {junk}"
    return {k: (None if v is None else v.detach()) for k, v in values.items()}, logical
