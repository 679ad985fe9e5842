"""``nn.Module`` wrappers: hyperparameters at construction, tensors at call, same keyword names.

One class per registered loss (``tokpo_kernels.losses.LOSSES``), generated below: it stores the
keyword options of its functional loss and forwards positional tensors in the functional's order,
so ``TDPOLoss(beta=0.2)(h, W, y, h_ref, W_ref)`` is ``tdpo_loss(h, W, y, h_ref, W_ref, beta=0.2)``.
Keywords given at call time override the stored ones (per-batch tensors such as ``token_weights``
or ``ref_logp`` go there). An unknown keyword raises ``TypeError`` at construction instead of being
swallowed. ``inspect.signature`` of a class shows its options (those of the functional).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Dict, List, Tuple

from torch import nn

from tokpo_kernels._types import LossOutput
from tokpo_kernels.losses import LOSSES, LossSpec


class _FunctionalLoss(nn.Module):
    _fn: ClassVar[Callable[..., LossOutput]]
    _options: ClassVar[Tuple[str, ...]]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self._options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {unknown}; expected keywords of "
                f"{type(self)._fn.__name__}: {sorted(self._options)}"
            )
        self.options: Dict[str, Any] = dict(options)

    def forward(self, *tensors: Any, **overrides: Any) -> LossOutput:
        return type(self)._fn(*tensors, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not hasattr(v, "shape"))


def _module_class(spec: LossSpec) -> type:
    """The ``nn.Module`` class of one loss, with ``__init__``'s signature listing its options."""
    sig = inspect.signature(spec.fn)

    def __init__(self: _FunctionalLoss, **options: Any) -> None:
        _FunctionalLoss.__init__(self, **options)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[self_param] + [sig.parameters[n] for n in spec.options], return_annotation=None
    )
    doc = (f"Module form of :func:`tokpo_kernels.{spec.name}`: its keyword options at construction, its "
           f"tensors at call (call-time keywords override). Options: {', '.join(spec.options)}.")
    namespace = {"_fn": staticmethod(spec.fn), "_options": spec.options, "__init__": __init__,
                 "__doc__": doc, "__module__": __name__, "__qualname__": spec.module}
    return type(spec.module, (_FunctionalLoss,), namespace)


__all__: List[str] = []
for _spec in LOSSES:
    globals()[_spec.module] = _module_class(_spec)
    __all__.append(_spec.module)
__all__.sort()
