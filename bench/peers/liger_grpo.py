"""Liger-Kernel's chunked GRPO, ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``, for ``ppo_loss``.

Configured to compute exactly ``tk.ppo_loss(loss_type="grpo")`` on the same batch
(tests/test_loss_ppo.py checks loss and gradients agree): ``beta=0.04``, ``epsilon_low =
epsilon_high = 0.2``, ``loss_type="grpo"`` (Liger's default is "dapo"), token-level importance
sampling, precomputed ``ref_per_token_logps`` and ``old_per_token_logps``; Liger takes the sampled
ids without the ignore mask plus an ``attention_mask`` (1 on response tokens). Liger's defaults
otherwise (``chunk_size=1`` sequence per chunk, vocabulary-streaming log-probs, fp32 ∂W).
``compiled`` (of the loss math only) as Liger's default on CUDA, off on CPU (see liger_dpo.py).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from bench.ops import ppo_loss as op
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=op.BETA, compiled=device.type == "cuda", use_ref_model=True,
                                    epsilon_low=op.EPS_LOW, epsilon_high=op.EPS_HIGH, loss_type="grpo")

    def fwd() -> Tuple[Any, ...]:
        out, _metrics = loss(batch["hidden"], batch["weight"], batch["raw_targets"], batch["attention_mask"],
                             batch["advantages"], ref_per_token_logps=batch["ref_logp"],
                             old_per_token_logps=batch["old_logp"])
        return (out,)

    return fwd


register_peer(
    "ppo_loss", "liger_grpo", _forward, requires=("liger_kernel",),
    note="liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(beta=0.04, eps 0.2/0.2, loss_type='grpo', "
         "precomputed ref/old log-probs, chunk_size=1; compiled on CUDA only)",
)
