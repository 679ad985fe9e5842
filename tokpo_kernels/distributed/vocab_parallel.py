"""Vocabulary-parallel statistics: each rank streams its shard of the lm-head, ranks merge O(N) numbers.

The lm-head weight ``[V × D]`` is split by rows over the ranks of a process group, in rank order:
rank ``r`` holds rows ``[start_r, start_r + V_r)`` (any sizes ``V_r ≥ 1``, so ``V`` need not divide
by the world size). Hidden states and targets are the same on every rank (target ids are global).

Each rank runs the ordinary single-device backend on its shard, as if the shard were the whole
vocabulary, which gives per-token *local* statistics (``lse_r``, ``H_r``, ``KL_r``, the reference's
``lse_q,r``, ``max_r``, ``Σ_r z``); ``tokpo_kernels.partials.merge_local_stats`` turns them into the
global ones exactly, with this module's all-reduce as its reduction (the Triton backend uses the
same merge over its vocabulary splits). The rank that owns a target id contributes its logit, the
others 0, so a sum delivers it.

Communication per forward (all-reduce payloads; what goes on the wire depends on the algorithm, e.g.
a ring sends about 2(W−1)/W times the payload), with N token rows (ignored ones included: keeping
every row avoids a host sync), J target ids per row, W ranks, ``r = 1`` with a reference, and
c = 4 bytes (statistics travel in fp32; 8 for fp64 inputs):

    layout:  one SUM of W·(3 + r) float64                   8·W·(3 + r) bytes
             (shard sizes, and checksums of hidden, targets and ref_hidden: they must agree)
    maxima:  one MAX of N·(1 + r + mx) numbers              c·N·(1 + r + mx) bytes
    sums:    one SUM of N·((1 + r)(1 + J) + kl + entropy + mean)
                                                            c·N·((1 + r)(1 + J) + kl + entropy + mean) bytes

(``mx``, ``mean``: 1 when ``max_logit`` / ``mean_logit`` are asked for, else 0.)

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
from tokpo_kernels.partials import merge_local_stats


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


class _AllReduceReducer:
    """Reduces over ranks: one all-reduce per call, with every tensor of the call packed into it."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def _reduce(self, xs: Sequence[torch.Tensor], op: dist.ReduceOp) -> List[torch.Tensor]:
        cols = [x.reshape(x.shape[0], -1) for x in xs]  # (N,) and (N, J) as columns of one buffer
        packed = torch.cat(cols, dim=1)
        dist.all_reduce(packed, op=op, group=self.group)
        parts = torch.split(packed, [c.shape[1] for c in cols], dim=1)
        return [p.reshape(x.shape) for p, x in zip(parts, xs, strict=True)]

    def max(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return self._reduce(xs, dist.ReduceOp.MAX)

    def sum(self, xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return self._reduce(xs, dist.ReduceOp.SUM)


def combine_across_ranks(raw: RawStats, owned: torch.Tensor, row_valid: torch.Tensor, group_name: str) -> RawStats:
    """Merge per-shard statistics into global ones (``tokpo_kernels.partials`` has the algebra).

    ``raw`` holds this rank's local statistics for all N rows; ``owned`` (N, J) marks the target
    ids whose logits this rank computed. Rows that are not valid carry zeros through the
    collectives (their local values may be anything) and are masked by the caller.
    """
    zero = raw.lse.new_zeros(())

    def clean(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else torch.where(row_valid, x, zero)

    local = RawStats(
        raw.tgt_logit, clean(raw.lse), raw.ref_tgt_logit, clean(raw.ref_lse),
        clean(raw.kl), clean(raw.entropy), clean(raw.max_logit), clean(raw.logit_sum),
    )
    return merge_local_stats(local, _AllReduceReducer(resolve_group(group_name)), owned=owned)


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
    backward: bool = True, dtype: torch.dtype = torch.float32, max_logit: bool = False, mean_logit: bool = False,
) -> int:
    """All-reduce payload bytes one rank sends per call (the formula of the module docstring).

    ``backward=True`` adds the ``∂hidden`` all-reduce, which is sent only when ``hidden`` needs a
    gradient.

    ``dtype`` is the inputs' dtype: statistics and ``∂hidden`` travel in the accumulation dtype,
    fp32 for fp32/bf16/fp16 inputs (``c = 4`` bytes) and fp64 for fp64 inputs (``c = 8``).
    """
    c = accum_dtype(dtype).itemsize
    r = int(reference)
    maxima = c * n * (1 + r + int(max_logit))
    sums = c * n * ((1 + r) * (1 + j) + int(kl) + int(entropy) + int(mean_logit))
    forward = 8 * world * (3 + r) + maxima + sums
    return forward + (c * n * d if backward else 0)
