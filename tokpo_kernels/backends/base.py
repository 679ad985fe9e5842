"""The contract of one implementation of the two passes behind ``linear_vocab_stats``.

A backend sees flattened, validated tensors and computes *local* statistics over the vocabulary
rows it is given (the whole head, or this rank's shard of it); the custom ops in
``tokpo_kernels.ops`` own everything else: autograd, masking of ignored rows, the
vocabulary-parallel merge and collectives, ``torch.compile`` support. So a backend needs no autograd
of its own, no fake implementation and no knowledge of process groups.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tokpo_kernels._types import BackwardInputs, HeadGrads, HeadTensors, ImplParams, RawStats, TargetRows


@runtime_checkable
class Backend(Protocol):
    """One implementation of the forward statistics and the backward of ``linear_vocab_stats``."""

    def forward(self, head: HeadTensors, targets: TargetRows, params: ImplParams) -> RawStats:
        """Per-row statistics of ``softmax(z)``, ``z`` the transformed logits of ``head``.

        Returns ``lse``, the target logits at owned ids, and whatever ``params`` asks for
        (reference ``lse`` and target logits whenever a reference is given; ``kl``, ``entropy``,
        ``max_logit``, ``logit_sum``). Rows that are not ``targets.row_valid`` may hold anything.
        """
        ...

    def backward(self, inputs: BackwardInputs) -> HeadGrads:
        """Input gradients from per-row cotangents by the universal gradient of ``docs/methods.md`` §1::

            ∂L/∂z = (g_lse + g_kl)·p − g_kl·q + Σ_j g_j·e_{y_j} − g_H·p ⊙ (ℓ + H) + g_Σ·1

        then through the logit transform to the raw logits and the projection. ``inputs.saved``
        holds the *global* ``lse`` / ``ref_lse`` / entropy (after any vocabulary-parallel merge).
        Gradients are returned in the accumulation dtype; ``None`` where ``inputs.needs`` says no.
        """
        ...
