"""Paths a user gives: checked as paths (check_path), and a checkpoint directory resolved (resolve_model_path:
None or "default" is the embedded default model, made on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from .checks import shorten
from .errors import InputError, Qwen3LabError


def check_path(path, name: str = "path") -> Path:
    """A str or os.PathLike naming a file system path; bytes, ints, lists (what os.fspath would take or
    choke on) are refused with the argument's name, and so is a NUL character (no path can hold one)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{name} must be a str or os.PathLike path, got {shorten(path)} ({type(path).__name__})")
    p = os.fspath(path)
    if not isinstance(p, str):  # a PathLike whose __fspath__ returns bytes
        raise InputError(f"{name} must be a str path, got a PathLike giving {type(p).__name__} {shorten(p)}")
    if not p:
        raise InputError(f"{name} is empty: give a directory or file path")
    if "\0" in p:
        raise InputError(f"{name} {shorten(p)} holds a NUL character: not a valid path")
    return Path(p)


def resolve_model_path(path: str | Path | None, name: str = "path") -> Path:
    """A checkpoint dir; None or "default" means the embedded default model (made on first use)."""
    p = None if path is None else check_path(path, name)
    if p is None or str(p) == "default":
        from .make_model import ensure_default_model  # make_model pulls in torch: keep `import qwen3lab` light

        return ensure_default_model()
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:  # e.g. ENAMETOOLONG, which Path.exists does not swallow
        raise Qwen3LabError(f"{name} {shorten(str(p))}: cannot use as a checkpoint directory ({e.strerror})") from None
    if not exists:
        raise Qwen3LabError(f"{p}: no such checkpoint directory")
    if not is_dir:
        raise Qwen3LabError(f"{p}: expected a checkpoint directory (config.json + *.safetensors), got a file")
    return p
