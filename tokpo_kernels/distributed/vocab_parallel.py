"""Vocabulary-parallel statistics: each rank streams its shard of the lm-head, ranks merge O(N) numbers.

The lm-head weight ``[V × D]`` is split by rows over the ranks of a process group, in rank order:
rank ``r`` holds rows ``[start_r, start_r + V_r)`` (any sizes ``V_r ≥ 1``, so ``V`` need not divide
by the world size). Hidden states and targets are the same on every rank (target ids are global).

Each rank runs the ordinary single-device implementation on its shard, as if the shard were the
whole vocabulary, which gives per-token *local* statistics ``lse_r``, ``H_r``, ``KL_r`` (and the
reference ``lse_q,r``). With ``w_r = e^{lse_r − lse}`` and ``v_r = e^{lse_q,r − lse_q}`` (each sums
to 1 over ranks), the global ones follow exactly:

    lse = log Σ_r e^{lse_r}
    H   = Σ_r w_r (H_r + lse − lse_r)                       (H = lse − Σ p·z, split per shard)
    KL  = Σ_r v_r (KL_r + lse_q,r − lse_r) − lse_q + lse    (KL = Σ q (z_q − z) − lse_q + lse)

Computed with shifts ``M = max_r lse_r`` and ``M_q = max_r lse_q,r`` so that no term overflows:
``S = Σ_r e^{lse_r − M}``, ``lse = M + log S``, ``H = Σ_r e^{lse_r−M}(H_r − (lse_r − M)) / S + log S``
and ``KL = Σ_r e^{lse_q,r−M_q}(KL_r + (lse_q,r − M_q) − (lse_r − M)) / S_q − log S_q + log S``.
The rank that owns a target id contributes its logit, the others 0, so a sum delivers it.

Communication per forward (all-reduce payloads; what goes on the wire depends on the algorithm, e.g.
a ring sends about 2(W−1)/W times the payload), with N token rows (ignored ones included: keeping
every row avoids a host sync), J target ids per row, W ranks, ``r = 1`` with a reference, and
c = 4 bytes (statistics travel in fp32; 8 for fp64 inputs):

    layout:  one SUM of W·(3 + r) float64                   8·W·(3 + r) bytes
             (shard sizes, and checksums of hidden, targets and ref_hidden: they must agree)
    maxima:  one MAX of N·(1 + r) numbers                   c·N·(1 + r) bytes
    sums:    one SUM of N·((1 + r)(1 + J) + kl + entropy)   c·N·((1 + r)(1 + J) + kl + entropy) bytes

e.g. TDPO (r = 1, J = 1, kl): 32·W + 28·N bytes. Per backward, when ``hidden`` needs a gradient,
one SUM of ``∂hidden`` in fp32: c·N·D bytes, the dominant term (``∂W`` and ``∂bias`` stay local;
the backward uses the global ``lse``/``lse_q``/``H`` saved by the forward). ``comm_bytes`` states
the same formula in code and is what the test that counts the bytes compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from tokpo_kernels._types import RawStats
from tokpo_kernels._validation import fail_if
from tokpo_kernels.numerics import accum_dtype


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's rows sit in the global vocabulary.

    ``start`` and ``total`` are 0-d int64 tensors on the weight's device (found by one small
    all-reduce, never read back to the host); ``group_name`` names the process group so that it
    can cross ``torch.library`` custom-op boundaries as a string.
    """

    start: torch.Tensor
    total: torch.Tensor
    rows: int
    group_name: str


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under ``group_name`` (custom ops can only carry strings)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def vocab_shard(
    rows: int, group: dist.ProcessGroup, device: torch.device, replicated: Sequence[Tuple[str, torch.Tensor]]
) -> VocabShard:
    """Exchange shard sizes and check that the ``replicated`` inputs agree across ranks.

    One SUM all-reduce of ``W·(1 + k)`` float64 (k = ``len(replicated)``): rank ``r`` fills row
    ``r`` with its shard size ``V_r`` (exact in float64 below 2**53) and a checksum (the float64
    sum) of each replicated input. Rank ``r`` starts at ``Σ_{i<r} V_i``. Hidden states or targets
    that differ between ranks would otherwise give a silent blend of several batches; every rank
    sees the same table, so all of them raise together and none is left waiting in a collective.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(world, 1 + len(replicated), dtype=torch.float64, device=device)
    table[rank, 0] = rows
    for i, (_, t) in enumerate(replicated):
        table[rank, 1 + i] = t.sum(dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    # Bitwise comparison: equal inputs give equal sums (NaN included) on every rank.
    bits = table[:, 1:].view(torch.int64)
    names = ", ".join(name for name, _ in replicated)
    fail_if(
        (bits != bits[:1]).any(),
        f"process_group: expected the same {names} on every rank of the vocabulary-parallel group "
        "(each rank holds a vocabulary shard of the head for the same tokens), got different checksums",
    )
    sizes = table[:, 0].to(torch.int64)
    fail_if(
        (sizes == 0).any(),
        "process_group: expected every rank of the vocabulary-parallel group to hold at least one row of "
        "the head, got an empty shard on some rank (split the vocabulary over fewer ranks)",
    )
    return VocabShard(start=sizes[:rank].sum(), total=sizes.sum(), rows=rows, group_name=group.group_name)


def localize_targets(targets: torch.Tensor, tvalid: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Global ids → ids into this rank's shard; ``-1`` where the id is ignored or owned elsewhere."""
    local = targets - shard.start
    owned = tvalid & (local >= 0) & (local < shard.rows)
    return torch.where(owned, local, torch.full_like(local, -1))


def combine_across_ranks(raw: RawStats, owned: torch.Tensor, row_valid: torch.Tensor, group_name: str) -> RawStats:
    """Merge per-shard statistics into global ones (see the module docstring for the algebra).

    ``raw`` holds this rank's local statistics for all N rows; ``owned`` (N, J) marks the target
    ids whose logits this rank computed. Rows that are not valid carry zeros through the
    collectives (their local values may be anything) and are masked by the caller.
    """
    group = resolve_group(group_name)
    zero = raw.lse.new_zeros(())

    def clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, zero)

    has_ref = raw.ref_lse is not None
    lse_r = clean(raw.lse, row_valid)
    ref_lse_r = clean(raw.ref_lse, row_valid) if has_ref else None

    maxima = torch.stack([lse_r, ref_lse_r]) if has_ref else lse_r[None].clone()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shift = lse_r - maxima[0]  # lse_r − M ≤ 0
    w = torch.exp(shift)
    parts: List[torch.Tensor] = [w[:, None], clean(raw.tgt_logit, owned)]
    ref_shift = wq = None
    if has_ref:
        ref_shift = ref_lse_r - maxima[1]
        wq = torch.exp(ref_shift)
        parts += [wq[:, None], clean(raw.ref_tgt_logit, owned)]
    # A fully masked shard (all logits -inf: lse_r = -inf, w = 0) has undefined local H_r / KL_r
    # and must contribute exactly 0, so its terms are selected away rather than multiplied by 0.
    if raw.entropy is not None:
        parts.append(torch.where(w > 0, w * (clean(raw.entropy, row_valid) - shift), zero)[:, None])
    if raw.kl is not None:
        parts.append(torch.where(wq > 0, wq * (clean(raw.kl, row_valid) + ref_shift - shift), zero)[:, None])
    sums = torch.cat(parts, dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    cols = iter(torch.split(sums, [p.shape[1] for p in parts], dim=1))

    # S ≥ 1 on a valid row (its largest shard contributes e^0); the clamp only guards masked rows.
    s = next(cols).squeeze(1).clamp_min(1.0)
    log_s = s.log()
    lse = maxima[0] + log_s
    tgt = next(cols)
    ref_lse = ref_tgt = log_sq = None
    if has_ref:
        sq = next(cols).squeeze(1).clamp_min(1.0)
        log_sq = sq.log()
        ref_lse = maxima[1] + log_sq
        ref_tgt = next(cols)
    entropy = kl = None
    if raw.entropy is not None:
        entropy = next(cols).squeeze(1) / s + log_s
    if raw.kl is not None:
        kl = (next(cols).squeeze(1) / sq - log_sq + log_s).clamp_min(0.0)
    return RawStats(tgt, lse, ref_tgt, ref_lse, kl, entropy)


def all_reduce_hidden_grad(dh: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum the per-shard ``∂hidden`` (fp32) over ranks: every shard's logits depend on all of ``h``."""
    dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=resolve_group(group_name))
    return dh


class _SumOfReplicatedLoss(torch.autograd.Function):
    """All-reduce SUM forward, identity backward.

    The sum feeds a loss that every rank computes identically (replicated), so the gradient each
    rank sees for the sum is already the true one, and its own contribution receives it unchanged;
    autograd's differentiable all-reduce would instead sum those identical gradients W times.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad, None


def vocab_mean(
    weight: torch.Tensor, bias: Optional[torch.Tensor], group: Optional[dist.ProcessGroup], dtype: torch.dtype
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(1/V) Σ_v W_v`` and ``(1/V) Σ_v b_v`` (``dtype`` accumulation) of a whole head, or of a head
    split over ``group`` (one all-reduce of D + 1 numbers, D + 2 with a bias), differentiable w.r.t.
    the local rows."""
    d = weight.shape[1]
    parts = [weight.sum(0, dtype=dtype)]
    if bias is not None:
        parts.append(bias.sum(dtype=dtype)[None])
    parts.append(torch.full((1,), weight.shape[0], dtype=dtype, device=weight.device))
    packed = torch.cat(parts)
    if group is not None:
        packed = _SumOfReplicatedLoss.apply(packed, group)
    count = packed[-1]
    return packed[:d] / count, (packed[d] / count if bias is not None else None)


def comm_bytes(
    n: int, j: int, d: int, world: int, *, reference: bool, kl: bool, entropy: bool,
    backward: bool = True, dtype: torch.dtype = torch.float32,
) -> int:
    """All-reduce payload bytes one rank sends per call (the formula of the module docstring).

    ``backward=True`` adds the ``∂hidden`` all-reduce, which is sent only when ``hidden`` needs a
    gradient.

    ``dtype`` is the inputs' dtype: statistics and ``∂hidden`` travel in the accumulation dtype,
    fp32 for fp32/bf16/fp16 inputs (``c = 4`` bytes) and fp64 for fp64 inputs (``c = 8``).
    """
    c = accum_dtype(dtype).itemsize
    r = int(reference)
    forward = 8 * world * (3 + r) + c * n * (1 + r) + c * n * ((1 + r) * (1 + j) + int(kl) + int(entropy))
    return forward + (c * n * d if backward else 0)
