"""Bad input to ``linear_vocab_stats`` raises TypeError/ValueError naming what was expected and got.

Each case checks the error type and that the message contains fragments naming both the expected
value and the received one (so a bare "invalid input" message fails).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Sequence

import pytest
import torch

import tokpo_kernels as tk

N, V, D, DR = 4, 11, 8, 6


def inputs(**overrides) -> Dict[str, object]:
    kw: Dict[str, object] = dict(
        hidden=torch.randn(N, D),
        weight=torch.randn(V, D),
        targets=torch.tensor([1, 2, -100, 10]),
    )
    kw.update(overrides)
    return kw


def with_ref(**overrides) -> Dict[str, object]:
    kw = inputs(ref_hidden=torch.randn(N, DR), ref_weight=torch.randn(V, DR))
    kw.update(overrides)
    return kw


def call(kw: Dict[str, object]):
    kw = dict(kw)
    return tk.linear_vocab_stats(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), impl=kw.pop("impl", "torch"),
                                 **kw)


def expect(exc: type, fragments: Sequence[str], fn: Callable[[], object]) -> str:
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"error message {msg!r} should name {missing}"
    return msg


BAD = [
    pytest.param(inputs(weight=torch.randn(V, D + 1)), ValueError, ["D=8", "D=9", f"({V}, {D + 1})"],
                 id="hidden-weight-D-mismatch"),
    pytest.param(inputs(weight=torch.randn(V, D, 1)), ValueError, ["(V, D)", f"({V}, {D}, 1)"], id="weight-3d"),
    pytest.param(inputs(weight=torch.randn(V * D)), ValueError, ["(V, D)", f"({V * D},)"], id="weight-1d"),
    pytest.param(inputs(weight=torch.randn(V, D, dtype=torch.bfloat16)), TypeError,
                 ["torch.float32", "torch.bfloat16"], id="dtype-mismatch-hidden-weight"),
    pytest.param(inputs(hidden=torch.randn(N, D, dtype=torch.float64)), TypeError,
                 ["torch.float64", "torch.float32"], id="dtype-mismatch-fp64-hidden"),
    pytest.param(inputs(targets=torch.tensor([1.0, 2.0, 3.0, 4.0])), TypeError, ["integer", "torch.float32"],
                 id="float-targets"),
    pytest.param(inputs(targets=torch.tensor([True, False, True, True])), TypeError, ["integer", "torch.bool"],
                 id="bool-targets"),
    pytest.param(inputs(targets=torch.tensor([1, 2, V, 3])), ValueError, [f"[0, {V})", f"got {V}"],
                 id="target-id-eq-V"),
    pytest.param(inputs(targets=torch.tensor([1, 2, 3, V + 100])), ValueError, [f"[0, {V})", f"{V + 100}"],
                 id="target-id-gt-V"),
    pytest.param(inputs(targets=torch.tensor([1, -1, 3, 4])), ValueError, [f"[0, {V})", "-100", "-1"],
                 id="target-id-negative"),
    pytest.param(inputs(targets=torch.tensor([[1, -7], [2, -100], [3, 4], [5, 6]])), ValueError,
                 [f"[0, {V})", "-7"], id="target-id-negative-multi"),
    pytest.param(inputs(targets=torch.tensor([1, 2, -100]), ), ValueError, [f"({N},)", "(3,)"],
                 id="targets-shape-short"),
    pytest.param(inputs(targets=torch.zeros(N, 2, 3, dtype=torch.long)), ValueError, [f"({N},)", f"({N}, 2, 3)"],
                 id="targets-two-extra-dims"),
    pytest.param(inputs(targets=torch.zeros(N + 1, 2, dtype=torch.long)), ValueError, [f"({N},)", f"({N + 1}, 2)"],
                 id="targets-wrong-token-dim"),
    pytest.param(inputs(hidden=torch.randn(2, 2, D), targets=torch.zeros(4, dtype=torch.long)), ValueError,
                 ["(2, 2)", "(4,)"], id="targets-flattened-for-3d-hidden"),
    pytest.param(inputs(kl=True), ValueError, ["kl=True", "ref_hidden", "ref_weight"], id="kl-without-reference"),
    pytest.param(inputs(ref_hidden=torch.randn(N, DR)), ValueError, ["ref_hidden", "ref_weight=None"],
                 id="only-ref-hidden"),
    pytest.param(inputs(ref_weight=torch.randn(V, DR)), ValueError, ["ref_weight", "ref_hidden=None"],
                 id="only-ref-weight"),
    pytest.param(with_ref(ref_hidden=torch.randn(N + 1, DR)), ValueError, [f"({N},)", f"({N + 1}, {DR})"],
                 id="ref-token-shape-mismatch"),
    pytest.param(with_ref(ref_hidden=torch.randn(2, 2, DR)), ValueError, [f"({N},)", f"(2, 2, {DR})"],
                 id="ref-token-rank-mismatch"),
    pytest.param(with_ref(ref_weight=torch.randn(V + 1, DR)), ValueError, [f"({V}, D_ref)", f"({V + 1}, {DR})"],
                 id="ref-weight-V-mismatch"),
    pytest.param(with_ref(ref_weight=torch.randn(V, DR + 2)), ValueError, [f"D={DR}", f"({V}, {DR + 2})"],
                 id="ref-hidden-ref-weight-D-mismatch"),
    pytest.param(with_ref(ref_bias=torch.randn(V + 1)), ValueError, [f"({V},)", f"({V + 1},)"],
                 id="ref-bias-shape"),
    pytest.param(inputs(ref_bias=torch.randn(V)), ValueError, ["ref_bias", "ref_hidden"], id="ref-bias-without-ref"),
    pytest.param(inputs(weight=torch.randn(V, D, device="meta")), ValueError, ["cpu", "meta", "weight"],
                 id="mixed-devices-weight-meta"),
    pytest.param(with_ref(ref_hidden=torch.randn(N, DR, device="meta")), ValueError, ["cpu", "meta", "ref_hidden"],
                 id="mixed-devices-ref-meta"),
    pytest.param(inputs(bias=torch.randn(V, device="meta")), ValueError, ["cpu", "meta", "bias"],
                 id="mixed-devices-bias-meta"),
    pytest.param(inputs(hidden=torch.randint(0, 5, (N, D)), weight=torch.randint(0, 5, (V, D))), TypeError,
                 ["floating-point", "torch.int64"], id="integer-hidden"),
    pytest.param(inputs(temperature=0.0), ValueError, ["> 0", "0.0"], id="temperature-zero"),
    pytest.param(inputs(temperature=-1.5), ValueError, ["> 0", "-1.5"], id="temperature-negative"),
    pytest.param(inputs(temperature=float("nan")), ValueError, ["> 0", "nan"], id="temperature-nan"),
    pytest.param(inputs(softcap=0.0), ValueError, ["> 0", "0.0"], id="softcap-zero"),
    pytest.param(inputs(softcap=-30.0), ValueError, ["> 0", "-30.0"], id="softcap-negative"),
    pytest.param(inputs(bias=torch.randn(V + 1)), ValueError, [f"({V},)", f"({V + 1},)"], id="bias-shape-long"),
    pytest.param(inputs(bias=torch.randn(1, V)), ValueError, [f"({V},)", f"(1, {V})"], id="bias-shape-2d"),
    pytest.param(inputs(impl="cuda"), ValueError, ["'triton'", "'torch'", "'cuda'"], id="unknown-impl"),
]


@pytest.mark.parametrize("kw,exc,fragments", BAD)
def test_bad_input_raises_naming_expected_and_got(kw, exc, fragments) -> None:
    expect(exc, fragments, lambda: call(kw))


@pytest.mark.impls("cpu")
def test_validation_is_independent_of_impl(impl: str) -> None:
    """Validation happens once at the public boundary, whichever implementation is asked for."""
    expect(ValueError, [f"[0, {V})", f"{V}"], lambda: call(inputs(targets=torch.tensor([1, 2, V, 3]), impl=impl)))
    expect(ValueError, ["kl=True"], lambda: call(inputs(kl=True, impl=impl)))


@pytest.mark.parametrize("ignore_index,targets", [
    pytest.param(-100, [1, -100, 3, -100], id="default"),
    pytest.param(-1, [1, -1, 3, 10], id="minus-one"),
    pytest.param(-7, [[1, -7], [-7, -7], [3, 4], [0, -7]], id="minus-seven-multi"),
    pytest.param(V + 5, [1, V + 5, 3, 0], id="beyond-vocab"),
    pytest.param(4, [1, 4, 3, 0], id="inside-vocab"),
])
def test_ignore_index_is_accepted(ignore_index: int, targets) -> None:
    t = torch.tensor(targets)
    st = call(inputs(targets=t, ignore_index=ignore_index))
    valid = t != ignore_index
    assert torch.equal(st.mask, valid.any(-1) if t.dim() == 2 else valid)
    assert (st.logp[~valid] == 0).all()
    assert torch.isfinite(st.logp).all() and torch.isfinite(st.lse).all()


def test_default_ignore_index_rejected_when_custom_one_is_set() -> None:
    """With ignore_index=-1, -100 is an ordinary (out-of-range) id again."""
    expect(ValueError, [f"[0, {V})", "ignore_index=-1", "-100"],
           lambda: call(inputs(targets=torch.tensor([1, -100, 3, 4]), ignore_index=-1)))


def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expect(ValueError, ["impl='triton'", "cpu", "TRITON_INTERPRET=1", "impl='torch'"],
           lambda: call(inputs(impl="triton")))
    monkeypatch.delenv("TRITON_INTERPRET")
    expect(ValueError, ["impl='triton'", "cpu"], lambda: call(inputs(impl="triton")))


def test_non_tensor_inputs_raise_type_error() -> None:
    expect(TypeError, ["hidden", "torch.Tensor", "list"], lambda: call(inputs(hidden=[[0.0] * D] * N)))
    expect(TypeError, ["targets", "torch.Tensor", "list"], lambda: call(inputs(targets=[1, 2, 3, 4])))


def test_error_messages_are_specific() -> None:
    """The shape message of a D mismatch names both shapes, not just 'mismatch'."""
    msg = expect(ValueError, [], lambda: call(inputs(weight=torch.randn(V, D + 1))))
    assert re.search(rf"\({N}, {D}\)", msg) and re.search(rf"\({V}, {D + 1}\)", msg), msg
