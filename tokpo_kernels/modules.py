"""``nn.Module`` wrappers: hyperparameters at construction, tensors at call, same keyword names.

Each module stores the keyword options of its functional loss and forwards positional tensors in
the functional's order, so ``TDPOLoss(beta=0.2)(h, W, y, h_ref, W_ref)`` is
``tdpo_loss(h, W, y, h_ref, W_ref, beta=0.2)``. Keywords given at call time override the stored
ones (per-batch tensors such as ``token_weights`` or ``ref_logp`` go there). An unknown keyword
raises ``TypeError`` at construction instead of being swallowed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Dict

from torch import nn

from tokpo_kernels._types import LossOutput
from tokpo_kernels.losses.cross_entropy import linear_cross_entropy
from tokpo_kernels.losses.dpo import dpo_loss
from tokpo_kernels.losses.ppo import ppo_loss
from tokpo_kernels.losses.tdpo import tdpo_loss
from tokpo_kernels.losses.tidpo import tidpo_loss
from tokpo_kernels.losses.tlpo import tlpo_loss


class _FunctionalLoss(nn.Module):
    _fn: ClassVar[Callable[..., LossOutput]]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        sig = inspect.signature(type(self)._fn)
        allowed = {n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {unknown}; expected keywords of "
                f"{type(self)._fn.__name__}: {sorted(allowed)}"
            )
        self.options: Dict[str, Any] = dict(options)

    def forward(self, *tensors: Any, **overrides: Any) -> LossOutput:
        return type(self)._fn(*tensors, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not hasattr(v, "shape"))


class TDPOLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.tdpo_loss`."""

    _fn = staticmethod(tdpo_loss)


class TIDPOLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.tidpo_loss`."""

    _fn = staticmethod(tidpo_loss)


class TLPOLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.tlpo_loss`."""

    _fn = staticmethod(tlpo_loss)


class DPOLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.dpo_loss`."""

    _fn = staticmethod(dpo_loss)


class PPOLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.ppo_loss`."""

    _fn = staticmethod(ppo_loss)


class LinearCrossEntropyLoss(_FunctionalLoss):
    """Module form of :func:`tokpo_kernels.linear_cross_entropy`."""

    _fn = staticmethod(linear_cross_entropy)


__all__ = ["DPOLoss", "LinearCrossEntropyLoss", "PPOLoss", "TDPOLoss", "TIDPOLoss", "TLPOLoss"]
