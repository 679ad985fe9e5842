"""``import tokpo_kernels`` must stay light: no transformers/trl, no CUDA initialisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CODE = r"""
import json, sys
import tokpo_kernels, torch
print(json.dumps({
    "transformers": any(m == "transformers" or m.startswith("transformers.") for m in sys.modules),
    "trl": any(m == "trl" or m.startswith("trl.") for m in sys.modules),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""


def test_import_does_not_import_transformers() -> None:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["transformers"], "import tokpo_kernels imported transformers"
    assert not got["trl"], "import tokpo_kernels imported trl"
    assert not got["cuda_initialized"], "import tokpo_kernels initialised CUDA"
