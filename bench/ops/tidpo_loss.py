"""``tk.tidpo_loss``: TI-DPO with importance weights and an anchor (triplet term), no attribution pass.

The training step of the TI-DPO reference code minus the attribution pass (an extra
forward+backward through the whole model that produces the scores; it is the integrations' job):

* token weights: ``tk.token_importance_weights`` of random positive attribution scores (the L1
  norms of embedding gradients are positive) with the paper's λ = 0.7, σ_div = 4, so they have the
  real shape: normalised, mixed with a Gaussian prior, mean 1 over each row's response;
* preference term ``"tdpo2"`` (the reference code's form) with the paper's β = 0.1, α = 0.5;
* triplet term with γ = 0.1, margin = 0.01, one anchor per pair: a policy sample of at most 64
  response tokens (the reference code samples ≤ 64 new tokens), after the same prompt.

FLOPs (bench/flops.py): the pairs' N valid tokens have a streamed reference and a full-vocabulary
KL (12NDV); the anchors' N_a response tokens a streamed reference without KL (10·N_a·DV). No peer
computes TI-DPO; naive is the materialised computation.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

import tokpo_kernels as tk
from bench.flops import add, step_flops
from bench.inputs import IGNORE_INDEX, make_rows
from bench.ops._common import Batch, head_batch, register_library_operation
from bench.registry import Shape

ANCHOR_RESPONSE = 64  # tokens the reference code samples for an anchor


def anchor_response(shape: Shape) -> int:
    return min(ANCHOR_RESPONSE, shape.seq - shape.ignored_prefix)


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Batch:
    batch = head_batch(shape, dtype, device, reference=True)
    inp = batch["inputs"]
    mask = inp.targets != IGNORE_INDEX
    scores = inp.head.randn(*inp.targets.shape).abs()
    batch.t["token_weights"] = tk.token_importance_weights(scores, mask, lam=0.7, sigma_div=4.0)
    anchor = make_rows(inp.head, shape.rows // 2, shape.ignored_prefix + anchor_response(shape), shape.ignored_prefix,
                       measure=False)
    batch.t.update(anchor_hidden=anchor.hidden.requires_grad_(True), anchor_ref_hidden=anchor.ref_hidden,
                   anchor_targets=anchor.targets)
    batch.params = batch.params + (anchor.hidden,)
    batch.extra["anchor_tokens"] = int((anchor.targets != IGNORE_INDEX).sum())
    return batch


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.tidpo_loss(
        batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"],
        token_weights=batch["token_weights"], anchor_hidden=batch["anchor_hidden"],
        anchor_ref_hidden=batch["anchor_ref_hidden"], anchor_targets=batch["anchor_targets"],
        beta=0.1, alpha=0.5, gamma=0.1, margin=0.01, preference="tdpo2", ignore_index=IGNORE_INDEX, impl=impl,
    )
    return (out.loss,)


def flops(s: Shape):
    anchors = (s.rows // 2) * anchor_response(s)
    return add(step_flops(s.valid_tokens, s.dim, s.vocab, reference=True, kl=True),
               step_flops(anchors, s.dim, s.vocab, reference=True))


register_library_operation(
    "tidpo_loss",
    "TI-DPO (tdpo2 preference, importance weights, triplet with a 64-token anchor per pair; paper defaults) "
    "without the attribution pass (12NDV pairs + 10NDV anchors)",
    flops=flops, make_inputs=make_inputs, call=call,
)
