"""``tokpo_kernels.linear_vocab_stats``: the library's core op, forward + backward.

Two operations share this file:

* ``vocab_stats_kl``: with a reference model and ``kl=True`` (TDPO / TI-DPO / KL-regularised RL).
  Cotangents flow into ``logp``, ``lse`` and ``kl``. Model FLOPs (bench/flops.py): forward 4NDV
  (policy + reference logits), forward+backward 12NDV (+ recompute of p and q, ∂h, ∂W).
* ``vocab_stats``: no reference (CE / DPO / TLPO-style). Cotangents on ``logp`` and ``lse``.
  Forward 2NDV, forward+backward 8NDV.

N counts valid (non-ignored) tokens only. No peer computes these statistics with per-token
cotangents on all three outputs; the KL alone is the ``forward_kl`` operation, where Liger's JSD
loss is compared.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX, random_cotangents
from bench.ops._common import Batch, head_batch, register_library_operation


def call(batch: Batch, impl: str, *, reference: bool) -> Tuple[Any, ...]:
    kw: Dict[str, Any] = dict(ignore_index=IGNORE_INDEX, impl=impl)
    if reference:
        kw.update(ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"], kl=True)
    s = tk.linear_vocab_stats(batch["hidden"], batch["weight"], batch["targets"], **kw)
    return (s.logp, s.lse, s.kl, s.mask) if reference else (s.logp, s.lse, s.mask)


def summary(out: Tuple[Any, ...]) -> Dict[str, float]:
    *stats, mask = out
    names = ("mean_logp", "mean_lse", "mean_kl")[: len(stats)]  # no kl without a reference
    return {name: float(x.detach()[mask].mean()) for name, x in zip(names, stats, strict=True)}


for _name, _ref, _what in (
    ("vocab_stats_kl", True, "with reference, kl=True; cotangents on logp, lse, kl (12NDV fwd+bwd)"),
    ("vocab_stats", False, "without reference; cotangents on logp, lse (8NDV fwd+bwd)"),
):
    register_library_operation(
        _name, f"linear_vocab_stats {_what}",
        flops=lambda s, r=_ref: step_flops(s.valid_tokens, s.dim, s.vocab, reference=r, kl=r),
        make_inputs=functools.partial(head_batch, reference=_ref,
                                      cotangents=lambda inp, r=_ref: random_cotangents(inp.targets, 3 if r else 2)),
        call=functools.partial(call, reference=_ref),
        summary=summary,
    )
