"""The benchmark registry: operations, the implementations that compute them, and their cases.

An *operation* is one quantity with a FLOP model (``vocab_stats_kl``: the statistics of
``linear_vocab_stats`` with a reference and ``kl=True``; later ``cross_entropy``, ``dpo``, ...). An
*implementation* is one way to compute it: this library's ``naive``/``torch``/``triton`` impls, or a
peer (Liger-Kernel, ``F.linear_cross_entropy``, Cut Cross-Entropy) that computes the same quantity.
Both are added by one file each under ``bench/ops/`` or ``bench/peers/``, which only call
``register_operation`` / ``register_impl`` at import time; nothing else in ``bench/`` changes.

A builder turns ``(shape, dtype, device)`` into a ``Built``: ready inputs plus a forward callable
and a backward callable. Builders raise :class:`Unavailable` (or any exception) when the
implementation cannot run here; the runner turns that into an "unavailable: reason" row.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


class Unavailable(RuntimeError):
    """Raised by a builder when an implementation cannot run in this environment."""


@dataclass(frozen=True)
class Shape:
    """An lm-head problem: ``rows`` sequences of ``seq`` tokens, hidden size ``dim``, vocab ``vocab``.

    The first ``ignored_prefix`` tokens of every row carry ``ignore_index`` (prompt tokens in
    preference/RL batches). FLOP models count only the ``valid_tokens``: skipping ignored tokens
    before any matmul is one of the levers being measured, so it must show up as speed.
    """

    rows: int
    seq: int
    dim: int
    vocab: int
    ignored_prefix: int = 0
    label: str = ""  # e.g. "llama-3-8b": which model head this shape stands for
    candidates: int = 0  # K target ids per hidden row (TLPO: rows = G groups, seq = 1); 0 = one label

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def valid_tokens(self) -> int:
        return self.rows * (self.seq - self.ignored_prefix)

    def describe(self) -> str:
        return f"{self.label + ' ' if self.label else ''}{self.tokens_text()}, D={self.dim}, V={self.vocab}"

    def tokens_text(self) -> str:
        if self.candidates:
            return f"G={self.rows} groups x K={self.candidates} (N={self.valid_tokens} rows)"
        return f"{self.rows}x{self.seq} tok (N={self.valid_tokens} valid)"

    def tiny(self) -> "Shape":
        """A few-token version of this shape (same structure: pairs stay pairs, a prompt prefix
        stays, candidates stay), used to probe an implementation before building full inputs and
        for the Triton-interpreter smoke cases."""
        return Shape(
            rows=2 if self.rows >= 2 else 1, seq=1 if self.seq == 1 else 6, dim=16, vocab=64,
            ignored_prefix=2 if self.ignored_prefix else 0, candidates=min(self.candidates, 4),
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "rows": self.rows, "seq": self.seq, "dim": self.dim, "vocab": self.vocab,
            "ignored_prefix": self.ignored_prefix, "label": self.label, "candidates": self.candidates,
            "tokens": self.tokens, "valid_tokens": self.valid_tokens,
        }

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "Shape":
        return Shape(d["rows"], d["seq"], d["dim"], d["vocab"], d.get("ignored_prefix", 0), d.get("label", ""),
                     d.get("candidates", 0))


@dataclass
class Built:
    """Inputs already on the device, and the two halves of one training step.

    ``fwd()`` runs the forward with autograd recording (as in training) and returns whatever
    ``bwd`` needs; ``bwd(out)`` runs the backward with fixed random cotangents and returns the
    gradients (returned rather than accumulated into ``.grad``, so repeated runs do no extra
    accumulation work and free their gradients). ``fwd_bwd`` is one full step. Keeping the two
    halves separate lets the timer report forward, backward and forward+backward from one loop.
    ``extra`` is reported as-is (e.g. the measured entropy of the inputs); ``summary(out)``
    gives a few scalars of the result so that implementations can be cross-checked.
    """

    fwd: Callable[[], Any]
    bwd: Callable[[Any], Any]
    extra: Dict[str, Any] = field(default_factory=dict)
    summary: Optional[Callable[[Any], Dict[str, float]]] = None

    def fwd_bwd(self) -> Any:
        return self.bwd(self.fwd())


Builder = Callable[[Shape, torch.dtype, torch.device], Built]


@dataclass(frozen=True)
class Impl:
    """One way to compute an operation.

    ``requires`` lists importable modules (a peer's package): when one is missing the row reads
    "not installed: <module>" without starting a worker. ``devices`` lists the device types it can
    run on (Triton kernels: CUDA only): elsewhere the row reads "unavailable: needs CUDA ..." at
    once, again without a worker. ``unavailable(device)``, when given, is asked after ``devices``
    and returns why it cannot run there or None (this library's impls pass their backend
    registry's check). ``note`` says what exactly the impl computes and how it is configured
    (printed under the table and stored in the JSON).
    """

    name: str
    build: "Builder"
    requires: Tuple[str, ...] = ()
    devices: Tuple[str, ...] = ("cpu", "cuda")
    note: str = ""
    device_note: str = ""  # why it is limited to ``devices`` (e.g. "Triton kernels")
    unavailable: Optional[Callable[[torch.device], Optional[str]]] = None

    def missing(self) -> Optional[str]:
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    return mod
            except (ImportError, ValueError):
                return mod
        return None

    def unavailable_on(self, device: str) -> Optional[str]:
        """Why this impl cannot run on ``device`` ("cpu", "cuda:0", ...), or None."""
        kind = torch.device(device).type
        if kind not in self.devices:
            why = f"needs {' or '.join(d.upper() for d in self.devices)}"
            return f"{why}: {self.device_note}" if self.device_note else why
        return None if self.unavailable is None else self.unavailable(torch.device(device))


@dataclass
class Operation:
    """A benchmarked quantity. ``flops(shape)`` returns model FLOPs ``{"fwd": .., "fwd_bwd": ..}``
    for the valid tokens; TFLOP/s of every implementation is computed from this one model, so it
    compares time-to-solution (an implementation that does redundant work does not get credit).

    ``make_inputs(shape, dtype, device)`` builds the one set of inputs every implementation of
    the operation receives (so peers and this library's impls compute on identical tensors);
    ``summary(forward_output)`` gives the scalars (e.g. the loss) compared across implementations.
    """

    name: str
    description: str
    flops: Callable[[Shape], Dict[str, float]]
    make_inputs: Optional[Callable[[Shape, torch.dtype, torch.device], Any]] = None
    summary: Optional[Callable[[Any], Dict[str, float]]] = None  # scalars of a forward's output to cross-check impls
    impls: Dict[str, Impl] = field(default_factory=dict)
    baseline: str = "naive"  # ratios in the table are relative to this impl


_OPERATIONS: Dict[str, Operation] = {}


def register_operation(op: Operation) -> Operation:
    if op.name in _OPERATIONS:
        raise ValueError(f"operation {op.name!r} registered twice")
    _OPERATIONS[op.name] = op
    return op


def register_impl(op_name: str, impl: Impl) -> None:
    op = get_operation(op_name)
    if impl.name in op.impls:
        raise ValueError(f"impl {impl.name!r} of {op_name!r} registered twice")
    op.impls[impl.name] = impl


def _load_all() -> None:
    # Importing the packages runs every op/peer file's registration exactly once.
    importlib.import_module("bench.ops")
    importlib.import_module("bench.peers")


def get_operation(name: str) -> Operation:
    _load_all()
    try:
        return _OPERATIONS[name]
    except KeyError:
        raise KeyError(f"unknown operation {name!r}; known: {sorted(_OPERATIONS)}") from None


def operations() -> List[Operation]:
    _load_all()
    return list(_OPERATIONS.values())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Case:
    """One row group of the table: an operation at one shape and dtype (each impl is one row)."""

    op: str
    shape: Shape
    dtype: str  # a key of DTYPES

    @property
    def key(self) -> str:
        s = self.shape
        k = f"-K{s.candidates}" if s.candidates else ""
        return f"{self.op}-{self.dtype}-B{s.rows}xT{s.seq}-p{s.ignored_prefix}{k}-D{s.dim}-V{s.vocab}"
