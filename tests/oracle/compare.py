"""The one closeness check of the tests, and the two ways the tests size its absolute tolerance.

``assert_close(actual, expected, rtol=, atol=, name=)`` means one thing everywhere: every element
satisfies ``|actual − expected| ≤ atol + rtol·|expected|`` (``torch.isclose``'s rule), compared in
float64 on CPU, with equal shapes and a finite ``actual``. ``atol`` is absolute; a test whose error
grows with the size of the expected tensor says so at the call site with one of:

* ``atol_scaled(atol, expected)`` = ``atol · max(1, max|expected|)``: ``atol`` is absolute for
  tensors of magnitude up to 1 and relative to the largest entry above that;
* ``atol_normwise(rtol, atol, expected)`` = ``rtol · max|expected| + atol``: used with ``rtol=0``
  it bounds the largest error by a fraction of the largest expected entry (a norm-wise relative
  error), which suits gradients whose small entries carry the rounding of the large ones.
"""

from __future__ import annotations

import torch


def magnitude(t: torch.Tensor) -> float:
    """``max |t|`` (0.0 for an empty tensor)."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def atol_scaled(atol: float, expected: torch.Tensor) -> float:
    """``atol · max(1, max|expected|)``."""
    return atol * max(1.0, magnitude(expected))


def atol_normwise(rtol: float, atol: float, expected: torch.Tensor) -> float:
    """``rtol · max|expected| + atol``."""
    return rtol * magnitude(expected) + atol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str) -> None:
    """Assert ``|actual − expected| ≤ atol + rtol·|expected|`` elementwise (float64, CPU).

    The message names the check, the worst element, what was expected there and what was got.
    """
    a = actual.detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    assert a.shape == e.shape, f"{name}: expected shape {tuple(e.shape)}, got {tuple(a.shape)}"
    assert torch.isfinite(a).all(), f"{name}: expected finite values, got {a}"
    ok = torch.isclose(a, e, rtol=rtol, atol=atol)
    if bool(ok.all()):
        return
    err = (a - e).abs()
    worst = int(torch.where(ok, torch.zeros_like(err), err).reshape(-1).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
    raise AssertionError(
        f"{name}: {int((~ok).sum())} of {a.numel()} elements outside atol + rtol·|expected| "
        f"(rtol={rtol:.1e}, atol={atol:.1e}); worst at {idx}: expected {float(e.reshape(-1)[worst]):.9g}, "
        f"got {float(a.reshape(-1)[worst]):.9g} (|diff| {float(err.reshape(-1)[worst]):.3e})"
    )
