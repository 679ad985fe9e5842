"""Peer implementations (other libraries computing the same quantity), one file each.

A peer file calls ``bench.registry.register_impl(op_name, Impl(name, build, requires=("pkg",)))``
for every operation it can compute (Liger-Kernel's fused linear CE / chunked DPO, PyTorch's
``F.linear_cross_entropy``, Cut Cross-Entropy). ``requires`` names the importable module: when it
is missing the table shows "not installed: <module>" instead of dropping the row. Import the file
below. None is registered yet: the only operations so far are this library's statistics, which no
peer computes (a peer is compared only where it computes the same quantity).
"""
