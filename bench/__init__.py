"""Benchmarks of tokpo_kernels against its peers (``bench/README.md``).

Front ends over one registry of operations, implementations and cases:

* ``python -m bench [--quick | --tier cpu|core|sweep]`` runs every (case, impl) in fresh
  processes, prints a Markdown table (time, peak memory, TFLOP/s, ratios to the naive baseline)
  and writes ``<out>/<device>-<date>-<tier>.json`` and a ``.png`` plot beside it.
* ``pytest bench/ --tier cpu`` runs the same cases under pytest-benchmark (time only, in-process),
  the interpreted-Triton smoke cases, and checks every peer computes what naive computes.
* ``python -m bench.readme <json>...`` regenerates the README's performance table from results.

Layout: ``registry.py`` (Shape / Impl / Operation / Case), ``flops.py`` (the FLOP model),
``inputs.py`` (realistic lm-head inputs), ``ops/`` (one file per benchmarked operation, shared
builder in ``ops/_common.py``), ``peers/`` (one file per other library), ``tiers.py`` (cases and
acceptance checks), ``_worker.py`` (one measurement in a subprocess), ``runner.py`` (spawning,
quantiles), ``report.py`` (table, notes, JSON, plot), ``readme.py``, ``env.py`` (versions, commit).
"""
