"""Sharded-parameter detection that needs no process group: DeepSpeed ZeRO-3 placeholders, DTensor misuse.

ZeRO-3 is recognised by duck typing (``ds_id`` / ``ds_status``), so these tests build parameters
that carry those attributes the way DeepSpeed sets them, without importing DeepSpeed.
"""

from __future__ import annotations

import enum

import pytest
import torch

import tokpo_kernels as tk


class ZeroParamStatus(enum.Enum):  # the names DeepSpeed's enum uses
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def _zero3(t: torch.Tensor, status: ZeroParamStatus) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t if status is ZeroParamStatus.AVAILABLE else torch.empty(0))
    p.ds_id, p.ds_status, p.ds_shape = 7, status, tuple(t.shape)
    return p


def test_partitioned_zero3_weight_raises_with_what_to_do() -> None:
    h, w, y = torch.randn(3, 4), torch.randn(11, 4), torch.randint(0, 11, (3,))
    expected = r"weight: expected a gathered DeepSpeed ZeRO-3 parameter.*NOT_AVAILABLE.*\(11, 4\)"
    with pytest.raises(ValueError, match=expected):
        tk.linear_vocab_stats(h, _zero3(w, ZeroParamStatus.NOT_AVAILABLE), y, impl="torch")
    with pytest.raises(ValueError, match="ref_weight: expected a gathered"):
        tk.tdpo_loss(torch.randn(2, 3, 4), w, torch.randint(0, 11, (2, 3)), torch.randn(2, 3, 4),
                     _zero3(w, ZeroParamStatus.INFLIGHT), impl="torch")


def test_gathered_zero3_weight_is_used_as_is() -> None:
    h = torch.randn(3, 4, requires_grad=True)
    w, y = torch.randn(11, 4), torch.randint(0, 11, (3,))
    p = _zero3(w.clone(), ZeroParamStatus.AVAILABLE)
    got = tk.linear_vocab_stats(h, p, y, impl="torch")
    want = tk.linear_vocab_stats(h, w, y, impl="naive")
    torch.testing.assert_close(got.logp, want.logp)
    got.logp.sum().backward()
    assert p.grad is not None and p.grad.shape == w.shape
