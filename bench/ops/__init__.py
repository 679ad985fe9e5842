"""Benchmarked operations, one file each; importing this package registers all of them.

To add one: write ``bench/ops/<name>.py`` with ``make_inputs(shape, dtype, device) -> Batch``
(usually ``bench.ops._common.head_batch`` plus what the loss needs) and ``call(batch, impl)``
(one forward of the library function), register both with
``bench.ops._common.register_library_operation`` and a FLOP model from ``bench.flops``. The tiers
of ``bench/tiers.py`` run every registered operation.
"""

import importlib
import pkgutil

# Every module of this package but the private helpers is an operation: importing it registers it,
# so a new operation is a new file here and nothing else.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
