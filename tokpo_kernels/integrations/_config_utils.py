"""What the trainer config classes share: checking a field, and moving deprecated trainer keywords
into the config.

The configs (``TDPOConfig``, ``TIDPOConfig``, ``TLPOConfig``) are ``transformers`` argument dataclasses:
``HfArgumentParser`` fills them from YAML or command-line flags, ``Trainer`` saves them in
``training_args.bin``. Their method fields are checked in ``__post_init__`` with the helpers here, so
a typo (``loss_impl="tritn"``) raises at construction, not at the first training step.

Imports nothing from ``transformers``; the config modules do.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from tokpo_kernels.backends import backend_names

# A trainer keyword left at this default was not given; any other value was (``None`` is a real value
# of some fields, so it cannot be the marker).
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<unset>", "__bool__": lambda self: False})()


def check_loss_impl(value: Any) -> str:
    """``value`` if it names a backend of ``tokpo_kernels`` (or ``"auto"``), else a ``ValueError``."""
    names = ("auto",) + tuple(backend_names())
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"loss_impl: expected one of {names}, got {value!r}")
    return value


def check_field(name: str, value: Any, *, kind: type = float, gt: Optional[float] = None,
                ge: Optional[float] = None, le: Optional[float] = None, choices: Optional[Iterable[Any]] = None) -> Any:
    """``value`` converted to ``kind`` and checked against the bounds / choices; ``ValueError`` naming
    the field, what was expected and what was got otherwise (``bool`` is not accepted as a number)."""
    if choices is not None:
        allowed = tuple(choices)
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected a bool, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a {kind.__name__}, got {value!r}")
    if kind is int and int(value) != value:
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = kind(value)
    for op, bound, ok in (("> ", gt, lambda v, b: v > b), (">= ", ge, lambda v, b: v >= b),
                          ("<= ", le, lambda v, b: v <= b)):
        if bound is not None and not ok(value, bound):
            raise ValueError(f"{name}: expected {op}{bound}, got {value!r}")
    return value


def fill_config_from_keywords(
    trainer: str, config_cls: type, args: Any, keywords: Mapping[str, Any], *,
    convert: Callable[[Any], Any], stacklevel: int = 3,
) -> Any:
    """The trainer's config with the deprecated method keywords it was given written into it.

    ``args`` is what the user passed (``None``, a ``config_cls``, or a plain base config that
    ``convert`` turns into a ``config_cls``). Each keyword not left ``UNSET`` overrides the config's
    field of the same name, with one ``FutureWarning`` naming the fields to set instead; the config
    is then validated again (its ``validate_method_fields``). ``stacklevel`` as ``warnings.warn``'s,
    counted from this function (3: the caller of the function that calls it).
    """
    given: Dict[str, Any] = {k: v for k, v in keywords.items() if v is not UNSET}
    config = args if isinstance(args, config_cls) else convert(args)
    if given:
        warnings.warn(
            f"{trainer}({', '.join(f'{k}=...' for k in given)}) is deprecated: set these fields of "
            f"{config_cls.__name__} instead (they are then saved with the training arguments and settable from "
            "YAML and the command line)",
            FutureWarning, stacklevel=stacklevel,
        )
        if config is args:
            # The caller's object is theirs: write into a copy, as the trainer keywords never changed it.
            import copy

            config = copy.copy(config)
        for key, value in given.items():
            setattr(config, key, value)
        config.validate_method_fields()
    return config
