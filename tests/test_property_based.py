"""Property-based tests (hypothesis): ``linear_vocab_stats``, ``simpo_loss`` and ``tdpo_loss`` on drawn
inputs, on every registered backend, against float64 oracles (tests/oracle/fuzz.py).

What is drawn: token shapes (N = 1, 3-D hidden ``(B, T, D)``), V and D (1, odd), several targets per
token (J), the dtypes the backend's registry entry lists (``backend_entry(impl).dtypes``: fp32,
bf16, fp16, fp64) for the policy and, in the mixed test, a different one for the reference (both
orders), layouts (weights as transposed ``(D, V)`` views or column slices, hidden states transposed or
sliced, strided targets; the junk outside a sliced view is NaN), masks (ignored slots, fully ignored
tokens, everything ignored, ``ignore_index`` -100, -1 or an id inside the vocabulary), temperature,
softcap, bias/ref_bias, which statistics are asked for (kl, entropy, max_logit, mean_logit), and the
logit scale from 1e-2 to 1e4 (1e3 for fp16, whose own matmul overflows above 65504).

The criteria (tests/oracle/fuzz.py explains them):
* fp32/fp64 inputs: the project's fixed tolerance (1e-4 fp32, 1e-10 fp64) plus what rounding of the
  logits costs on the draw, computed from the oracle's own derivatives (it matters only for huge
  logits, where no fp32 implementation can do better);
* bf16/fp16 anywhere (policy or reference), fused backends: the three-way criterion of
  tests/test_vocab_stats_values_and_grads.py, ``err(impl) ≤ err(naive in the same dtypes) + u``
  (u = unit roundoff of the narrowest dtype, normwise), and ``naive`` itself against the rounding
  bound with its logits and ``∂L/∂z`` rounded to the input dtype;
* always: presence, shapes and dtypes of the statistics (fp32, fp64 for fp64 inputs), exact zeros on
  ignored entries, ``kl ≥ 0``, gradients in the leaf's dtype, finite, 0 on fully ignored tokens and
  on the junk outside sliced views.

Budget. ``TOKPO_FUZZ_EXAMPLES`` (default 50) is the number of examples each test draws per CPU-native
backend (``torch``, ``naive``); a backend that runs only emulated here (Triton under
``TRITON_INTERPRET=1``) draws a quarter of it (at least 2) on tiny shapes. The default keeps the
module at about a minute on 2 cores; raise it for long runs, e.g.
``TOKPO_FUZZ_EXAMPLES=2000 python -m pytest -q -p no:cacheprovider tests/test_property_based.py``.
``TOKPO_FUZZ_DEADLINE_MS`` sets hypothesis's per-example deadline (default: none, since the machine's
cores are shared and timings vary). Draws are derandomized and no example database is kept, so CI
runs the same examples every time. The number of examples run and their time per test, backend and
dtype are printed at the end of the module (``-rA`` not needed: the terminal reporter shows them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tokpo_kernels as tk
from conftest import IMPL_GROUPS, impl_device
from oracle import fuzz as fz
from tokpo_kernels.backends import backend_entry

# A fuzz of ~30 s: CI's plain `python -m pytest` runs it, the inner loop's -m "not slow" skips it.
pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TOKPO_FUZZ_EXAMPLES", "50"))
_DEADLINE = os.environ.get("TOKPO_FUZZ_DEADLINE_MS")
DEADLINE_MS: Optional[float] = float(_DEADLINE) if _DEADLINE else None

LOW = (torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (test, impl, dtype label) -> [examples, seconds]; printed at the end of the module.
TALLY: Dict[Tuple[str, str, str], List[float]] = defaultdict(lambda: [0, 0.0])


def emulated(impl: str) -> bool:
    """Whether ``impl`` runs here only emulated (the Triton interpreter on CPU): tiny shapes, few examples."""
    return impl in IMPL_GROUPS["interpreted"] and impl_device(impl) == "cpu"


def fuzz_settings(impl: str, share: float = 1.0):
    """Hypothesis settings for one (test, backend): derandomized, no database, the env budget."""
    n = max(2, int(EXAMPLES * share / (4 if emulated(impl) else 1)))
    return settings(max_examples=n, deadline=DEADLINE_MS, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def run_fuzz(test: str, impl: str, body, strategy, share: float = 1.0) -> None:
    """Run ``body(draw)`` on ``strategy``'s examples for backend ``impl``, counting and timing them."""

    @fuzz_settings(impl, share)
    @given(strategy)
    def inner(draw) -> None:
        label = _DTYPE_NAMES[draw.dtype] + (
            "" if getattr(draw, "ref_dtype", None) in (None, draw.dtype) else "/" + _DTYPE_NAMES[draw.ref_dtype])
        t0 = time.perf_counter()
        try:
            body(draw)
        finally:
            tally = TALLY[(test, impl, label)]
            tally[0] += 1
            tally[1] += time.perf_counter() - t0

    inner()


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not TALLY:
        return
    lines = [f"property-based examples (TOKPO_FUZZ_EXAMPLES={EXAMPLES}; shrinking included):"]
    lines += [f"  {test:<26} {impl:<7} {label:<10} {int(n):>5} examples {secs:7.2f} s"
              for (test, impl, label), (n, secs) in sorted(TALLY.items())]
    # Written past pytest's capture, so that the counts show on a passing run too.
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def _sorted_dtypes(impl: str) -> List[torch.dtype]:
    order = [torch.float32, torch.bfloat16, torch.float16, torch.float64]  # shrinks towards fp32
    return [d for d in order if d in backend_entry(impl).dtypes]


@st.composite
def stats_draws(draw, impl: str, *, mixed: bool = False, poison: bool = False) -> fz.StatsDraw:
    tiny = emulated(impl)
    max_tokens, max_v, max_d = (6, 40, 16) if tiny else (32, 257, 64)
    if draw(st.booleans()):
        b = draw(st.integers(1, 3))
        token_shape: Tuple[int, ...] = (b, draw(st.integers(1, max(1, max_tokens // b))))
    else:
        token_shape = (draw(st.integers(1, max_tokens)),)
    V = draw(st.integers(1, max_v))
    D = draw(st.integers(1, max_d))
    dtypes = _sorted_dtypes(impl)
    dtype = draw(st.sampled_from(dtypes))
    if mixed:
        others = [d for d in dtypes if d != dtype]
        ref_dtype: Optional[torch.dtype] = draw(st.sampled_from(others))
    else:
        ref_dtype = dtype if draw(st.booleans()) else None
    has_ref = ref_dtype is not None
    fp16 = torch.float16 in (dtype, ref_dtype)
    scales = [1.0, 3.0, 0.01, 30.0, 1e3] + ([] if fp16 else [1e4])
    mask = draw(st.sampled_from(["some", "none", "rows", "all"] if not poison else ["rows", "all"]))
    ignore = draw(st.one_of(st.sampled_from([-100, -1]), st.integers(0, V - 1)))
    return fz.StatsDraw(
        token_shape=token_shape, V=V, D=D, dtype=dtype,
        J=draw(st.one_of(st.none(), st.integers(1, 4))),
        ref_dtype=ref_dtype,
        D_ref=draw(st.integers(1, max_d)) if has_ref else 1,
        bias=draw(st.booleans()),
        ref_bias=has_ref and draw(st.booleans()),
        kl=has_ref and draw(st.booleans()),
        entropy=draw(st.booleans()),
        max_logit=draw(st.booleans()),
        mean_logit=draw(st.booleans()),
        temperature=draw(st.one_of(st.just(1.0), st.floats(0.25, 4.0))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        scale=draw(st.sampled_from(scales)),
        ref_scale=draw(st.sampled_from(scales)) if has_ref else 1.0,
        mask=mask,
        ignore_index=ignore,
        weight_layout=draw(st.sampled_from(["contiguous", "transpose", "slice"])),
        hidden_layout=draw(st.sampled_from(["contiguous", "transpose", "slice"])),
        poison_ignored=poison,
        seed=draw(st.integers(0, 2**20)),
    )


# --------------------------------------------------------------------------------------------
# linear_vocab_stats
# --------------------------------------------------------------------------------------------


def _chunk_patch(impl: str, draw: fz.StatsDraw):
    """The torch backend processes rows in chunks of 2**23 / V: with the drawn sizes that is one chunk,
    so shrink the chunk (when the seed says so) to exercise the chunk loop too."""
    import tokpo_kernels.backends.chunked as chunked

    if impl != "torch" or draw.seed % 2 or not hasattr(chunked, "CHUNK_ELEMENTS"):
        return mock.patch.dict(os.environ, {})
    return mock.patch.object(chunked, "CHUNK_ELEMENTS", max(1, draw.V * (1 + draw.seed % 3)))


def check_structure(d: fz.StatsDraw, inp: fz.Inputs, values: Dict, grads: Dict) -> None:
    tg = inp.targets.cpu() if d.J is not None else inp.targets.cpu().unsqueeze(-1)
    tvalid = tg != d.ignore_index
    row = tvalid.any(-1)
    out_dtype = fz.accum_dtype(d.dtype)
    assert values["mask"].dtype == torch.bool and torch.equal(values["mask"].cpu(), row), "mask: expected " \
        "'token has >= 1 non-ignored target'"
    asked = dict(ref_logp=d.ref_dtype is not None, kl=d.kl, entropy=d.entropy, max_logit=d.max_logit,
                 mean_logit=d.mean_logit, logp=True, lse=True)
    for name in fz.STATS:
        v = values[name]
        assert (v is None) != asked[name], f"{name}: expected {'a value' if asked[name] else 'None'}, got {v}"
        if v is None:
            continue
        assert v.dtype == out_dtype, f"{name}: expected dtype {out_dtype} (policy {d.dtype}), got {v.dtype}"
        v = v.cpu()
        if name in ("logp", "ref_logp"):
            assert v.shape == inp.targets.shape, f"{name}: expected shape {tuple(inp.targets.shape)}, got {v.shape}"
            ign = ~(tvalid if d.J is not None else tvalid.squeeze(-1))
            assert bool((v[ign] == 0).all()), f"{name}: ignored targets must be exactly 0, got {v[ign]}"
        else:
            assert v.shape == d.token_shape, f"{name}: expected shape {d.token_shape}, got {tuple(v.shape)}"
            assert bool((v[~row] == 0).all()), f"{name}: fully ignored tokens must be exactly 0, got {v[~row]}"
    if values["kl"] is not None:
        assert bool((values["kl"] >= 0).all()), f"kl: expected >= 0 (clamped), got {values['kl']}"
    for k, g in grads.items():
        assert g.dtype == d.dtype, f"grad {k}: expected the leaf's dtype {d.dtype}, got {g.dtype}"
        assert bool(torch.isfinite(g).all()), f"grad {k}: expected finite values, got {g}"
    gh = grads["hidden"].cpu()
    assert bool((gh[~row] == 0).all()), f"grad hidden: fully ignored tokens must get exactly 0, got {gh[~row]}"


def oracle_run(d: fz.StatsDraw, inp: fz.Inputs, cot) -> Tuple[Dict, Dict, Dict]:
    x = fz.oracle_leaves(inp)
    values = fz.oracle_stats(x, inp.targets, d)
    loss = fz.weighted_loss(values, cot)
    names = [k for k in fz.POLICY if x[k] is not None]
    if loss is None:
        grads = {k: torch.zeros_like(x[k]) for k in names}
    else:
        gs = torch.autograd.grad(loss, [x[k] for k in names], allow_unused=True)
        grads = {k: (torch.zeros_like(x[k]) if g is None else g) for k, g in zip(names, gs, strict=True)}
    return x, values, grads


def check_against_bounds(d: fz.StatsDraw, inp: fz.Inputs, cot, values: Dict, grads: Dict, *,
                         materialised_in_input_dtype: bool) -> None:
    """Values and gradients within the fixed tolerance plus the draw's rounding allowance."""
    x, ev, eg = oracle_run(d, inp, cot)
    acc = max((fz.accum_dtype(t) for t in (d.dtype, d.ref_dtype) if t is not None), key=lambda t: fz.UNIT[t])
    u_acc = fz.UNIT[acc]
    u_in = fz.UNIT[d.dtype] if materialised_in_input_dtype else u_acc
    u_ref = fz.UNIT[d.ref_dtype] if (materialised_in_input_dtype and d.ref_dtype is not None) else u_acc
    bounds = fz.rounding_bounds(x, inp.targets, d, cot, u_acc=u_acc, u_z=u_in, u_ref_z=u_ref,
                                u_out=fz.UNIT[d.dtype], u_c=u_in if materialised_in_input_dtype else 0.0)
    fixed = fz.FIXED_TOL[acc]
    if not bounds.linear:
        # Rounding of the logits alone (naive's bf16/fp16 logits at scale ≥ 1e3) exceeds first order.
        event("naive low precision: logit rounding beyond first order (Lipschitz checks only)")
    for name in fz.STATS:
        if ev[name] is not None and (bounds.linear or name in bounds.values):
            fz.check_close(name, values[name], ev[name].detach(), bounds.values[name].detach(), fixed, normwise=False)
    for k, e in eg.items():
        if bounds.linear:
            fz.check_close(f"grad {k}", grads[k], e, bounds.grads[k].detach(), fixed, normwise=True)


def check_three_way(d: fz.StatsDraw, inp: fz.Inputs, cot, values: Dict, grads: Dict, impl: str) -> None:
    """err(impl) ≤ err(naive, same dtypes and layouts) + u of the narrowest dtype, normwise."""
    _, ev, eg = oracle_run(d, inp, cot)
    base_inp = fz.make_inputs(d, fz.logical_leaves(d), impl_device("naive"))
    bv, bg = fz.run(tk.linear_vocab_stats, base_inp, cot, impl="naive", **d.opts())
    for name, t in list(bv.items()) + list(bg.items()):
        assert t is None or bool(torch.isfinite(t).all()), f"the naive baseline's {name} is not finite: {t}"
    u = max(fz.UNIT[t] for t in (d.dtype, d.ref_dtype) if t is not None)
    for name in fz.STATS:
        if ev[name] is None:
            continue
        e_impl, e_base = fz.normwise_error(values[name], ev[name]), fz.normwise_error(bv[name], ev[name])
        assert e_impl <= e_base + u, f"{name}: err {e_impl:.3e} > naive err {e_base:.3e} + u {u:.1e}"
    for k, e in eg.items():
        e_impl, e_base = fz.normwise_error(grads[k], e), fz.normwise_error(bg[k], e)
        assert e_impl <= e_base + u, f"grad {k}: err {e_impl:.3e} > naive err {e_base:.3e} + u {u:.1e}"


def check_stats_draw(impl: str, d: fz.StatsDraw) -> None:
    inp = fz.make_inputs(d, fz.logical_leaves(d), impl_device(impl))
    cot = fz.make_cotangents(d, inp.targets)
    with _chunk_patch(impl, d):
        values, grads = fz.run(tk.linear_vocab_stats, inp, cot, impl=impl, **d.opts())
    check_structure(d, inp, values, grads)
    low = any(t in LOW for t in (d.dtype, d.ref_dtype))
    if low and impl != "naive":
        check_three_way(d, inp, cot, values, grads, impl)
    else:
        check_against_bounds(d, inp, cot, values, grads, materialised_in_input_dtype=(impl == "naive"))


def test_vocab_stats_fuzz(impl: str) -> None:
    """Policy and reference in the same dtype (or no reference), finite inputs."""
    run_fuzz("vocab_stats", impl, lambda d: check_stats_draw(impl, d), stats_draws(impl), share=1.0)


def test_vocab_stats_fuzz_mixed_reference_dtype(impl: str) -> None:
    """A reference in another dtype than the policy (fp32 policy with a bf16 reference, and the
    opposite, ...): each side in its own dtype, statistics in the policy's accumulation dtype."""
    run_fuzz("vocab_stats_mixed_ref", impl, lambda d: check_stats_draw(impl, d), stats_draws(impl, mixed=True),
             share=0.5)


def test_vocab_stats_fuzz_nonfinite_ignored_rows(impl: str) -> None:
    """NaN/inf hidden states on fully ignored tokens (padding of a model that produced garbage
    there) must influence nothing: no value and no gradient may see them."""
    run_fuzz("vocab_stats_poisoned_rows", impl, lambda d: check_stats_draw(impl, d),
             stats_draws(impl, poison=True), share=0.25)


# --------------------------------------------------------------------------------------------
# Losses: simpo_loss and tdpo_loss against float64 losses written here
# --------------------------------------------------------------------------------------------


@st.composite
def pair_draws(draw, impl: str, *, reference: bool) -> fz.StatsDraw:
    """A preference batch ``(2B, T)``; rows may have no response token at all."""
    tiny = emulated(impl)
    b = draw(st.integers(1, 2 if tiny else 3))
    t = draw(st.integers(1, 3 if tiny else 6))
    V = draw(st.integers(1, 24 if tiny else 97))
    D = draw(st.integers(1, 8 if tiny else 24))
    dtype = draw(st.sampled_from([d for d in _sorted_dtypes(impl) if d not in LOW]))
    return fz.StatsDraw(
        token_shape=(2 * b, t), V=V, D=D, dtype=dtype, ref_dtype=dtype if reference else None,
        D_ref=draw(st.integers(1, 8 if tiny else 24)) if reference else 1, kl=reference,
        bias=draw(st.booleans()), ref_bias=reference and draw(st.booleans()),
        temperature=draw(st.one_of(st.just(1.0), st.floats(0.5, 2.0))),
        softcap=draw(st.one_of(st.none(), st.floats(1.0, 30.0))),
        scale=draw(st.sampled_from([1.0, 3.0, 0.1, 10.0])), ref_scale=draw(st.sampled_from([1.0, 3.0, 10.0])),
        mask=draw(st.sampled_from(["some", "rows", "none", "all"])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        weight_layout=draw(st.sampled_from(["contiguous", "transpose"])),
        hidden_layout=draw(st.sampled_from(["contiguous", "slice"])),
        seed=draw(st.integers(0, 2**20)),
    )


def _row_sums(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, v, torch.zeros((), dtype=v.dtype)).sum(-1)


def simpo64(o: Dict, beta: float, gamma: float) -> torch.Tensor:
    """mean_b −log σ(β(L̄_c − L̄_r) − γ), L̄ = mean label log-prob over a row's response tokens (0 if none)."""
    mask = o["mask"]
    avg = _row_sums(o["logp"], mask) / mask.sum(-1).clamp_min(1).double()
    b = avg.shape[0] // 2
    return F.softplus(-(beta * (avg[:b] - avg[b:]) - gamma)).mean()


def tdpo64(o: Dict, beta: float, alpha: float, variant: str) -> torch.Tensor:
    """TDPO1/2: Δ = (M_c − M_r) − (α)(K_r − K_c) (TDPO2 detaches K_c), loss = mean −log σ(βΔ)."""
    mask = o["mask"]
    m = _row_sums(o["logp"] - o["ref_logp"], mask)
    k = _row_sums(o["kl"], mask)
    b = m.shape[0] // 2
    if variant == "tdpo1":
        delta = (m[:b] - m[b:]) - (k[b:] - k[:b])
    else:
        delta = (m[:b] - m[b:]) - alpha * (k[b:] - k[:b].detach())
    return F.softplus(-beta * delta).mean()


def check_loss_draw(impl: str, d: fz.StatsDraw, loss_name: str, params: Dict) -> None:
    inp = fz.make_inputs(d, fz.logical_leaves(d), impl_device(impl))
    x = inp.views()
    common = dict(bias=x["bias"], ignore_index=d.ignore_index, temperature=d.temperature, softcap=d.softcap,
                  impl=impl)
    if loss_name == "simpo":
        out = tk.simpo_loss(x["hidden"], x["weight"], inp.targets, **common, **params)
    else:
        out = tk.tdpo_loss(x["hidden"], x["weight"], inp.targets, x["ref_hidden"], x["ref_weight"],
                           ref_bias=x["ref_bias"], **common, **params)
    assert out.loss.dim() == 0 and out.loss.dtype == fz.accum_dtype(d.dtype), (out.loss.shape, out.loss.dtype)
    gen = torch.Generator().manual_seed(d.seed + 3)
    cot = float(torch.randn((), generator=gen, dtype=torch.float64))  # a random cotangent on the loss
    names = [k for k in fz.POLICY if inp.stored[k] is not None]
    grads = torch.autograd.grad(out.loss * cot, [inp.stored[k] for k in names], allow_unused=True)

    ox = fz.oracle_leaves(inp)
    o = fz.oracle_stats(ox, inp.targets, d)
    loss64 = simpo64(o, **params) if loss_name == "simpo" else tdpo64(o, **params)
    grads64 = torch.autograd.grad(loss64 * cot, [ox[k] for k in names], allow_unused=True)
    fixed = fz.FIXED_TOL[fz.accum_dtype(d.dtype)] * 2  # the loss tests' 2e-4 (fp32) over a few sums
    fz.check_close(f"{loss_name} loss", out.loss, loss64.detach(), torch.zeros(()), fixed, normwise=False)
    for k, g, e in zip(names, grads, grads64, strict=True):
        g = torch.zeros_like(inp.stored[k]) if g is None else g
        e = torch.zeros_like(ox[k]) if e is None else e
        layout = d.hidden_layout if k == "hidden" else d.weight_layout if k == "weight" else "contiguous"
        kind = "hidden" if k == "hidden" else "weight"
        logical = fz._view(g, layout, kind) if k != "bias" else g
        assert logical.dtype == d.dtype, f"grad {k}: expected {d.dtype}, got {logical.dtype}"
        fz.check_close(f"{loss_name} grad {k}", logical, e, torch.zeros(()), fixed, normwise=True)


def test_simpo_loss_fuzz(impl: str) -> None:
    def body(args):
        d, beta, gamma = args
        check_loss_draw(impl, d, "simpo", dict(beta=beta, gamma=gamma))

    strategy = st.tuples(pair_draws(impl, reference=False), st.floats(0.1, 10.0), st.floats(-2.0, 2.0))
    run_fuzz("simpo_loss", impl, body, strategy.map(_Args), share=0.25)


def test_tdpo_loss_fuzz(impl: str) -> None:
    def body(args):
        d, beta, alpha, variant = args
        check_loss_draw(impl, d, "tdpo", dict(beta=beta, alpha=alpha, variant=variant))

    strategy = st.tuples(pair_draws(impl, reference=True), st.floats(0.01, 5.0), st.floats(0.0, 2.0),
                         st.sampled_from(["tdpo2", "tdpo1"]))
    run_fuzz("tdpo_loss", impl, body, strategy.map(_Args), share=0.25)


class _Args(tuple):
    """A drawn tuple whose first element is the ``StatsDraw`` (for the tally's dtype label)."""

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype

    @property
    def ref_dtype(self) -> Optional[torch.dtype]:
        return self[0].ref_dtype
