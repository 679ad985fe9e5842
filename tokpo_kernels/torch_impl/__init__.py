"""``impl="torch"``: chunked pure-PyTorch forward/backward (the CPU path and non-CUDA fallback)."""

from tokpo_kernels.torch_impl.chunked import chunked_backward, chunked_forward

__all__ = ["chunked_backward", "chunked_forward"]
