"""TI-DPO: token-importance-weighted preference loss plus a triplet term (arXiv 2505.19653, ICLR 2026).

docs/methods.md §3. PyTorch on ``linear_vocab_stats``; no kernel of its own. The importance weights come
from ``token_importance_weights`` (losses/importance.py) and enter here as detached inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tokpo_kernels._types import LossOutput
from tokpo_kernels._validation import (
    check_all_or_none,
    check_choice,
    check_float_tensor,
    check_number,
    check_pair_rows,
    check_reference_pair,
    check_sequence_batch,
    check_shape,
)
from tokpo_kernels.losses._common import masked_sum, pack_left, pad_last, split_pairs
from tokpo_kernels.losses._options import HeadOptions, loss_function
from tokpo_kernels.losses.tdpo import pair_sums, tdpo_metrics

TIDPO_PREFERENCES = ("tdpo2", "tdpo1", "dpo")


def packed_sq_distance(
    d_a: torch.Tensor, m_a: torch.Tensor, d_b: torch.Tensor, m_b: torch.Tensor
) -> torch.Tensor:
    """``Σ_j (a_j − b_j)²`` over the overlap of the left-packed valid spans of two ``(B, ·)`` rows."""
    pa, pma = pack_left(d_a, m_a)
    pb, pmb = pack_left(d_b, m_b)
    length = max(int(pa.shape[-1]), int(pb.shape[-1]))
    pa, pma = pad_last(pa, length, 0.0), pad_last(pma, length, False)
    pb, pmb = pad_last(pb, length, 0.0), pad_last(pmb, length, False)
    return masked_sum((pa - pb) ** 2, pma & pmb)


@loss_function("TIDPOLoss")
def tidpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    ref_hidden: torch.Tensor, ref_weight: torch.Tensor,
    *,
    token_weights: Optional[torch.Tensor] = None,
    anchor_hidden: Optional[torch.Tensor] = None, anchor_ref_hidden: Optional[torch.Tensor] = None,
    anchor_targets: Optional[torch.Tensor] = None,
    beta: float = 0.1, alpha: float = 0.5, gamma: float = 0.1, margin: float = 0.01,
    preference: str = "tdpo2", kl_coef: float = 0.0,
    head: HeadOptions,
    token_stats: bool = False,  # after the shared options: keywords are only ever appended
) -> LossOutput:
    """TI-DPO loss: importance-weighted preference term + γ · triplet term (+ optional KL penalty).

    Rows of ``hidden (2B, T, D)`` / ``targets (2B, T)`` are stacked ``[chosen; rejected]``; hidden
    position ``t`` predicts ``targets[t]``; ``m_t`` masks labels equal to ``ignore_index``.
    ``w = token_weights`` (detached; all ones when ``None``) is aligned with ``targets``: ``w[b, t]``
    is the weight of the label token ``y_t``. Per row::

        M_w,b = Σ_t m_t w_b,t (ℓ_t[y_t] − ℓ_ref,t[y_t])        K_b = Σ_t m_t KL(q_t ‖ p_t)  (unweighted)
        preference="tdpo2": Δ_b = (M_w,c − M_w,r) − α (K_r − sg(K_c))   (the reference code's form)
        preference="tdpo1": Δ_b = (M_w,c − M_w,r) − (K_r − K_c)         (TDPO1 as the base; α unused)
        preference="dpo":   Δ_b =  M_w,c − M_w,r                        (the paper's weighted DPO)
        L_pref = mean_b −log σ(β Δ_b)

    Triplet term (when the anchor is given and ``margin > 0``; otherwise skipped and reported as 0):
    each sequence is its vector of per-token log-ratios ``d_j = ℓ(y_j) − ℓ_ref(y_j)`` over its
    response tokens, packed left (unweighted). Over the overlap of the packed spans::

        D⁺_b = Σ_j (d_j(anchor) − d_j(chosen))²,   D⁻_b = Σ_j (d_j(anchor) − d_j(rejected))²
        L_triplet = mean_b a_b · max(0, D⁺_b − D⁻_b + margin)

    where ``a_b = 0`` for a pair whose anchor has no response token (an anchor sampled as an
    immediate EOS): its triplet term is 0, as in the authors' code, not ``max(0, margin)``.

    Total: ``loss = L_pref + γ L_triplet + kl_coef · mean_b ½(K_c + K_r)``. Gradients flow into the
    policy through the chosen, rejected and anchor log-ratios; the reference gets none.

    Defaults are the paper's (``β = 0.1, α = 0.5, γ = 0.1``; ``margin = 0.01``). The reference code
    uses ``beta=0.2, alpha=0.5, gamma=0.001, margin=0.001``.

    Args:
        hidden, weight, targets, ref_hidden, ref_weight: as ``tdpo_loss``.
        token_weights: ``(2B, T)`` floating-point weights aligned with ``targets``, or ``None``.
        anchor_hidden: ``(B, T_a, D)`` policy hidden states of the anchor (a response sampled from
            the policy for the same prompt), one per pair; uses ``weight``/``bias``.
        anchor_ref_hidden: ``(B, T_a, D_ref)`` the reference's hidden states for the anchor; uses
            ``ref_weight``/``ref_bias``.
        anchor_targets: ``(B, T_a)`` the anchor's labels (``ignore_index`` off the response).
            The three anchor arguments are given together or not at all.
        beta (> 0), alpha (>= 0), gamma (>= 0), margin: see the equations.
        preference: ``"tdpo2"``, ``"tdpo1"`` or ``"dpo"``.
        kl_coef: weight (>= 0) of the optional mean sequence-KL penalty.
        token_stats: also return the statistics pass over chosen and rejected (not the anchor) as
            ``LossOutput.stats``, with the policy's per-token entropy, max and mean logit (for logging).

    Returns:
        ``LossOutput(loss, metrics)``. Per-pair ``(B,)`` metrics as ``tdpo_loss`` with the weighted
        margin: ``rewards/* = β(M_w + K)`` for both preference forms (docs/methods.md §3: "metrics as
        TDPO"); ``kl/*``, ``logps/*`` as TDPO; plus ``triplet_loss`` (0-d, the unweighted
        ``L_triplet``, 0 when skipped).
    """
    rows, _ = check_sequence_batch("hidden", hidden, targets)
    pairs = check_pair_rows("hidden", rows)
    beta = check_number("beta", beta, gt=0.0)
    alpha = check_number("alpha", alpha, ge=0.0)
    gamma = check_number("gamma", gamma, ge=0.0)
    margin = check_number("margin", margin)
    kl_coef = check_number("kl_coef", kl_coef, ge=0.0)
    check_choice("preference", preference, TIDPO_PREFERENCES)
    check_reference_pair(ref_hidden, ref_weight, required_by="tidpo_loss")
    if token_weights is not None:
        check_float_tensor("token_weights", token_weights)
        check_shape("token_weights", token_weights, tuple(targets.shape), "like targets (2B, T)")
    has_anchor = check_all_or_none(
        {"anchor_hidden": anchor_hidden, "anchor_ref_hidden": anchor_ref_hidden, "anchor_targets": anchor_targets}
    )
    if has_anchor:
        a_rows, _ = check_sequence_batch("anchor_hidden", anchor_hidden, anchor_targets, targets_name="anchor_targets")
        if a_rows != pairs:
            raise ValueError(
                f"anchor_hidden: expected one anchor per pair, B={pairs} rows, got {a_rows} rows "
                f"(shape {tuple(anchor_hidden.shape)})"
            )
        check_float_tensor("anchor_ref_hidden", anchor_ref_hidden)
        pairs_of = (("anchor_hidden", anchor_hidden, hidden), ("anchor_ref_hidden", anchor_ref_hidden, ref_hidden))
        for name, a, ref in pairs_of:
            if a.dim() != 3 or a.shape[:2] != anchor_hidden.shape[:2] or a.shape[-1] != ref.shape[-1]:
                raise ValueError(
                    f"{name}: expected shape {tuple(anchor_hidden.shape[:2]) + (int(ref.shape[-1]),)} (the anchor's "
                    f"(B, T_a) and the hidden size of {'hidden' if ref is hidden else 'ref_hidden'}), "
                    f"got {tuple(a.shape)}"
                )

    stats = head.stats(hidden, weight, targets, ref_hidden, ref_weight, kl=True, token_stats=bool(token_stats))
    mask = stats.mask
    ratio = stats.logp - stats.ref_logp  # d_t, 0 off the mask
    if token_weights is None:
        weighted = ratio
    else:
        w = token_weights.detach().to(device=ratio.device, dtype=ratio.dtype)
        weighted = ratio * torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    s = pair_sums(stats, weighted)  # M_w,b, K_b
    if preference == "tdpo2":
        delta = (s.margin_c - s.margin_r) - alpha * (s.kl_r - s.kl_c.detach())
    elif preference == "tdpo1":
        delta = (s.margin_c - s.margin_r) - (s.kl_r - s.kl_c)
    else:
        delta = s.margin_c - s.margin_r
    loss = -F.logsigmoid(beta * delta).mean()

    triplet = loss.new_zeros(())
    if has_anchor and margin > 0:
        a_stats = head.stats(anchor_hidden, weight, anchor_targets, anchor_ref_hidden, ref_weight)
        d_a = a_stats.logp - a_stats.ref_logp
        d_c, d_r = split_pairs(ratio, "hidden")
        mk_c, mk_r = split_pairs(mask, "hidden")
        d_pos = packed_sq_distance(d_a, a_stats.mask, d_c, mk_c)
        d_neg = packed_sq_distance(d_a, a_stats.mask, d_r, mk_r)
        has_anchor_tokens = a_stats.mask.any(dim=-1)  # (B,): an empty anchor's term is 0
        triplet = torch.where(has_anchor_tokens, torch.relu(d_pos - d_neg + margin), d_pos.new_zeros(())).mean()
        loss = loss + gamma * triplet
    if kl_coef > 0:
        loss = loss + kl_coef * (0.5 * (s.kl_c + s.kl_r)).mean()

    # docs/methods.md §3: "metrics as TDPO (rewards use the weighted margin)", i.e. β(M_w + K) for both
    # preference forms; the KL is still measured (and reported) when the loss does not use it.
    metrics = tdpo_metrics(beta, s)
    metrics["triplet_loss"] = triplet.detach()
    return LossOutput(loss, metrics, stats=stats if token_stats else None)
