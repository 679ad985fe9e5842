"""Small helpers the Hugging Face integrations share (one copy each).

Special token ids with their fallbacks, the lm-head dtype under a trainer's autocast, padding
token-id sequences into a batch, running a model in eval mode for a moment, the common-prefix length
of two decoded texts, and recognising a PEFT model. Imports ``torch`` only; ``transformers`` and
``peft`` objects are recognised by duck typing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

# Hugging Face's label for "no loss here" (prompt and padding positions), the losses' default.
IGNORE_INDEX = -100

TokenIds = Union[Sequence[int], torch.Tensor]


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a ``peft`` ``PeftModel`` (any subclass), without importing ``peft``."""
    return (type(model).__name__.startswith("Peft") and hasattr(model, "peft_config")
            and callable(getattr(model, "get_base_model", None)))


def autocast_head_dtype(accelerator: Any, device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``F.linear`` computes an lm-head in under ``accelerator.autocast()`` (a trainer's
    ``bf16=True`` / ``fp16=True``) on ``device``, or ``None`` when that autocast is off.

    The trainers call the model's base directly (no logits), outside the autocast accelerate puts on
    ``model.forward``; they enter ``accelerator.autocast()`` themselves and cast the lm-head operands
    to this dtype, as the model's own ``lm_head`` would see them.
    """
    with accelerator.autocast():
        kind = torch.device(device).type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _id_list(value: Any) -> List[int]:
    return [int(e) for e in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_ids(model: nn.Module, eos_token_id: Union[int, Sequence[int], None] = None, tokenizer: Any = None
            ) -> List[int]:
    """The stop token ids, as a list (empty when none is known).

    The first that is set of: ``eos_token_id``, ``model.generation_config.eos_token_id`` (what
    ``generate`` stops on), ``model.config.eos_token_id``, ``tokenizer.eos_token_id``.
    """
    found = (
        eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(getattr(model, "config", None), "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    )
    eos_token_id = next((value for value in found if value is not None), None)
    return [] if eos_token_id is None else _id_list(eos_token_id)


def tokenizer_pad_id(tokenizer: Any, default: Optional[int] = None) -> int:
    """The tokenizer's ``pad_token_id``, else its ``eos_token_id``, else ``default``.

    Raises ``ValueError`` when none of them is set (with ``default=None``).
    """
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None), default):
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer needs a pad_token_id or an eos_token_id for batching")


def _pad(seqs: Sequence[TokenIds], value: Union[int, float], device: Optional[torch.device], dtype: torch.dtype,
         left: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n:
            cols = slice(width - n, width) if left else slice(0, n)
            out[i, cols] = torch.as_tensor(s, dtype=dtype).cpu()
            mask[i, cols] = 1
    if device is not None:
        out, mask = out.to(device), mask.to(device)
    return out, mask


def pad_left(seqs: Sequence[TokenIds], value: int, device: Optional[torch.device] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both ``(len(seqs), longest)`` long, each row right-aligned
    (what decoder-only ``generate`` wants); ``value`` fills the padding, the mask is 0 there."""
    return _pad(seqs, value, device, torch.long, left=True)


def pad_right(seqs: Sequence[TokenIds], value: Union[int, float], device: Optional[torch.device] = None,
              dtype: torch.dtype = torch.long) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(padded, mask)``, both ``(len(seqs), longest)``, each row left-aligned (positions match an
    unpadded forward); ``padded`` has ``dtype`` and ``value`` on padding, ``mask`` is long, 1 on data."""
    return _pad(seqs, value, device, dtype, left=False)


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, grad: bool = False) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (dropout off) and autograd set to ``grad``
    (off by default: inference); the model's training flag is restored afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        model.train(was_training)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (binary search on slices, which
    compare in C: decoded texts are compared once per generated token)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
