"""Benchmarks of tokpo_kernels (DESIGN.md "Benchmarks").

Two front ends over one registry of cases:

* ``python -m bench [--quick | --tier cpu|core|sweep]`` runs every (case, impl) in fresh
  processes, prints a Markdown table (time, peak memory, TFLOP/s, ratios to the naive baseline)
  and writes ``<out>/<device>-<date>.json`` and a ``.png`` plot beside it.
* ``pytest bench/ --tier cpu`` runs the same cases under pytest-benchmark (time only, in-process).

Layout: ``registry.py`` (Operation / Impl / Case), ``tiers.py`` (which cases each tier runs),
``inputs.py`` (realistic lm-head inputs), ``ops/`` (one file per benchmarked operation),
``peers/`` (one file per other library), ``_worker.py`` (one measurement in a subprocess),
``runner.py`` (spawning, quantiles), ``report.py`` (table, JSON, plot), ``env.py`` (versions, commit).
"""
