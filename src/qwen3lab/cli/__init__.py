"""The `qwen3lab` command (entry point `qwen3lab.cli:main`). Its top-level docstring is `main`'s help:

Every user-facing error is a Qwen3LabError; each command prints it as one line naming the file, tensor,
field or value and exits 2, instead of a traceback.
"""

from . import run, tools  # noqa: F401  (importing them registers their commands on main)
from .main import main

__all__ = ["main"]
