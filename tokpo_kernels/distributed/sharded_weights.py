"""Sharded lm-head weights: DTensors (FSDP2, tensor parallel) and DeepSpeed ZeRO-3 parameters.

What each layout means for ``linear_vocab_stats`` and what is done with it:

* Plain tensors, no ``process_group``: the whole head; nothing to do. (Under FSDP2 this is the
  case for a head owned by the root module: after the root's forward its parameters stay
  unsharded, and FSDP2 reduce-scatters their gradients itself.)
* Plain tensors with ``process_group``: this rank's rows of a vocabulary split (tensor parallel);
  statistics are merged across the group (``vocab_parallel``).
* A DTensor sharded on dim 0 over a 1-D mesh with a *plain* ``hidden`` (FSDP2: every rank has its
  own tokens; e.g. a head wrapped in its own ``fully_shard`` unit, resharded after forward): the
  weight is gathered for the call, ``full_tensor(grad_placements=[Partial("avg")])``, so its gradient
  is reduce-scattered and averaged over the mesh exactly as FSDP2 does by default. This reading
  is an assumption about the layout: a head sharded this way for another purpose (or FSDP2 with a
  custom gradient divide factor) would need its own gather; pass plain tensors then.
* A DTensor sharded on dim 0 with ``hidden`` a DTensor replicated on the same mesh (tensor
  parallel): the local shard is used directly, vocabulary-parallel over the mesh's group. Results
  are plain tensors, the same on every rank.
* Any other DTensor layout (2-D meshes, sharding on D, Partial, a replicated weight) raises with
  what to do instead: guessing how gradients should be reduced could give a silently wrong one.
* The reference head follows the policy's mode. Tensor parallel: it must be split the same way
  (a Shard(0) DTensor on the same mesh). Otherwise it needs no gradient, so a DTensor reference of
  any layout is gathered with ``full_tensor()`` and a plain one is the whole head (a frozen
  reference model need not be wrapped like the policy).
* A ZeRO-3 parameter must be gathered (``ds_status`` AVAILABLE), as it is inside the forward of
  its module; a partitioned one (an empty placeholder) raises with what to do.
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from tokpo_kernels._types import HeadTensors


class ResolvedWeights(NamedTuple):
    """Plain tensors for the single-device implementations, plus the vocabulary-parallel group.

    ``tensors`` holds both heads (``None`` where absent)."""

    tensors: HeadTensors
    group: Optional[dist.ProcessGroup]


def _is_dtensor(t: object) -> bool:
    # No DTensor can exist unless its module was imported: avoid importing it ourselves.
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_zero3_gathered(name: str, t: object) -> None:
    """A DeepSpeed ZeRO-3 parameter outside its module's forward is an empty placeholder."""
    if t is None or not hasattr(t, "ds_id"):
        return
    status = getattr(t, "ds_status", None)
    if getattr(status, "name", str(status)) != "AVAILABLE":
        full_shape = tuple(getattr(t, "ds_shape", ()))
        raise ValueError(
            f"{name}: expected a gathered DeepSpeed ZeRO-3 parameter (ds_status AVAILABLE), got one that is "
            f"partitioned (ds_status={getattr(status, 'name', status)}, full shape {full_shape}). "
            "Call the loss inside the forward of the module that owns the lm-head (ZeRO-3 gathers its parameters "
            "there and re-gathers them for backward), or register the parameter as used by that module with "
            "deepspeed.zero.register_external_parameter."
        )


def _layout_error(name: str, t, why: str) -> ValueError:
    return ValueError(
        f"{name}: unsupported DTensor layout (mesh shape {tuple(t.device_mesh.shape)}, placements "
        f"{tuple(t.placements)}): {why}. Supported: Shard(0) on a 1-D mesh (FSDP2 or a vocabulary split). "
        "Otherwise pass plain tensors: the gathered weight (t.full_tensor()) or this rank's vocabulary rows "
        "with process_group=..."
    )


def check_shard0_on_1d_mesh(name: str, t) -> None:
    """The only DTensor layout handled: sharded over the vocabulary (dim 0) on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1:
        raise _layout_error(name, t, "only 1-D device meshes are supported")
    (placement,) = t.placements
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise _layout_error(name, t, "only sharding over the vocabulary (Shard(0)) is supported")


def _replicated_on(t, mesh) -> bool:
    from torch.distributed.tensor import Replicate

    return t.device_mesh == mesh and all(isinstance(p, Replicate) for p in t.placements)


def gather_data_parallel(t):
    """The whole tensor of a DTensor parameter sharded for data parallelism (FSDP2).

    Its gradient is reduce-scattered back and averaged over the mesh, as FSDP2 does with the
    gradients it reduces itself. (A bare ``full_tensor()`` would hand each rank only the gradient
    of its own tokens: its backward just slices the replicated gradient.)
    """
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")])


def _gathered_reference(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A reference weight or bias as a plain whole tensor: it never receives a gradient, so any
    DTensor layout may simply be gathered (``full_tensor``); a plain tensor is the whole head."""
    if t is None or not _is_dtensor(t):
        return t
    return t.detach().full_tensor()


def _check_fsdp_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Checked before gathering, with the hint the generic dtype check cannot give."""
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: the FSDP2-sharded head is gathered in its stored dtype ({weight.dtype}), but hidden is "
            f"{hidden.dtype}. FSDP2's MixedPrecisionPolicy casts parameters only inside the module's forward; "
            "pass weight.to(hidden.dtype) (the cast is differentiable: the gradient still reaches the sharded "
            "parameter), or call the loss where FSDP2 has unsharded the head"
        )


def resolve_sharded_weights(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    process_group: Optional[dist.ProcessGroup],
) -> ResolvedWeights:
    """Turn sharded parameters into plain tensors plus, when vocabulary-parallel, the group to use.

    The policy head (``weight``, ``bias``) decides the mode. The reference head is resolved to
    match it: under tensor parallelism it must be split the same way; otherwise a DTensor
    reference is gathered (it needs no gradient) and a plain one is taken as the whole head, so a
    frozen reference model need not be wrapped like the policy.
    """
    for name, t in (("weight", weight), ("bias", bias), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        check_zero3_gathered(name, t)
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    policy = {"weight": weight, "bias": bias}
    reference = {"ref_weight": ref_weight, "ref_bias": ref_bias}
    policy_sharded = any(_is_dtensor(t) for t in policy.values())
    reference_sharded = any(_is_dtensor(t) for t in reference.values())
    if (policy_sharded or reference_sharded) and process_group is not None:
        raise ValueError(
            "process_group: a DTensor weight carries its own device mesh; pass either DTensor weights or "
            "this rank's shard as a plain tensor with process_group, not both"
        )

    if not policy_sharded:
        if _is_dtensor(hidden) or _is_dtensor(ref_hidden):
            raise ValueError(
                "hidden: got a DTensor with plain-tensor weights; pass hidden.to_local() (vocabulary-parallel "
                "with process_group=...) or DTensor weights on the same mesh"
            )
        head = HeadTensors(hidden, weight, bias, ref_hidden, _gathered_reference(ref_weight),
                           _gathered_reference(ref_bias))
        return ResolvedWeights(head, process_group)

    for name, t in policy.items():
        if t is not None and not _is_dtensor(t):
            raise ValueError(
                f"{name}: expected a DTensor like weight (on the same mesh), got a plain tensor; shard both "
                "or pass both gathered"
            )
        if t is not None:
            check_shard0_on_1d_mesh(name, t)
    mesh = weight.device_mesh
    if bias is not None and bias.device_mesh != mesh:
        raise ValueError("bias: expected the same device mesh as weight, got a different one")

    if _is_dtensor(hidden):
        # Tensor parallel: every rank holds the same tokens, so the vocabulary shard is used in place,
        # and the reference must be split over the vocabulary the same way.
        for name, t in reference.items():
            if t is None:
                continue
            if not _is_dtensor(t):
                raise ValueError(
                    f"{name}: with a vocabulary-sharded DTensor weight and a replicated DTensor hidden (tensor "
                    "parallel), expected the reference head sharded the same way, got a plain tensor; pass "
                    f"distribute_tensor({name}, weight.device_mesh, [Shard(0)])"
                )
            check_shard0_on_1d_mesh(name, t)
            if t.device_mesh != mesh:
                raise ValueError(f"{name}: expected the same device mesh as weight, got a different one")
        for name, h in (("hidden", hidden), ("ref_hidden", ref_hidden)):
            if h is not None and not (_is_dtensor(h) and _replicated_on(h, mesh)):
                raise ValueError(
                    f"{name}: with a vocabulary-sharded DTensor weight and a DTensor hidden, expected hidden "
                    "replicated (Replicate()) on the weight's mesh"
                )
        plain = HeadTensors(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        return ResolvedWeights(HeadTensors(*(None if t is None else t.to_local() for t in plain)), mesh.get_group())
    if _is_dtensor(ref_hidden):
        raise ValueError("ref_hidden: expected a plain tensor like hidden, got a DTensor")
    # FSDP2: each rank has its own tokens; gather the head for this call.
    _check_fsdp_dtype(hidden, weight)
    head = HeadTensors(hidden, gather_data_parallel(weight), None if bias is None else gather_data_parallel(bias),
                       ref_hidden, _gathered_reference(ref_weight), _gathered_reference(ref_bias))
    return ResolvedWeights(head, None)
