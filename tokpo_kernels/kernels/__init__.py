"""Triton kernels: the forward statistics kernel and the backward kernel, one launcher each.

``_tl_numerics`` holds the shared ``tl`` helpers (logit tile, transform, online-softmax updates);
``configs`` holds the block sizes; ``launch`` adapts both kernels to the implementation interface
used by ``ops`` (row compaction, split combine, fp32 accumulators).
"""
