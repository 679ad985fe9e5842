"""Liger-Kernel's chunked DPO, ``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss``, for ``dpo_loss``.

Configured to compute exactly ``tk.dpo_loss``'s sigmoid DPO (tests/test_loss_dpo.py checks loss
and gradients agree): ``beta=0.1``, ``loss_type="sigmoid"``, ``use_ref_model=True`` (reference
hidden states and head; Liger recomputes the reference logits inside its chunks),
``average_log_prob=False`` (summed log-probs, TRL's DPO), ``compute_nll_loss=False`` (no SFT term).
Liger's own defaults otherwise: ``chunk_size=1`` pair per chunk, full sequence x V logits per chunk,
gradients computed in the forward with ``torch.func.grad_and_value``.

``compiled``: Liger's default (``True``, ``torch.compile`` of the chunk step) on CUDA, which is how
it is run there; ``False`` on CPU, where Inductor's C++ compile took ~20 s per shape and the
compiled step was no faster than eager on 2 cores (measured on a 2x64-token case: 0.36 s compiled
vs 0.27 s eager per step).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch

from bench.ops import dpo_loss as op
from bench.ops._common import Batch, register_peer


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=op.BETA, compiled=device.type == "cuda", use_ref_model=True,
                                   average_log_prob=False, loss_type="sigmoid", compute_nll_loss=False)
    args = (batch["weight"], batch["hidden"], batch["targets"], None, batch["ref_hidden"], batch["ref_weight"], None)
    return lambda: (loss(*args)[0],)


register_peer(
    "dpo_loss", "liger_dpo", _forward, requires=("liger_kernel",),
    note="liger_kernel.chunked_loss.LigerFusedLinearDPOLoss(beta=0.1, sigmoid, use_ref_model=True, "
         "average_log_prob=False, compute_nll_loss=False, chunk_size=1; compiled on CUDA only)",
)
