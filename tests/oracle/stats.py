"""Independent float64 oracle for ``linear_vocab_stats``, its inputs and the check against it.

Nothing here imports tokpo_kernels: the statistics are written directly from their definitions
(docs/methods.md §1) on full float64 logits (``oracle.logits``), and gradients come from float64
autograd through them.

    lse = log Σ_v exp z_v,  ℓ = z − lse,  p = exp ℓ
    logp_j = ℓ[y_j]  (0 where y_j == ignore_index)
    H = −Σ_v p_v ℓ_v
    KL = Σ_v q_v (ℓ_ref,v − ℓ_v)  with q = softmax(z_ref) (no gradient), value clamped at 0
Tokens whose targets are all ignored have lse = KL = H = 0 and no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import torch

from oracle.compare import assert_close, atol_scaled
from oracle.logits import log_softmax64, logits64, logsumexp64

GRAD_NAMES = ("hidden", "weight", "bias")
DIFF_STATS = ("logp", "lse", "kl", "entropy")
ALL_STATS = ("logp", "lse", "ref_logp", "kl", "entropy")
LEAF_NAMES = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias", "targets")


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def oracle_vocab_stats(hidden, weight, targets, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                       kl=False, entropy=False, ignore_index=-100, temperature=1.0, softcap=None,
                       impl=None) -> SimpleNamespace:
    """float64 statistics with the public signature (``impl`` is accepted and ignored).

    Returns a namespace with ``logp, lse, ref_logp, kl, entropy, mask`` like ``VocabStats``; the
    differentiable ones carry a float64 autograd graph back to ``hidden``, ``weight``, ``bias``.
    """
    del impl
    token_shape = tuple(hidden.shape[:-1])
    multi = targets.dim() == len(token_shape) + 1
    tg = targets if multi else targets.unsqueeze(-1)
    tvalid = tg != ignore_index
    row_valid = tvalid.any(-1)
    safe = torch.where(tvalid, tg, torch.zeros_like(tg)).long()
    zero = torch.zeros((), dtype=torch.float64, device=hidden.device)

    z = logits64(hidden, weight, bias, temperature=temperature, softcap=softcap)
    lse = logsumexp64(z)
    ell = z - lse[..., None]
    logp = torch.where(tvalid, ell.gather(-1, safe), zero)
    out = SimpleNamespace(
        logp=logp if multi else logp.squeeze(-1),
        lse=torch.where(row_valid, lse, zero),
        ref_logp=None,
        kl=None,
        entropy=None,
        mask=row_valid,
    )
    if entropy:
        out.entropy = torch.where(row_valid, -(ell.exp() * ell).sum(-1), zero)
    if ref_hidden is not None:
        with torch.no_grad():
            zr = logits64(ref_hidden.detach(), ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), temperature=temperature, softcap=softcap)
            ell_ref = log_softmax64(zr)
            q = ell_ref.exp()
        ref_logp = torch.where(tvalid, ell_ref.gather(-1, safe), zero)
        out.ref_logp = ref_logp if multi else ref_logp.squeeze(-1)
        if kl:
            # q·(ℓ_ref − ℓ): both logs are finite, so q underflowing to 0 gives 0, never NaN.
            kl_raw = (q * (ell_ref - ell)).sum(-1)
            # Value clamped at 0 (documented rounding clamp), gradient of the unclamped KL.
            kl_val = kl_raw + (kl_raw.clamp_min(0.0) - kl_raw).detach()
            out.kl = torch.where(row_valid, kl_val, zero)
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One curated input configuration (all tensors are built in float64 on CPU)."""

    token_shape: Tuple[int, ...] = (13,)
    V: int = 37
    D: int = 24
    J: Optional[int] = None          # several target ids per token (padded with ignore_index)
    ref: bool = False
    D_ref: Optional[int] = None      # reference hidden size (defaults to D)
    bias: bool = False
    ref_bias: bool = False
    kl: bool = False
    entropy: bool = False
    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    ignore_frac: float = 0.25        # fraction of ignored tokens (or of ignored slots when J is set)
    all_ignored: bool = False
    duplicates: bool = False         # several targets of a token may repeat an id
    scale: float = 2.0               # std of the policy logits
    ref_scale: float = 2.0           # std of the reference logits
    layout: str = "contiguous"       # "contiguous" | "transpose" | "slice"

    def opts(self) -> Dict[str, object]:
        return dict(kl=self.kl, entropy=self.entropy, ignore_index=self.ignore_index,
                    temperature=self.temperature, softcap=self.softcap)


def random_targets(token_shape: Tuple[int, ...], V: int, gen: torch.Generator, *, J: Optional[int] = None,
                 ignore_index: int = -100, ignore_frac: float = 0.25, all_ignored: bool = False,
                 duplicates: bool = False) -> torch.Tensor:
    """Random ids in [0, V); ``J`` ids per token padded at the end with ``ignore_index``.

    With ``J``, each token keeps a random number of ids in ``[0, J]`` (0 = fully ignored token); ids
    of one token are distinct unless ``duplicates``. At least one token stays valid unless
    ``all_ignored``.
    """
    n = 1
    for s in token_shape:
        n *= s
    if J is None:
        t = torch.randint(0, V, (n,), generator=gen)
        ign = torch.rand(n, generator=gen) < ignore_frac
        if not all_ignored and n > 0 and bool(ign.all()):
            ign[0] = False
        if all_ignored:
            ign[:] = True
        t[ign] = ignore_index
        return t.reshape(token_shape)
    t = torch.full((n, J), ignore_index, dtype=torch.long)
    for i in range(n):
        if all_ignored:
            k = 0
        else:
            k = int(torch.randint(0, J + 1, (1,), generator=gen))
            if torch.rand(1, generator=gen).item() < ignore_frac:
                k = 0
            if i == 0 and k == 0:
                k = J  # at least one valid token, and one with no padding at all
        if duplicates:
            ids = torch.randint(0, min(V, 3), (k,), generator=gen)
        else:
            ids = torch.randperm(V, generator=gen)[:k]
        t[i, :k] = ids
    return t.reshape(*token_shape, J)


def make_leaves(case: Case, gen: torch.Generator) -> Dict[str, Optional[torch.Tensor]]:
    """Logical float64 inputs of ``case``: hidden (*token_shape, D), weight (V, D), ... and targets."""
    D_ref = case.D_ref if case.D_ref is not None else case.D
    leaves: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(LEAF_NAMES)
    # Logits r = h·w have std ≈ scale: h ~ N(0, 1), w ~ N(0, scale²/D); bias adds a little more.
    leaves["hidden"] = torch.randn(*case.token_shape, case.D, generator=gen, dtype=torch.float64)
    leaves["weight"] = torch.randn(case.V, case.D, generator=gen, dtype=torch.float64) * (case.scale / case.D ** 0.5)
    if case.bias:
        leaves["bias"] = torch.randn(case.V, generator=gen, dtype=torch.float64) * 0.5
    if case.ref:
        leaves["ref_hidden"] = torch.randn(*case.token_shape, D_ref, generator=gen, dtype=torch.float64)
        leaves["ref_weight"] = (torch.randn(case.V, D_ref, generator=gen, dtype=torch.float64)
                                * (case.ref_scale / D_ref ** 0.5))
        if case.ref_bias:
            leaves["ref_bias"] = torch.randn(case.V, generator=gen, dtype=torch.float64) * 0.5
    leaves["targets"] = random_targets(case.token_shape, case.V, gen, J=case.J, ignore_index=case.ignore_index,
                                     ignore_frac=case.ignore_frac, all_ignored=case.all_ignored,
                                     duplicates=case.duplicates)
    return leaves


# Layouts: ``store`` turns a logical tensor into the leaf actually allocated (and differentiated),
# ``view`` turns that leaf back into a (non-contiguous) view with the logical values.

def _store(name: str, t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "contiguous":
        return t
    if layout == "transpose":
        if name in ("hidden", "ref_hidden", "weight", "ref_weight"):
            return t.movedim(-1, 0).contiguous()           # (D, ...) / (D, V): read back transposed
        if name in ("bias", "ref_bias"):
            out = torch.zeros(2 * t.shape[0], dtype=t.dtype)
            out[::2] = t                                   # read back with stride 2
            return out
        if name == "targets":
            if t.dim() >= 2:
                return t.movedim(-1, 0).contiguous()
            out = torch.randint(2**20, 2**21, (2 * t.shape[0],), generator=gen)  # junk ids between
            out[::2] = t
            return out
    if layout == "slice":
        if name in ("hidden", "ref_hidden", "weight", "ref_weight"):
            pad = torch.full((*t.shape[:-1], 3), 1e30, dtype=t.dtype)
            return torch.cat([pad, t], dim=-1)              # (..., 3 + D): read back as [..., 3:]
        if name in ("bias", "ref_bias"):
            out = torch.full((3 * t.shape[0] + 1,), 1e30, dtype=t.dtype)
            out[1::3] = t
            return out
        if name == "targets":
            junk = torch.randint(2**20, 2**21, t.shape, generator=gen)  # out-of-range ids if read
            return torch.stack([t, junk], dim=-1)          # read back as [..., 0]: stride 2
    raise ValueError(f"unknown layout {layout!r} for {name}")


def _view(name: str, t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t
    if layout == "transpose":
        if name in ("hidden", "ref_hidden", "weight", "ref_weight"):
            return t.movedim(0, -1)
        if name in ("bias", "ref_bias"):
            return t[::2]
        if name == "targets":
            return t.movedim(0, -1) if t.dim() >= 2 else t[::2]
    if layout == "slice":
        if name in ("hidden", "ref_hidden", "weight", "ref_weight"):
            return t[..., 3:]
        if name in ("bias", "ref_bias"):
            return t[1::3]
        if name == "targets":
            return t[..., 0]
    raise ValueError(f"unknown layout {layout!r} for {name}")


def store_leaves(leaves: Dict[str, Optional[torch.Tensor]], layout: str,
                 gen: torch.Generator) -> Dict[str, Optional[torch.Tensor]]:
    return {k: (None if v is None else _store(k, v, layout, gen)) for k, v in leaves.items()}


def make_prep(layout: str) -> Callable[[Dict[str, Optional[torch.Tensor]]], Dict[str, Optional[torch.Tensor]]]:
    def prep(stored: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        return {k: (None if v is None else _view(k, v, layout)) for k, v in stored.items()}

    return prep


def cast_leaves(stored: Dict[str, Optional[torch.Tensor]], dtype: torch.dtype,
                device: str) -> Dict[str, Optional[torch.Tensor]]:
    """Float leaves to ``dtype`` on ``device`` (fresh leaf tensors); targets stay integer."""
    out: Dict[str, Optional[torch.Tensor]] = {}
    for k, v in stored.items():
        if v is None:
            out[k] = None
        elif v.dtype.is_floating_point:
            out[k] = v.detach().to(device=device, dtype=dtype).clone()
        else:
            out[k] = v.to(device).clone()
    return out


def to_oracle(leaves: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """Exactly the values the implementation sees, upcast to float64 on CPU (fresh leaves)."""
    return {k: (None if v is None else (v.detach().cpu().double().clone() if v.dtype.is_floating_point
                                        else v.detach().cpu().clone()))
            for k, v in leaves.items()}


def make_cotangents(targets: torch.Tensor, token_shape: Tuple[int, ...],
                    gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random float64 cotangents for every differentiable statistic (also on ignored entries)."""
    return {
        "logp": torch.randn(tuple(targets.shape), generator=gen, dtype=torch.float64),
        "lse": torch.randn(token_shape, generator=gen, dtype=torch.float64),
        "kl": torch.randn(token_shape, generator=gen, dtype=torch.float64),
        "entropy": torch.randn(token_shape, generator=gen, dtype=torch.float64),
    }


# --------------------------------------------------------------------------------------------
# Values and gradients of Σ cotangent·statistic
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    values: Dict[str, Optional[torch.Tensor]]
    grads: Dict[str, Optional[torch.Tensor]]
    stats: object = None
    leaves: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)


def values_and_grads(stats_fn: Callable[..., object], leaves: Dict[str, Optional[torch.Tensor]],
                     cot: Dict[str, torch.Tensor], *, prep: Optional[Callable] = None,
                     grad_names: Tuple[str, ...] = GRAD_NAMES, **opts) -> Result:
    """Runs ``stats_fn(**prep(leaves), **opts)`` and differentiates ``Σ_s Σ cot[s]·s`` over the
    differentiable statistics present (logp, lse, kl, entropy) w.r.t. the leaves in ``grad_names``.

    ``leaves`` are taken as leaf tensors (``requires_grad`` is switched on here for ``grad_names``).
    Grads of leaves that the loss does not reach are returned as zeros, never ``None``.
    """
    prep = prep or (lambda d: d)
    for k in grad_names:
        if leaves.get(k) is not None:
            leaves[k].requires_grad_(True)
    inputs = prep(leaves)
    st = stats_fn(inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"],
                  ref_hidden=inputs["ref_hidden"], ref_weight=inputs["ref_weight"], ref_bias=inputs["ref_bias"],
                  **opts)
    values = {s: getattr(st, s) for s in ALL_STATS}
    values["mask"] = st.mask
    loss = None
    for s in DIFF_STATS:
        v = values[s]
        if v is None or not v.requires_grad:
            continue
        term = (cot[s].to(device=v.device, dtype=v.dtype) * v).sum()
        loss = term if loss is None else loss + term
    wrt = [k for k in grad_names if leaves.get(k) is not None]
    grads: Dict[str, Optional[torch.Tensor]] = {k: None for k in GRAD_NAMES}
    if loss is not None and wrt:
        gs = torch.autograd.grad(loss, [leaves[k] for k in wrt], allow_unused=True)
        for k, g in zip(wrt, gs, strict=True):
            grads[k] = torch.zeros_like(leaves[k]) if g is None else g
    else:
        for k in wrt:
            grads[k] = torch.zeros_like(leaves[k])
    return Result({k: (None if v is None else v.detach()) for k, v in values.items()}, grads, st, leaves)


def oracle_result(leaves: Dict[str, Optional[torch.Tensor]], cot: Dict[str, torch.Tensor], *,
                  prep: Optional[Callable] = None, **opts) -> Result:
    """The float64 oracle on exactly the (rounded) values in ``leaves``."""
    opts = {k: v for k, v in opts.items() if k != "impl"}
    return values_and_grads(oracle_vocab_stats, to_oracle(leaves), cot, prep=prep, **opts)


def max_abs_logit(leaves: Dict[str, Optional[torch.Tensor]], prep: Optional[Callable] = None) -> float:
    """max |raw logit| over policy and reference (float64), used to scale value tolerances."""
    d = (prep or (lambda x: x))(to_oracle(leaves))
    m = logits64(d["hidden"], d["weight"], d["bias"]).abs().max().item() if d["hidden"].numel() else 0.0
    if d["ref_hidden"] is not None and d["ref_hidden"].numel():
        m = max(m, logits64(d["ref_hidden"], d["ref_weight"], d["ref_bias"]).abs().max().item())
    return m


def make_huge_logit_leaves(gen: torch.Generator, *, N: int = 10, V: int = 37, D: int = 8,
                           magnitude: float = 1e4, gap: float = 150.0) -> Dict[str, Optional[torch.Tensor]]:
    """Logits of magnitude ~``magnitude`` whose sorted values are ≥ 0.9·``gap`` apart (softmax ≈ one-hot,
    every other probability underflows even in float64), for policy and (differently ranked) reference.

    Column 0 carries ``magnitude/2 + gap·rank`` in the weight and ±U(0.9, 1.1) in the hidden state; the
    other columns add N(0, D−1) noise, far below the gaps. Half the targets are the row's argmax.
    """
    def head() -> Tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(V, D, generator=gen, dtype=torch.float64)
        w[:, 0] = magnitude / 2 + gap * torch.randperm(V, generator=gen).double()
        h = torch.randn(N, D, generator=gen, dtype=torch.float64)
        sign = torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0).double()
        h[:, 0] = sign * (0.9 + 0.2 * torch.rand(N, generator=gen, dtype=torch.float64))
        return h, w

    h, w = head()
    rh, rw = head()
    targets = torch.randint(0, V, (N,), generator=gen)
    argmax = (h @ w.t()).argmax(-1)
    targets[::2] = argmax[::2]
    targets[3] = -100
    leaves: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(LEAF_NAMES)
    leaves.update(hidden=h, weight=w, bias=torch.randn(V, generator=gen, dtype=torch.float64),
                  ref_hidden=rh, ref_weight=rw, targets=targets)
    return leaves


def assert_stats_match(res: Result, ref: Result, *, vatol: float, vrtol: float = 1e-4, grtol: float = 1e-4,
                       gatol: float = 1e-4) -> None:
    """The statistics of ``res`` against the oracle's ``ref``: the same ones present, values within
    ``vatol + vrtol·|e|``, gradients within ``atol_scaled(gatol, e) + grtol·|e|``."""
    for name in ALL_STATS:
        a, e = res.values[name], ref.values[name]
        assert (a is None) == (e is None), f"{name}: expected {'none' if e is None else 'a value'}, got {a}"
        if a is not None:
            assert_close(a, e, rtol=vrtol, atol=vatol, name=name)
    for name in GRAD_NAMES:
        a, e = res.grads[name], ref.grads[name]
        assert (a is None) == (e is None), f"grad {name}: expected {'none' if e is None else 'a gradient'}, got {a}"
        if a is not None:
            assert_close(a, e, rtol=grtol, atol=atol_scaled(gatol, e), name=f"grad {name}")
