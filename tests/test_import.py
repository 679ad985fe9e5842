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


LATE_INTERPRETER = r"""
import os, sys
import torch
import tokpo_kernels as tk
assert "triton" not in sys.modules, "import tokpo_kernels imported triton"
# Set only after the import: Triton fixes interpreter mode for its standard library when it is
# itself first imported, which must therefore not happen at `import tokpo_kernels`.
os.environ["TRITON_INTERPRET"] = "1"
h = torch.randn(5, 8, requires_grad=True)
w = torch.randn(40, 8, requires_grad=True)
y = torch.randint(0, 40, (5,))
s = tk.linear_vocab_stats(h, w, y, impl="triton")
n = tk.linear_vocab_stats(h, w, y, impl="naive")
assert torch.allclose(s.logp, n.logp, atol=1e-5), (s.logp, n.logp)
s.logp.sum().backward()
print("ok")
"""


def test_triton_interpreter_may_be_enabled_after_import() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", LATE_INTERPRETER], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
