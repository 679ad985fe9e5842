"""``tk.ppo_loss`` with ``loss_type="grpo"``: token-level clipped policy gradient + k3 KL.

B sampled sequences (labels drawn from the policy; the prompt prefix ignored), one advantage per
sequence (GRPO's group-normalised rewards), ``old_logp`` = the sampling policy's log-probs (the
current ones plus a small drift, so a few tokens are clipped), reference log-probs precomputed
(``ref_logp=``), β = 0.04, ε = 0.2/0.2, per-sequence mean then batch mean. This is what
Liger-Kernel's ``LigerFusedLinearGRPOLoss(loss_type="grpo")`` computes from
``ref_per_token_logps`` and ``old_per_token_logps`` (bench/peers/liger_grpo.py;
tests/test_loss_ppo.py checks the values and gradients agree).

FLOPs (bench/flops.py): no streamed reference, no full-vocabulary KL (the k3 KL is at the label
only): forward 2NDV, forward+backward 8NDV.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

import tokpo_kernels as tk
from bench.flops import step_flops
from bench.inputs import IGNORE_INDEX, label_logp
from bench.ops._common import Batch, head_batch, register_library_operation
from bench.registry import Shape

BETA, EPS_LOW, EPS_HIGH = 0.04, 0.2, 0.2  # GRPO's (and Liger's) defaults
OLD_POLICY_DRIFT = 0.1  # std of log p_old - log p (nats): one or two optimizer steps of drift


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Batch:
    batch = head_batch(shape, dtype, device, reference=True)
    inp = batch["inputs"]
    mask = inp.targets != IGNORE_INDEX
    zero = torch.zeros((), device=device)
    D = shape.dim
    ref = label_logp(inp.ref_hidden.reshape(-1, D), inp.ref_weight, inp.raw_targets.reshape(-1, 1))
    old = inp.logp + OLD_POLICY_DRIFT * inp.head.randn(*inp.logp.shape)
    batch.t.update(
        advantages=inp.head.randn(shape.rows),
        old_logp=torch.where(mask, old, zero),
        ref_logp=torch.where(mask, ref.view(inp.logp.shape), zero),
        attention_mask=mask.long(), raw_targets=inp.raw_targets,
    )
    # The reference model's hidden states are not an input of the step (its log-probs are).
    batch.t["ref_hidden"] = batch.t["ref_weight"] = inp.ref_hidden = None
    return batch


def call(batch: Batch, impl: str) -> Tuple[Any, ...]:
    out = tk.ppo_loss(batch["hidden"], batch["weight"], batch["targets"], batch["advantages"], batch["old_logp"],
                      ref_logp=batch["ref_logp"], beta=BETA, eps_low=EPS_LOW, eps_high=EPS_HIGH, loss_type="grpo",
                      ignore_index=IGNORE_INDEX, impl=impl)
    return (out.loss,)


register_library_operation(
    "ppo_loss",
    "token-level PPO/GRPO (loss_type grpo, beta 0.04, k3 KL at the label, eps 0.2) with precomputed old and "
    "reference log-probs (8NDV fwd+bwd)",
    flops=lambda s: step_flops(s.valid_tokens, s.dim, s.vocab),
    make_inputs=make_inputs, call=call,
)
