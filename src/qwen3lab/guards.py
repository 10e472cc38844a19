"""Checks a command makes before its work starts, and the one way it writes a file.

- `check_output_file` / `check_output_dir`: an output path (`--output`, `--html`, `--save-*`, `--json`,
  `--plot`) is refused before anything runs when it cannot be written: its directory is missing or not a
  directory, the path is a directory (or a file, for a directory output), nothing may be written there, or
  the extension is not one its writer supports. An hour-long verify must not fail at its last line.
- `write_atomic`: the file is written beside the target under a temporary name and renamed into place only
  when complete, so a failed or interrupted write leaves the old file byte-identical.
- `check_memory`: a command that would allocate more than this machine has available is refused with both
  figures, instead of swapping for minutes or dying in the allocator.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import InputError


def _shown(path) -> str:
    """A path for a message, shortened when a careless or hostile value is huge."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:120]}...{text[-60:]} ({len(text)} characters)"


def _check_parent(path: Path, option: str, shown: Path | None = None) -> None:
    parent = path.parent
    path = shown if shown is not None else path
    if not parent.exists():
        raise InputError(f"{option} {_shown(path)}: directory {_shown(parent)} does not exist")
    if not parent.is_dir():
        raise InputError(f"{option} {_shown(path)}: {_shown(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {_shown(path)}: directory {_shown(parent)} is not writable")


def check_output_file(path, option: str, suffixes: Iterable[str] | None = None) -> Path:
    """`path` as a Path once it is known to be writable as a file; suffixes: the extensions its writer supports
    (lower case, with the dot), None for any."""
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise InputError(f"{option}: expected a file path, got {type(path).__name__}") from None
    if str(p) in ("", "."):
        raise InputError(f"{option}: empty path")
    if "\x00" in str(p):
        raise InputError(f"{option} {_shown(path)!r}: a path cannot contain a NUL character")
    if p.is_dir():
        raise InputError(f"{option} {_shown(p)}: is a directory (expected a file path)")
    _check_parent(p, option)
    if p.exists() and not p.is_file():  # a FIFO or a device: renaming over it would replace the node itself
        raise InputError(f"{option} {_shown(p)}: exists and is not a regular file")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{option} {_shown(p)}: the file exists and is not writable")
    if suffixes is not None:
        allowed = sorted(set(suffixes))
        if p.suffix.lower() not in allowed:
            raise InputError(f"{option} {_shown(p)}: unsupported extension {p.suffix or '(none)'!r}; "
                             f"use one of {', '.join(allowed)}")
    return p


def check_output_dir(path, option: str, parents: bool = False) -> Path:
    """`path` as a Path once it is known to be creatable (or writable) as a directory; parents=True: missing
    parent directories will be made too (the nearest existing one must be a writable directory)."""
    p = Path(os.fspath(path))
    if str(p) == "" or "\x00" in str(p):
        raise InputError(f"{option}: {'empty path' if not str(p) else 'a path cannot contain a NUL character'}")
    if p.exists() and not p.is_dir():
        raise InputError(f"{option} {_shown(p)}: exists and is not a directory")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise InputError(f"{option} {_shown(p)}: directory is not writable")
        return p
    if parents:
        base = p.parent
        while not base.exists() and not base.is_symlink() and base != base.parent:
            base = base.parent
        _check_parent(base / "x", option, shown=p)
        return p
    _check_parent(p, option)
    return p


def write_atomic(path, write: Callable[[Path], object], option: str = "") -> Path:
    """Call write(tmp) for a temporary path beside `path` (same extension, so writers that go by it choose the
    same format), then rename it to `path`. On any failure the temporary file goes and `path` is untouched."""
    p = Path(os.path.realpath(path))  # through a symlink: the file it points to is replaced, not the link
    fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name[:100]}.", suffix=".tmp" + p.suffix, dir=p.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _default_mode(tmp)
        os.replace(tmp, p)
    except OSError as e:
        raise InputError(f"{option + ' ' if option else ''}{_shown(p)}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def write_text_atomic(path, text: str, option: str = "") -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), option)


def _default_mode(path: Path) -> None:
    """mkstemp makes files 0600; a written report should get the mode a plain open() would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---- memory ----------------------------------------------------------------------------------------
def available_bytes() -> int | None:
    """Memory a new allocation can get without swapping: psutil's figure, else /proc/meminfo MemAvailable,
    else None (unknown: nothing is refused)."""
    try:
        import psutil  # optional dependency: used when installed, else /proc/meminfo below

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return proc_kb("/proc/meminfo", "MemAvailable")


def proc_kb(path: str, key: str) -> int | None:
    """Bytes of a `Key:  N kB` line of a Linux /proc file (meminfo, self/status), None where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m[1]) * 1024 if m else None


def size_text(n: float) -> str:
    """Bytes as a person reads them: 470 GB, 1.2 GB, 35 MB (past 1000 TB: 6.4e+26 bytes)."""
    if n >= 1e15:
        return f"{n:.1e} bytes"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 10 else f"{v:,.0f} {unit}"
    return f"{int(n)} B"


def check_memory(need: int, what: str, available: int | None = None) -> None:
    """Refuse `what` (the option and value that decide the size, e.g. "--preset qwen3-235b-a22b") when it needs
    more memory than is available."""
    have = available_bytes() if available is None else available
    if have is not None and need > have:
        raise InputError(f"{what}: needs ~{size_text(need)} of memory, this machine has {size_text(have)} "
                         f"available")


def check_disk(need: int, directory, what: str) -> None:
    """Refuse `what` when `directory`'s filesystem has less free space than it would write."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return
    if need > free:
        raise InputError(f"{what}: writes ~{size_text(need)}, the filesystem of {_shown(d)} has {size_text(free)} "
                         f"free")
