"""Target ids of any integer dtype are accepted (cast once to int64); ids out of range are refused.

An unsigned id must be range-checked after the cast: compared as uint8, ``156 != -100`` would not
see the ignore index at all and ``-100`` itself wraps to 156.
"""

from __future__ import annotations

import pytest
import torch

import tokpo_kernels as tk
from tokpo_kernels.backends import available_backends

NARROW = [torch.uint8, torch.int8, torch.int16, torch.int32]


@pytest.mark.parametrize("impl", available_backends("cpu"))
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_narrow_integer_targets_match_int64(dtype: torch.dtype, impl: str, gen: torch.Generator) -> None:
    h = torch.randn(6, 8, generator=gen)
    w = torch.randn(100, 8, generator=gen)
    y64 = torch.tensor([1, 2, 99, 0, 50, 7])
    expected = tk.linear_vocab_stats(h, w, y64, impl=impl, entropy=True)
    got = tk.linear_vocab_stats(h, w, y64.to(dtype), impl=impl, entropy=True)
    torch.testing.assert_close(got.logp, expected.logp, rtol=0, atol=0)
    torch.testing.assert_close(got.entropy, expected.entropy, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16], ids=str)
def test_narrow_integer_out_of_range_raises(dtype: torch.dtype, gen: torch.Generator) -> None:
    h = torch.randn(3, 8, generator=gen)
    w = torch.randn(100, 8, generator=gen)
    with pytest.raises(ValueError, match=r"\[0, 100\).*got 156"):
        tk.linear_vocab_stats(h, w, torch.tensor([1, 2, 156], dtype=dtype), impl="torch")
