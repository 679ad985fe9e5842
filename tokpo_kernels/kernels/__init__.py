"""Triton kernels: the forward statistics kernel and the backward kernel, one launcher each.

``_tl_numerics`` holds the shared ``tl`` helpers (logit tile, transform, online-softmax updates, the
universal gradient ``dz_tile``); ``configs`` holds the block sizes; ``launch`` adapts both kernels to
the backend seam (row compaction, the merge of vocabulary splits, fp32 accumulators).
"""
