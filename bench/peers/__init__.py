"""Peer implementations (other libraries computing the same quantity), one file each.

A peer file calls ``bench.ops._common.register_peer(op_name, name, make_forward, requires=(...),
devices=(...), note=...)`` for every operation it computes *exactly* (same loss, same
hyperparameters, same inputs: the forward is built on the operation's own ``make_inputs``).
``requires`` names the importable module: when it is missing the row reads "not installed:
<module>"; ``devices`` limits where it runs (its other rows read "unavailable: needs CUDA ...").
bench/test_peer_agreement.py checks every peer that runs here against the naive impl.

| peer | operation | file |
|---|---|---|
| tdpo_reference_code | tdpo_loss | tdpo_reference_code.py |
| torch_lce, torch_lce_chunked | linear_cross_entropy | torch_lce.py |
| liger_dpo | dpo_loss | liger_dpo.py |
| liger_grpo | ppo_loss | liger_grpo.py |
| liger_jsd (beta = 0) | forward_kl | liger_jsd.py |
| liger_flce (CUDA) | linear_cross_entropy | liger_flce.py |
| cce, cce_exact (CUDA) | linear_cross_entropy | cut_cross_entropy.py |
"""

from bench.peers import (  # noqa: F401
    cut_cross_entropy,
    liger_dpo,
    liger_flce,
    liger_grpo,
    liger_jsd,
    tdpo_reference_code,
    torch_lce,
)
