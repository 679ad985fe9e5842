"""The Triton strategies (``docs/architecture.md``, "Kernels").

Kernels: ``forward_stats`` (the streaming forward), ``row_stats`` (the chunked forward's row pass),
``target_logits`` (the gathered target logits of both), ``dz_chunk`` (the backward's ∂z, by recompute
or from GEMM-computed logits), with the shared ``tl`` helpers in ``_tl_numerics``. Host side:
``backward_chunks`` (∂z chunks + GEMMs, no atomics), ``gemm`` (fp32-output GEMMs), ``chunking`` (chunk
widths from a memory budget; pure Python), ``strategy`` (the default per device), ``configs`` (block
sizes) and ``launch`` (the backend functions: compaction, buffers, launches).
"""
