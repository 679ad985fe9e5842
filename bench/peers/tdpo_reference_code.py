"""``tdpo_reference_code``: TDPO computed the way the TDPO paper's reference code computes it.

Written from docs/methods.md §2 and the description of the public reference code (Zeng et al., ICML
2024), not copied from it. Its training step, from the lm-head on:

1. full logits of the policy for every position of ``[chosen; rejected]`` (prompt included),
   upcast to fp32 (``model(...).logits.to(torch.float32)``), and likewise for the reference under
   ``no_grad``;
2. ``log_softmax`` of the policy logits; ``softmax`` of the reference logits and its ``log``
   (``log(softmax)``, the source of its NaN when a probability underflows);
3. the per-position KL summed over the whole vocabulary,
   ``Σ_v q_v (log q_v − log p_v)``, and the log-probs gathered at the labels;
4. sums over the response tokens (mask = label != -100), then
   ``Δ = (M_c − M_r) + α (sg(K_c) − K_r)`` (TDPO2) and ``−log σ(β Δ)``, averaged over pairs.

Every (N, V) intermediate is materialised and saved by autograd, which is the memory the fused
implementation removes. The labels here are already shifted (hidden position t predicts label t,
the library's convention), so the reference code's ``[:, 1:]`` / ``[:, :-1]`` shift is not applied;
it is a view and costs nothing there either. bench/test_peer_agreement.py asserts this gives the
same loss and gradients as ``tk.tdpo_loss``.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
import torch.nn.functional as F

from bench.inputs import IGNORE_INDEX
from bench.ops import tdpo_loss as op
from bench.ops._common import Batch, register_peer


def tdpo_reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_hidden: torch.Tensor,
                        ref_weight: torch.Tensor, *, beta: float, alpha: float, tdpo2: bool = True) -> torch.Tensor:
    logits = (hidden @ weight.t()).to(torch.float32)
    with torch.no_grad():
        ref_logits = (ref_hidden @ ref_weight.t()).to(torch.float32)
    mask = labels != IGNORE_INDEX
    index = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)  # a dummy id on ignored tokens

    logps = logits.log_softmax(-1)
    ref_ps = ref_logits.softmax(-1)
    ref_logps = ref_ps.log()
    position_kl = (ref_ps * (ref_logps - logps)).sum(-1)
    margin = logps.gather(-1, index).squeeze(-1) - ref_logps.gather(-1, index).squeeze(-1)

    margin = (margin * mask).sum(-1)
    kl = (position_kl * mask).sum(-1)
    pairs = hidden.shape[0] // 2
    m_c, m_r, k_c, k_r = margin[:pairs], margin[pairs:], kl[:pairs], kl[pairs:]
    if tdpo2:
        delta = (m_c - m_r) + alpha * (k_c.detach() - k_r)
    else:
        delta = (m_c - m_r) + (k_c - k_r)
    return -F.logsigmoid(beta * delta).mean()


def _forward(batch: Batch, device: torch.device) -> Callable[[], Tuple[Any, ...]]:
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["ref_hidden"], batch["ref_weight"])
    return lambda: (tdpo_reference_loss(*args, beta=op.BETA, alpha=op.ALPHA, tdpo2=op.VARIANT == "tdpo2"),)


register_peer(
    "tdpo_loss", "tdpo_reference_code", _forward, requires=(),
    note="TDPO as the paper's reference code computes it: fp32 full logits of policy and reference, "
         "log_softmax / softmax / log, per-position KL summed over the vocabulary, all materialised",
)
