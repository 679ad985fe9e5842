"""Kept for the optional C++ CPU extension (csrc/), which a later issue adds.

No compiled code is built today: all metadata lives in pyproject.toml, and the extension will be
built only when ``TOKPO_BUILD_EXT=1`` is set, so a plain ``pip install`` never needs a compiler.
"""

from setuptools import setup

setup()
