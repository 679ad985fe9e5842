"""Backends: implementations of the two passes behind ``linear_vocab_stats``, in a registry.

A backend is an object with ``forward`` and ``backward`` (``backends.base.Backend``) registered
under the name users pass as ``impl=``. Adding one is a new module that calls
``register_backend(BackendEntry(...))`` plus one import line below; ``impl="auto"``, validation,
the benchmarks and the tests then pick it up from the registry (``docs/extending.md``).
"""

# Registration: importing a backend module registers it (import order is the listing order).
from tokpo_kernels.backends import chunked, cpp, naive, triton_kernels  # noqa: F401
from tokpo_kernels.backends.base import Backend
from tokpo_kernels.backends.registry import (
    BackendEntry,
    available_backends,
    backend_entry,
    backend_names,
    concrete_backend_names,
    get_backend,
    impl_choices,
    register_backend,
    resolve_impl,
    unavailable_reason,
)

__all__ = [
    "Backend",
    "BackendEntry",
    "available_backends",
    "backend_entry",
    "backend_names",
    "concrete_backend_names",
    "get_backend",
    "impl_choices",
    "register_backend",
    "resolve_impl",
    "unavailable_reason",
]
