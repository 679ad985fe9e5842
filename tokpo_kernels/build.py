"""``python -m tokpo_kernels.build``: build (or find) the C++ CPU backend now and say where it is.

Prints the library's path, how it was obtained (built at install, built just in time, or found in
the cache), what it was compiled for, and the seconds it took; exits 1 with the reason and the fix
when it cannot be built. ``--verbose`` shows the compiler's output.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokpo_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = parser.parse_args(argv)

    from tokpo_kernels import cpp_extension

    start = time.perf_counter()
    result = cpp_extension.load_extension(verbose=args.verbose)
    seconds = time.perf_counter() - start
    if result.library is None:
        print(f"tokpo_kernels: the C++ CPU backend is unavailable: {result.reason}", file=sys.stderr)
        return 1
    print(f"tokpo_kernels C++ CPU backend: {result.library}")
    print(f"  {result.how} in {seconds:.1f} s; capability {cpp_extension.capability()}; {result.build_info}")
    print("  impl='cpp' (and impl='auto' on CPU) now uses it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
