"""Packaging of the parts pyproject.toml cannot describe: the C++ sources and the optional install-time build.

* The C++ sources in ``csrc/`` ship inside the package as ``tokpo_kernels/_csrc`` so that an installed
  copy can build the extension just in time (``tokpo_kernels/cpp_extension.py``).
* ``TOKPO_BUILD_EXT=1`` builds the extension now, as ``tokpo_kernels/_C*.so``, with the same flags as
  the just-in-time build. It compiles against the torch of the build environment, so pass
  ``--no-build-isolation`` (the torch you run must be the torch you compile against):
  ``TOKPO_BUILD_EXT=1 pip install --no-build-isolation .``. A plain ``pip install`` never needs a
  compiler.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _extension_args() -> dict:
    if os.environ.get("TOKPO_BUILD_EXT", "0").strip() != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(
            "TOKPO_BUILD_EXT=1 compiles against the installed torch, which this build environment cannot import; "
            "install torch first and run `TOKPO_BUILD_EXT=1 pip install --no-build-isolation .`"
        )
    # The flags come from the module the just-in-time build uses, loaded by path: importing the
    # package itself would import triton and everything else it needs at run time.
    spec = importlib.util.spec_from_file_location("_tokpo_cpp_flags", ROOT / "tokpo_kernels" / "cpp_extension.py")
    flags = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = flags  # its dataclass looks its module up there
    spec.loader.exec_module(flags)
    sources = [f"csrc/{f}" for f in flags._SOURCE_FILES if f.endswith(".cpp")]
    ext = CppExtension(
        "tokpo_kernels._C", sources, extra_compile_args=flags.compile_flags(), extra_link_args=["-fopenmp"]
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    packages=find_packages(include=["tokpo_kernels*"]) + ["tokpo_kernels._csrc"],
    package_dir={"tokpo_kernels._csrc": "csrc"},
    package_data={"tokpo_kernels._csrc": ["*.cpp", "*.h"]},
    **_extension_args(),
)
