"""``tk.tlpo_loss``: TLPO, G groups x K = 16 candidate tokens, one hidden row per group.

Each group is one confusion point: its hidden row, the policy's top-16 next tokens there
(deterministic exploration, as the reference code), their detached probabilities and ±1 rewards
turned into advantages by ``tk.tlpo_advantages``. The loss is PPO-clip over the candidates with the
k3 KL to a reference (β_KL = 0.04, ε = 0.2/0.2, ``old_logp`` = the detached current log-probs:
the reference configuration, docs/methods.md §4). The reference's candidate log-probs are precomputed
(``ref_logp=``, (G, K)), once per batch outside the step, as GRPO trainers precompute theirs.

FLOPs (bench/flops.py): N = G hidden rows (not G·K: the K candidates share one row's logits,
which is the point of the one-row-per-group layout), no streamed reference: forward 2NDV,
forward+backward 8NDV. No peer computes TLPO; naive is the materialised computation.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX, label_logp, loss_cotangent, make_head, make_rows, top_k_labels
from bench.ops._common import Batch, register_library_operation
from bench.registry import Shape


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Batch:
    G, K, D = shape.rows, shape.candidates, shape.dim
    head = make_head(shape.vocab, D, dtype, device, reference=True)
    rows = make_rows(head, G, 1, 0)
    hidden = rows.hidden.reshape(G, D).requires_grad_(True)
    weight = head.weight.requires_grad_(True)
    candidates, probs = top_k_labels(hidden.detach(), weight.detach(), K)
    rewards = torch.where(torch.rand(G, K, generator=head.gen, device=device) < 0.5, 1.0, -1.0)
    t = {
        "hidden": hidden, "weight": weight, "candidates": candidates,
        "advantages": tk.tlpo_advantages(probs, rewards),
        "ref_logp": label_logp(rows.ref_hidden.reshape(G, D), head.ref_weight, candidates),
    }
    extra = dict(rows.extra, candidate_prob_mass=float(probs.sum(-1).mean()))
    return Batch(t=t, params=(hidden, weight), cotangents=(loss_cotangent(device),), extra=extra)


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.tlpo_loss(batch["hidden"], batch["weight"], batch["candidates"], batch["advantages"],
                       ref_logp=batch["ref_logp"], kl_beta=0.04, eps_low=0.2, eps_high=0.2,
                       ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "tlpo_loss",
    "TLPO: PPO-clip + k3 KL over K=16 top-probability candidates per group, one hidden row per group, "
    "reference log-probs precomputed (8NDV fwd+bwd, N = groups)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab),
    make_inputs=make_inputs, call=call,
)
