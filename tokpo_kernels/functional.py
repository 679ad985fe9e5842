"""The public functional surface: ``linear_vocab_stats``.

User input is validated here, before any kernel runs (losses check their own arguments first; on
CUDA with ``validate="async"`` and under ``torch.compile`` the target-range check is a device-side
assert, see ``_validation.check_target_range``).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist

from tokpo_kernels._types import ImplParams, VocabStats
from tokpo_kernels._validation import (
    check_flags,
    check_number,
    check_target_range,
    is_integer_dtype,
    validate_vocab_stats_inputs,
)
from tokpo_kernels.backends import backend_entry
from tokpo_kernels.distributed.sharded_weights import resolve_sharded_weights
from tokpo_kernels.distributed.vocab_parallel import vocab_shard
from tokpo_kernels.kernels.chunking import MAX_BUDGET
from tokpo_kernels.numerics import accum_dtype
from tokpo_kernels.ops.vocab_stats import refuse_unsupported_transforms, vocab_stats_2d


def _bias_for(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``bias`` as the backends take it: the weight's dtype, or else ``accum_dtype(weight.dtype)``."""
    if bias is None or weight is None or bias.dtype == weight.dtype:
        return bias
    return bias.to(accum_dtype(weight.dtype))


def linear_vocab_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    kl: bool = False,
    entropy: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    impl: str = "auto",
    filter_eps: Optional[Union[float, str]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
    max_logit: bool = False,
    mean_logit: bool = False,
    validate: str = "async",
    chunk_budget: Optional[float] = None,
) -> VocabStats:
    """Per-token statistics of ``softmax(h Wᵀ + b)`` without materialising the (N, V) logits.

    Logits are ``z = softcap·tanh((h Wᵀ + b)/softcap) / temperature`` (softcap optional), for the
    policy and, with the same transform, for the reference.

    Args:
        hidden: ``(..., D)`` final hidden states of the policy (fp32, bf16 or fp16).
        weight: ``(V, D)`` lm-head weight, same dtype as ``hidden``.
        targets: ``(...)`` token ids, or ``(..., J)`` for several ids per token (padded with
            ``ignore_index``). Hidden position ``t`` predicts ``targets[t]`` (callers shift).
        bias: optional ``(V,)`` lm-head bias, of any float dtype. A bias of the weight's dtype is used
            as given. A bias of another dtype is used at the accumulation precision of the weight's
            dtype (fp32 for fp32/bf16/fp16 heads, fp64 for fp64 ones): cast once to it, so an fp32
            bias beside a bf16 weight keeps its fp32 values (an fp64 bias beside an fp32 weight is
            rounded to fp32). Every backend follows this rule; ``∂bias`` comes back in the bias's
            own dtype.
        ref_hidden, ref_weight, ref_bias: the frozen reference model's ``(..., D_ref)`` hidden states,
            ``(V, D_ref)`` weight and bias (``ref_bias`` follows the rule of ``bias`` with respect to
            ``ref_weight``). They never receive gradient.
        kl: also return ``KL(ref || policy)`` per token (needs a reference).
        entropy: also return the policy entropy per token.
        ignore_index: target id meaning "no target"; tokens whose ids are all ignored are masked
            (statistics 0, no gradient); the fused backends skip them before any matmul.
        temperature: divides the (soft-capped) logits; must be > 0.
        softcap: Gemma-style final-logit soft-capping value; must be > 0 when given.
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``: the device's default Triton
            strategy, chunked on CUDA), ``"triton_chunked"`` / ``"triton_streaming"`` (one strategy;
            ``docs/architecture.md``), ``"torch"`` (chunked PyTorch), ``"naive"`` (full logits; the
            oracle) or ``"auto"`` (triton on CUDA, torch otherwise).
        filter_eps: opt-in approximation of the Triton backward: ``None`` (default, exact), a float,
            or ``"auto"`` (the input dtype's resolution, 2**-7 for bf16). Vocabulary tiles whose
            policy (and reference) probabilities are all below it and that hold no target id get
            zero gradient, so their contribution (below the dtype's resolution relative to the
            row's gradient) is dropped. It no longer saves time (the Triton backward's GEMMs run
            over whole chunks) and is kept for compatibility. The torch and naive implementations
            ignore it (always exact).
        process_group: vocabulary parallelism. ``weight`` (and ``bias``, ``ref_weight``,
            ``ref_bias``) then hold this rank's rows ``[V_r × D]`` of a head split over the group's
            ranks in rank order (any ``V_r ≥ 1``); ``hidden`` and ``targets`` (global ids) must be the
            same on every rank. Each rank streams its shard and the per-token statistics are merged
            with all-reduces of O(N) numbers; the backward all-reduces ``∂hidden``, and ``∂weight``
            is this rank's shard. Bytes: see ``tokpo_kernels.distributed.comm_bytes``. Needs
            ``impl`` ``"torch"`` or ``"triton"``. Passing the whole head on every rank instead of
            a shard would count every row W times (``lse`` too large by ``log W``), and whether
            ``hidden`` needs a gradient must agree across ranks (the backward all-reduce is
            collective). Hidden states and targets that differ between ranks are caught by a
            checksum and raise. DTensor weights (FSDP2, tensor parallel) and
            ZeRO-3 parameters are recognised without it (see
            ``tokpo_kernels.distributed.sharded_weights``).
        max_logit: also return the row maximum of the transformed policy logits (detached: no
            gradient). The target is the argmax when its logit reaches it; recomputed as
            ``logp + lse`` it carries the rounding of ``lse``, so compare with a tolerance:
            ``torch.isclose(stats.logp + stats.lse, stats.max_logit)`` (a token-accuracy metric).
        mean_logit: also return ``Σ_v z_v / V`` of the transformed policy logits (what TRL logs as
            ``logits/chosen``); differentiable, its gradient is ``1/V`` on every logit.
        validate: how an id outside ``[0, V)`` (other than ``ignore_index``) is reported.
            ``"async"`` (default): CPU tensors raise ``ValueError`` before any kernel; CUDA tensors
            are checked by ``torch._assert_async``, which costs no host synchronisation but fails
            as a device-side assert: the call returns, a later synchronising call raises
            ``RuntimeError: CUDA error: device-side assert triggered`` and the process's CUDA
            context is unusable afterwards (restart the process). ``"sync"``: CUDA tensors are
            checked on the host too (one device-to-host copy of three numbers, i.e. one host
            synchronisation per call) and raise ``ValueError`` before any kernel; on CPU it is the
            same as ``"async"``. While ``torch.compile`` traces, both modes compile to the device
            assert (a host read would break the graph). Vocabulary-parallel calls check against the
            global ``V`` after the first collective. Meta tensors hold no ids: nothing is checked.
        chunk_budget: the Triton strategies' vocabulary-chunk buffers as a fraction of the gradient
            buffers (``∂W``, the fp32 ``∂h`` accumulator and ``∂h``): ``None`` (default) reads
            ``$TOKPO_CHUNK_BUDGET``, else 0.10, so peak extra memory stays within about 1.1× the
            gradients. A larger budget means wider chunks (fewer, larger GEMMs); the result does not
            depend on it beyond rounding. Ignored by the other backends (they do not chunk this way).

    Returns:
        ``VocabStats`` with ``logp`` (targets' shape), ``lse`` (token shape), ``ref_logp``,
        ``kl``, ``entropy``, ``max_logit``, ``mean_logit`` (``None`` when not requested) and the
        bool token ``mask``; statistics are fp32 (fp64 for fp64 inputs). ``logp``, ``lse``, ``kl``,
        ``entropy`` and ``mean_logit`` are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
        ``kl`` is clamped at 0 to remove rounding negatives (its gradient is the
        unclamped one).

    Raises:
        TypeError / ValueError: on bad input, naming what was expected and what was received.

    Meta tensors: an all-meta call returns meta statistics of the right shapes and dtypes (and a
    meta backward), reading no data; ``impl="auto"`` resolves as on the CPU, an explicit ``impl``
    is checked for its dtypes only (nothing runs: the custom ops' fake implementations give the
    shapes). Not with ``process_group``.

    ``torch.func``: ``torch.func.grad``, ``vjp`` and ``jacrev`` work on every backend and give
    autograd's gradients (``jacrev`` runs the backward once per output element). ``torch.vmap``
    raises ``ValueError``: the backends compute whole batches already, so pass the batched tensors
    (any leading token shape) directly. Forward-mode AD (``jvp``, ``jacfwd``, ``hessian``) raises
    ``ValueError``; second-order reverse mode (``grad`` of ``grad``) raises ``RuntimeError`` when the
    second derivative is needed, as double backward does under eager autograd.
    """
    if isinstance(targets, torch.Tensor) and targets.dtype != torch.int64 and is_integer_dtype(targets.dtype):
        # Any integer dtype is cast once to the int64 that gathers and the kernels index with, before
        # validating: an unsigned id compared with a negative ignore_index would wrap around.
        targets = targets.long()
    refuse_unsupported_transforms()
    check_flags(kl=kl, entropy=entropy, max_logit=max_logit, mean_logit=mean_logit)
    head, group = resolve_sharded_weights(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, process_group)
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = head
    token_shape, multi, resolved = validate_vocab_stats_inputs(
        hidden, weight, targets, bias, ref_hidden, ref_weight, ref_bias,
        kl, entropy, ignore_index, temperature, softcap, impl, filter_eps, vocab_parallel=group is not None,
        validate=validate,
    )
    # One rule for every backend: a bias of another dtype than its weight enters at the
    # accumulation precision (differentiable: ∂bias is cast back to the bias's dtype by autograd).
    bias = _bias_for(weight, bias)
    ref_bias = _bias_for(ref_weight, ref_bias)
    shard = None
    if group is not None:
        if hidden.device.type == "meta":
            raise ValueError(
                "process_group: meta tensors cannot take part in the vocabulary-parallel collectives; "
                "for shape inference call without process_group on this rank's shard"
            )
        if not backend_entry(resolved).vocab_parallel:
            raise ValueError(
                f"impl={resolved!r} does not support vocabulary parallelism (process_group); "
                "use impl='torch' or 'triton'"
            )
        # First collective. Ranks whose inputs have the same shapes pass the same local checks above
        # (an empty shard, the one rank-local shape, is checked inside on every rank); a rank whose
        # inputs alone are malformed would still leave the others waiting here until the timeout.
        replicated = [("hidden", hidden), ("targets", targets)]
        if ref_hidden is not None:
            replicated.append(("ref_hidden", ref_hidden))
        shard = vocab_shard(weight.shape[0], group, weight.device, replicated)
        check_target_range("targets", targets, shard.total, ignore_index, validate)
    params = ImplParams(
        temperature=float(temperature),
        softcap=None if softcap is None else float(softcap),
        kl=kl,
        entropy=entropy,
        max_logit=max_logit,
        logit_sum=mean_logit,
        filter_eps=filter_eps,
        chunk_budget=None if chunk_budget is None else check_number("chunk_budget", chunk_budget, gt=0, le=MAX_BUDGET),
    )

    dim = hidden.shape[-1]
    n = 1
    for s in token_shape:
        n *= s
    t2 = targets.reshape(n, targets.shape[-1]) if multi else targets.reshape(n, 1)
    rh2 = None if ref_hidden is None else ref_hidden.reshape(n, ref_hidden.shape[-1])
    logp, lse, ref_logp, kl_t, ent, max_t, mean_t = vocab_stats_2d(
        hidden.reshape(n, dim), weight, t2, bias, rh2, ref_weight, ref_bias if ref_hidden is not None else None,
        params, resolved, shard, ignore_index=ignore_index,
    )
    tshape = tuple(targets.shape)
    mask = (t2 != ignore_index).any(-1).reshape(token_shape)
    return VocabStats(
        logp=logp.reshape(tshape),
        lse=lse.reshape(token_shape),
        ref_logp=None if ref_logp is None else ref_logp.reshape(tshape),
        kl=None if kl_t is None else kl_t.reshape(token_shape),
        entropy=None if ent is None else ent.reshape(token_shape),
        mask=mask,
        max_logit=None if max_t is None else max_t.reshape(token_shape),
        mean_logit=None if mean_t is None else mean_t.reshape(token_shape),
    )
