"""The registry of backends, keyed by the name users pass as ``impl=``.

Every list of implementations in the package, the benchmarks and the tests comes from here, and so
does the ``impl="auto"`` choice: the available backend of highest ``auto_priority`` among those that
name the device's type in ``auto_devices``. Loading is lazy (``load`` runs on first use), so that
registering the Triton backend never imports Triton.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple, Union

import torch

from tokpo_kernels.backends.base import Backend

DeviceLike = Union[torch.device, str]

_FLOATS = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})


@dataclass(frozen=True)
class BackendEntry:
    """How to find, load and choose one backend.

    Attributes:
        name: the ``impl=`` value.
        load: builds the backend object (imports its kernels); called once, on first use.
        unavailable: ``unavailable(device)`` is ``None`` when the backend can run on ``device``
            here, else the reason it cannot, with the fix (shown in the error of ``impl=name``).
        auto_devices: device types (``"cuda"``, ``"cpu"``) on which ``impl="auto"`` may choose it.
        auto_priority: the higher wins among the candidates of ``"auto"``.
        dtypes: input dtypes it supports.
        vocab_parallel: whether it may run under a ``process_group`` (vocabulary parallelism).
        emulated_devices: device types on which it runs only emulated (Triton's interpreter on CPU):
            correct, for tests, but far too slow to time; the benchmarks run it on tiny cases only.
        summary: one line for the docs and the error messages.
        picks_among: non-empty for a *dispatching* entry, which runs one of these registered
            backends (chosen per device) rather than code of its own; the tests and the
            benchmarks run the concrete backends instead of timing or testing the same code twice.
        returns_row_order: its forward returns the row permutation ``RawStats.row_order`` (the
            custom op's fake implementation gives that output its (N,) shape only then).
        warn_on_fallback: when ``impl="auto"`` would have chosen it but it is unavailable (an
            optional extension that failed to build), warn once with the reason and the fix.
    """

    name: str
    load: Callable[[], Backend]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    auto_devices: Tuple[str, ...] = ()
    auto_priority: int = 0
    dtypes: FrozenSet[torch.dtype] = _FLOATS
    vocab_parallel: bool = True
    emulated_devices: Tuple[str, ...] = ()
    summary: str = ""
    picks_among: Tuple[str, ...] = ()
    returns_row_order: bool = False
    warn_on_fallback: bool = False


_ENTRIES: Dict[str, BackendEntry] = {}
_LOADED: Dict[str, Backend] = {}
_WARNED_FALLBACK: Set[Tuple[str, str]] = set()


def register_backend(entry: BackendEntry) -> BackendEntry:
    """Add ``entry`` to the registry (a name may be registered once)."""
    if entry.name in _ENTRIES or entry.name == "auto":
        raise ValueError(f"backend {entry.name!r} is already registered (or reserved)")
    _ENTRIES[entry.name] = entry
    return entry


def backend_names() -> Tuple[str, ...]:
    """Every registered backend, in registration order (``"auto"`` excluded)."""
    return tuple(_ENTRIES)


def concrete_backend_names() -> Tuple[str, ...]:
    """The registered backends that run code of their own (dispatching entries excluded)."""
    return tuple(n for n, e in _ENTRIES.items() if not e.picks_among)


def impl_choices() -> Tuple[str, ...]:
    """Every valid ``impl=`` value: ``"auto"`` and the registered backends."""
    return ("auto",) + backend_names()


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of ``name``; ``ValueError`` naming the valid choices otherwise."""
    try:
        return _ENTRIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"impl: expected one of {impl_choices()}, got {name!r}") from None


def _device(device: DeviceLike) -> torch.device:
    return torch.device(device) if isinstance(device, str) else device


def unavailable_reason(name: str, device: DeviceLike) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device`` here, or ``None`` when it can."""
    return backend_entry(name).unavailable(_device(device))


def available_backends(device: DeviceLike = "cpu") -> Tuple[str, ...]:
    """The registered backends that can run on ``device`` here."""
    return tuple(n for n in _ENTRIES if unavailable_reason(n, device) is None)


def resolve_impl(impl: str, device: DeviceLike) -> str:
    """The backend name behind ``impl`` on ``device``: ``"auto"`` picks the available backend of
    highest priority for the device type; an explicit name must be available (else ``ValueError``
    with the reason and the fix).

    On the ``meta`` device no backend runs (the custom ops' fake implementations give the shapes),
    so an explicit name is accepted without its availability check and ``"auto"`` resolves as on
    the CPU (whose choice takes every dtype).
    """
    dev = _device(device)
    if dev.type == "meta":
        if impl == "auto":
            return resolve_impl("auto", "cpu")
        return backend_entry(impl).name
    if impl == "auto":
        reasons = {e.name: e.unavailable(dev) for e in _ENTRIES.values() if dev.type in e.auto_devices}
        candidates = [_ENTRIES[n] for n, reason in reasons.items() if reason is None]
        if not candidates:
            raise ValueError(f"impl='auto': no registered backend runs on device {dev}; registered: {backend_names()}")
        chosen = max(candidates, key=lambda e: e.auto_priority)
        _warn_fallbacks(chosen, reasons, dev)
        return chosen.name
    reason = backend_entry(impl).unavailable(dev)
    if reason is not None:
        raise ValueError(f"impl={impl!r}: {reason}")
    return impl


def _warn_fallbacks(chosen: BackendEntry, reasons: Dict[str, Optional[str]], dev: torch.device) -> None:
    """One warning per skipped ``warn_on_fallback`` backend that would have outranked ``chosen``."""
    for name, reason in reasons.items():
        entry = _ENTRIES[name]
        if reason is None or not entry.warn_on_fallback or entry.auto_priority <= chosen.auto_priority:
            continue
        if (name, dev.type) in _WARNED_FALLBACK:
            continue
        _WARNED_FALLBACK.add((name, dev.type))
        warnings.warn(
            f"impl='auto' on {dev.type} uses impl={chosen.name!r}: impl={name!r} is unavailable: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )


def get_backend(name: str) -> Backend:
    """The backend object of ``name``, loaded on first use."""
    backend = _LOADED.get(name)
    if backend is None:
        backend = _LOADED[name] = backend_entry(name).load()
    return backend
