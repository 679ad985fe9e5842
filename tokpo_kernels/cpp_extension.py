"""Finding, building and loading the C++ CPU backend (the sources in ``csrc/``).

The extension is never required. It is looked for, in order:

1. a library built at install time (``TOKPO_BUILD_EXT=1 pip install --no-build-isolation .``), kept
   only when it was compiled against the running torch;
2. a just-in-time build with ``torch.utils.cpp_extension`` (ninja and a C++ compiler), cached under
   torch's extension directory (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``) in a
   folder named after a hash of the torch version, the CPU capability it is compiled for, the flags
   and the sources: a new torch, another CPU or edited sources build anew, anything else loads the
   cached library in well under a second.

``$TOKPO_CPP=0`` turns the extension off (``impl="auto"`` then uses ``impl="torch"`` on CPU).
When it cannot be had, ``unavailable_reason()`` says why and how to fix it; ``impl="cpp"`` raises
that reason and ``impl="auto"`` falls back to ``impl="torch"`` with one warning carrying it.
``python -m tokpo_kernels.build`` builds ahead of time and prints where the library is.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
# Where the sources are: inside the package in a wheel (setup.py copies csrc/ to tokpo_kernels/_csrc),
# beside the package in a source checkout or an editable install.
_SOURCE_DIRS = (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc")
_SOURCE_FILES = ("tile_common.h", "forward.cpp", "backward.cpp", "ops.cpp")

# Compiler flags per CPU capability that torch itself dispatches to on this machine
# (torch.backends.cpu.get_cpu_capability()). at::vec picks its vector width from the
# CPU_CAPABILITY_* macro, and the matching -m flags let the compiler emit those instructions;
# a machine with another capability gets another cache folder (the capability is in the hash).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


@dataclass
class BuildResult:
    """The outcome of finding or building the extension: ``library`` (the loaded shared library's
    path) or ``reason`` (why it is unavailable, with the fix), and how it was obtained."""

    library: Optional[Path] = None
    reason: Optional[str] = None
    how: str = ""
    build_info: str = ""


_LOCK = threading.Lock()
_RESULT: Optional[BuildResult] = None


def source_dir() -> Optional[Path]:
    """The folder holding the C++ sources, or ``None`` when neither location has them all."""
    for d in _SOURCE_DIRS:
        if all((d / f).is_file() for f in _SOURCE_FILES):
            return d
    return None


def capability() -> str:
    """The CPU capability the extension is compiled for (torch's own dispatch level here)."""
    cap = torch.backends.cpu.get_cpu_capability()
    # AVX512_BF16, AVX512_VNNI, AMX... compile as AVX512; anything unknown uses the portable code.
    if cap.startswith("AVX512"):
        return "AVX512"
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def compile_flags() -> List[str]:
    """The C++ flags of the build: optimised, OpenMP (at::parallel_for is inlined from the headers, so
    without -fopenmp it would run on one thread; torch's own libgomp is the one loaded at run time),
    the capability's vector flags, and the torch version the library records (unquoted: ninja
    would strip quotes; ops.cpp turns it into a string)."""
    return ["-O3", "-fopenmp", f"-DTOKPO_TORCH_VERSION={torch.__version__}"] + _CAPABILITY_FLAGS.get(capability(), [])


def build_name(src: Path) -> str:
    """The cache folder's name: a hash of torch version, capability, flags and the sources."""
    h = hashlib.sha256()
    for part in (torch.__version__, capability(), " ".join(compile_flags())):
        h.update(part.encode())
    for f in _SOURCE_FILES:
        h.update((src / f).read_bytes())
    return f"tokpo_cpp_{h.hexdigest()[:12]}"


def _compiler_problem() -> Optional[str]:
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (
            f"no C++ compiler found (looked for {cxx!r}, set $CXX to choose one); install one "
            "(e.g. `apt install g++`) to build the C++ CPU backend"
        )
    if not is_ninja_available():
        return "ninja is not installed; `pip install ninja` (a dependency of tokpo_kernels) builds the C++ CPU backend"
    return None


def _prebuilt_library() -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE_DIR / f"_C{suffix}"
        if path.is_file():
            return path
    return None


def _ops_loaded() -> bool:
    """Whether some library already registered the ``tokpo_cpp`` operators in this process."""
    return hasattr(torch.ops.tokpo_cpp, "build_info")


def _record(result: BuildResult) -> BuildResult:
    if result.library is not None:
        result.build_info = str(torch.ops.tokpo_cpp.build_info())
    return result


def _load(verbose: bool) -> BuildResult:
    if os.environ.get("TOKPO_CPP", "1").strip() == "0":
        return BuildResult(reason="the C++ CPU backend is turned off by $TOKPO_CPP=0 (unset it to build and use it)")
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            info = str(torch.ops.tokpo_cpp.build_info())
            if f"torch={torch.__version__};" in info:
                return _record(BuildResult(library=prebuilt, how="built at install"))
            # Compiled against another torch: its operators may not match; build for this one instead.
            # (Its registration stays, so the JIT build below must not register the same names again.)
        except (OSError, RuntimeError):
            pass
        if _ops_loaded():
            return BuildResult(
                reason=f"the C++ library built at install ({prebuilt.name}) was compiled against another torch "
                f"than {torch.__version__}; reinstall tokpo_kernels with TOKPO_BUILD_EXT=1 (or delete {prebuilt})"
            )
    src = source_dir()
    if src is None:
        return BuildResult(reason="the C++ sources (csrc/) are not part of this installation; reinstall tokpo_kernels")
    problem = _compiler_problem()
    if problem is not None:
        return BuildResult(reason=problem)
    from torch.utils.cpp_extension import _get_build_directory, load

    name = build_name(src)
    library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    before = library.stat().st_mtime_ns if library.is_file() else None
    try:
        load(
            name=name,
            sources=[str(src / f) for f in _SOURCE_FILES if f.endswith(".cpp")],
            extra_cflags=compile_flags(),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # the compiler's own message (a build error, a missing header) is the reason
        tail = " | ".join(str(e).strip().splitlines()[-6:])
        return BuildResult(
            reason=f"building the C++ CPU backend failed ({type(e).__name__}: {tail}); run "
            "`python -m tokpo_kernels.build` for the full log"
        )
    # torch rebuilds a cached library whose sources or flags changed; an unchanged file was reused.
    reused = before is not None and library.stat().st_mtime_ns == before
    return _record(BuildResult(library=library, how="loaded from the cache" if reused else "built just in time"))


def load_extension(verbose: bool = False) -> BuildResult:
    """Find or build the extension once per process (thread-safe) and return the outcome."""
    global _RESULT
    with _LOCK:
        if _RESULT is None:
            _RESULT = _load(verbose)
        return _RESULT


def unavailable_reason() -> Optional[str]:
    """``None`` when the C++ CPU backend is loaded (building it first if needed), else why not."""
    return load_extension().reason
