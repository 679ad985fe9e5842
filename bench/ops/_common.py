"""What every operation and peer shares: the input bundle, one builder, library registration.

An operation file defines ``make_inputs(shape, dtype, device) -> Batch`` and the call of this
library's function; a peer file defines only its own call. Both become builders through
:func:`builder`, so probing, the interpreter guard, the backward with fixed cotangents and the
cross-check summary exist once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.inputs import HeadInputs, loss_cotangent, make_head_inputs
from bench.registry import Built, Impl, Operation, Shape, Unavailable, get_operation, register_impl, register_operation
from tokpo_kernels._compat import triton_interpreter_enabled
from tokpo_kernels.backends import backend_entry, backend_names, unavailable_reason


def dispatchers(names: Sequence[str], entry: Callable[[str], Any] = backend_entry) -> Dict[str, Tuple[str, ...]]:
    """The registered backends that only pick another backend per device (their registry entry's
    ``picks_among`` is non-empty), each with the concrete backends it picks among."""
    out = {}
    for name in names:
        picks = tuple(getattr(entry(name), "picks_among", ()) or ())
        if picks:
            out[name] = picks
    return out


def concrete_backends(names: Sequence[str], entry: Callable[[str], Any] = backend_entry) -> Tuple[str, ...]:
    """``names`` without the dispatchers: a dispatcher's row would time one of its concrete
    backends a second time under another name (and charge the same memory twice in the plot)."""
    picking = dispatchers(names, entry)
    return tuple(n for n in names if n not in picking)


def library_notes(names: Sequence[str], entry: Callable[[str], Any] = backend_entry) -> Dict[str, str]:
    """One note per concrete backend: its registry summary, plus, for a backend a dispatcher may
    pick, which dispatcher runs it (so a reader who calls ``impl="triton"`` knows which rows are theirs)."""
    picked_by: Dict[str, List[str]] = {}
    for disp, picks in dispatchers(names, entry).items():
        for p in picks:
            picked_by.setdefault(p, []).append(disp)
    notes = {}
    for name in concrete_backends(names, entry):
        text = f"tokpo_kernels impl={name!r}: {entry(name).summary}"
        for disp in picked_by.get(name, ()):
            others = " or ".join(repr(p) for p in dispatchers(names, entry)[disp] if p != name)
            text += f"; impl={disp!r} runs this or {others}, per device ({entry(disp).summary}): no rows of its own"
        notes[name] = text
    return notes


# This library's impls are its registered concrete backends: a new backend gets benchmark rows with
# no edit here, and a dispatcher (``impl="triton"``, which runs one of the Triton strategies) is
# named in the notes of the strategies it picks instead of being timed twice.
LIBRARY_IMPLS = concrete_backends(backend_names())
LIBRARY_NOTES = library_notes(backend_names())
# The interpreter runs kernels op by op in NumPy to test them on CPU: at benchmark sizes it runs
# for hours and its time says nothing about the kernels, so it is allowed on tiny cases only.
INTERPRETER_MAX_LOGITS = 1 << 16


@dataclass
class Batch:
    """One operation's inputs. ``params`` are the leaves gradients are taken for (hidden, weight,
    and e.g. TI-DPO's anchor hidden states); ``cotangents`` are the fixed cotangents of the
    differentiable outputs (one scalar for a loss); ``t`` holds everything else by name."""

    t: Dict[str, Any]
    params: Tuple[torch.Tensor, ...]
    cotangents: Tuple[torch.Tensor, ...]
    extra: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.t[key]


def head_batch(shape: Shape, dtype: torch.dtype, device: torch.device, *, reference: bool,
               cotangents: Optional[Callable[[HeadInputs], Sequence[torch.Tensor]]] = None) -> Batch:
    """The common inputs: hidden states, lm-head and sampled labels (and the reference's hidden
    states and head), gradients for ``hidden`` and ``weight``; by default the cotangent of a
    scalar loss. ``t["inputs"]`` keeps the full :class:`HeadInputs` for operations that add more."""
    inp = make_head_inputs(shape, dtype, device, reference=reference)
    t = {"hidden": inp.hidden, "weight": inp.weight, "targets": inp.targets, "ref_hidden": inp.ref_hidden,
         "ref_weight": inp.ref_weight, "inputs": inp}
    cot = tuple(cotangents(inp)) if cotangents else (loss_cotangent(device),)
    return Batch(t=t, params=(inp.hidden, inp.weight), cotangents=cot, extra=inp.extra)


# A forward factory turns (batch, device) into a callable that runs the forward and returns a
# tuple: the differentiable outputs first (one per cotangent), then anything the summary needs.
ForwardFactory = Callable[[Batch, torch.device], Callable[[], Tuple[Any, ...]]]
Summary = Callable[[Tuple[Any, ...]], Dict[str, float]]


def loss_summary(out: Tuple[Any, ...]) -> Dict[str, float]:
    return {"loss": float(out[0].detach())}


def _built(batch: Batch, forward: Callable[[], Tuple[Any, ...]], summary: Optional[Summary]) -> Built:
    n = len(batch.cotangents)

    def bwd(out: Tuple[Any, ...]):
        return torch.autograd.grad(out[:n], batch.params, batch.cotangents)

    return Built(fwd=forward, bwd=bwd, extra=dict(batch.extra), summary=summary)


def needs_interpreter(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs on ``device`` only emulated (its kernels in the Triton interpreter,
    a test tool), as its registry entry says."""
    return device.type in backend_entry(backend).emulated_devices


def interpreted_impls() -> Tuple[str, ...]:
    """This library's impls that run on CPU only in the Triton interpreter (tested on tiny cases)."""
    return tuple(name for name in LIBRARY_IMPLS if needs_interpreter(name, torch.device("cpu")))


def builder(op_name: str, make_forward: ForwardFactory, *, backend: Optional[str] = None):
    """A registry builder ``(shape, dtype, device) -> Built`` for one implementation of ``op_name``
    (``backend``: the library backend it runs, for this library's impls).

    The implementation first runs on a tiny version of the shape, so one that cannot run here
    (a missing module, an unsupported option, no kernel for this device) is reported in a second
    as "unavailable: <the error>" instead of after building full-size inputs.
    """

    def build(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
        op = get_operation(op_name)
        if backend is not None and triton_interpreter_enabled() and needs_interpreter(backend, device):
            if shape.valid_tokens * shape.vocab > INTERPRETER_MAX_LOGITS:
                raise Unavailable("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), a test tool: "
                                  "run on tiny cases by the pytest suite, not timed at benchmark sizes")
        try:
            tiny = op.make_inputs(shape.tiny(), dtype, device)
            _built(tiny, make_forward(tiny, device), op.summary).fwd_bwd()
        except Exception as exc:  # any failure means "cannot run here"; the reason is the message
            raise Unavailable(f"{type(exc).__name__}: {exc}".strip()) from exc
        batch = op.make_inputs(shape, dtype, device)
        return _built(batch, make_forward(batch, device), op.summary)

    return build


def _library_forward(call: Callable[[Batch, str], Tuple[Any, ...]], impl: str, batch: Batch,
                     device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    return lambda: call(batch, impl)


def register_library_operation(name: str, description: str, flops: Callable[[Shape], Dict[str, float]],
                               make_inputs: Callable[[Shape, torch.dtype, torch.device], Batch],
                               call: Callable[[Batch, str], Tuple[Any, ...]], *,
                               summary: Summary = loss_summary) -> Operation:
    """Register an operation with one impl per registered backend; ``call(batch, impl)`` runs one
    forward of the library's public function and returns the differentiable outputs first. Where
    an impl can run comes from the backend registry (``unavailable_reason``)."""
    op = register_operation(Operation(name=name, description=description, flops=flops,
                                      make_inputs=make_inputs, summary=summary))
    for impl in LIBRARY_IMPLS:
        op.impls[impl] = Impl(
            name=impl, build=builder(name, functools.partial(_library_forward, call, impl), backend=impl),
            note=LIBRARY_NOTES[impl], unavailable=functools.partial(unavailable_reason, impl),
        )
    return op


def register_peer(op_name: str, name: str, make_forward: ForwardFactory, *, requires: Sequence[str], note: str,
                  devices: Tuple[str, ...] = ("cpu", "cuda"), device_note: str = "") -> None:
    """Register another library's implementation of ``op_name``; it is built on the operation's
    own inputs (``make_forward(batch, device)``), so it computes on the same tensors."""
    register_impl(op_name, Impl(name=name, build=builder(op_name, make_forward), requires=tuple(requires),
                                devices=devices, note=note, device_note=device_note))
