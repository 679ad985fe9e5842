"""Scale-out: vocabulary-parallel statistics over ``torch.distributed`` and sharded lm-head weights."""

from tokpo_kernels.distributed.vocab_parallel import comm_bytes

__all__ = ["comm_bytes"]
