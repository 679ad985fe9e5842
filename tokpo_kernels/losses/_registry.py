"""The list of public losses. A loss registers itself by its ``@loss_function`` decorator when its
module is imported (one import line in ``tokpo_kernels/losses/__init__.py``); the ``nn.Module``
wrappers (``tokpo_kernels.modules``) and the package exports (``tokpo_kernels``) are generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from tokpo_kernels._types import LossOutput


@dataclass(frozen=True)
class LossSpec:
    """One public loss: its function, the class name of its module wrapper, its keyword options."""

    name: str
    fn: Callable[..., LossOutput]
    module: str
    options: Tuple[str, ...]


LOSSES: List[LossSpec] = []


def register_loss(spec: LossSpec) -> None:
    """Add ``spec``; a second loss or module class of the same name is an error (it would shadow the first)."""
    clash = [s.name for s in LOSSES if s.name == spec.name or s.module == spec.module]
    if clash:
        raise ValueError(f"register_loss: {spec.name!r} / {spec.module!r} clash with the registered {clash}")
    LOSSES.append(spec)
