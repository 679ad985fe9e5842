"""Independent float64 oracles for the tests, and the one closeness check they are compared with.

Nothing in this package imports tokpo_kernels. Modules:

* ``logits``: the one float64 logit transform (``logits64``) and log-softmax;
* ``compare``: ``assert_close`` (one meaning: elementwise ``|a − e| ≤ atol + rtol·|e|``) and the
  two ways tests size ``atol`` from the expected tensor;
* ``stats``: ``linear_vocab_stats`` — the oracle, curated input cases, layouts, cotangents;
* ``policy``: TLPO, PPO/GRPO and cross-entropy oracles and ``run_and_compare``;
* ``preference``: TDPO, TI-DPO, DPO and importance-weight oracles, batches and
  ``compare_with_oracle``.

Test files import the family they check (``from oracle import policy as po``); the shared pieces
are re-exported here.
"""

from oracle.compare import assert_close, atol_normwise, atol_scaled, magnitude
from oracle.logits import log_softmax64, logits64, logsumexp64

__all__ = ["assert_close", "atol_normwise", "atol_scaled", "log_softmax64", "logits64", "logsumexp64", "magnitude"]
