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
| liger_distill (beta = 0) | distill_loss | liger_distill.py |
| liger_flce (CUDA) | linear_cross_entropy | liger_flce.py |
| cce, cce_exact (CUDA) | linear_cross_entropy | cut_cross_entropy.py |
"""

import importlib
import pkgutil

# Every module of this package is a peer file: importing it registers its peers.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
