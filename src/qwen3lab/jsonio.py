"""Reading a file a user hands us, safely, with one clear error per failure in the caller's error type.

Every reader of user files goes through here (or through `check_regular_file` before handing a path to a
library that opens it itself: safetensors, numpy, tokenizers), so that:
- only regular files are opened: a FIFO would block forever, /dev/zero would fill memory, a directory or
  socket gives an OSError. stat() comes first because open() itself blocks on a FIFO; the file is then
  opened non-blocking and fstat()ed again, so a path swapped for a FIFO in between cannot hang us either;
- files over a size limit (per kind of file, in LIMITS) are refused before they are read;
- JSON that is deeply nested (RecursionError), holds integers of thousands of digits (Python's
  int-max-str-digits ValueError) or exhausts memory becomes the caller's error naming the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

_MiB = 2**20

# The most bytes each kind of file may have; generous for any real checkpoint (config.json ~1 KB,
# tokenizer_config.json ~10 KB, the index of a 235B MoE ~10 MB, tokenizer.json 11 MB for Qwen3, ~35 MB for
# the largest vocabularies), small enough that a wrong or hostile file is refused before it is read (parsed
# JSON takes several times its size in memory).
LIMITS = {
    "config": 4 * _MiB,  # config.json, generation_config.json, tokenizer_config.json
    "index": 64 * _MiB,  # model.safetensors.index.json
    "tokenizer": 128 * _MiB,  # tokenizer.json
    "tiny_weights": 96 * _MiB,  # `tiny --weights` JSON: at most 2M parameters (tiny.config), ~25 bytes each
    "dump_metadata": 16 * _MiB,  # one JSON value in a dump's metadata (input_ids of a 1M-token prompt ~8 MB)
}

_KINDS = [
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe), which could block forever"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", _MiB), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _check_mode(path, mode: int, size: int, error: type[Exception], what: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise error(f"{path}: {what} is {kind}; only regular files are read")
    if max_bytes is not None and size > max_bytes:
        raise error(f"{path}: {what} is {_size(size)}, over the {_size(max_bytes)} limit for it; refusing to read it")


def check_regular_file(path, error: type[Exception], what: str = "file", max_bytes: int | None = None) -> int:
    """Size in bytes of `path` if it is a regular file (symlinks followed) of at most max_bytes; else `error`
    naming the file: missing, unreadable, a directory, FIFO, device or socket, or too big. Never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise error(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    _check_mode(path, st.st_mode, st.st_size, error, what, max_bytes)
    return st.st_size


def read_bytes(path, error: type[Exception], what: str = "file", max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file of at most max_bytes (checked before and while reading)."""
    check_regular_file(path, error, what, max_bytes)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, open returns instead of blocking
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        _check_mode(path, st.st_mode, st.st_size, error, what, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except MemoryError:
        raise error(f"{path}: {what} is too large to read into memory") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # it grew since the stat
        raise error(f"{path}: {what} is over the {_size(max_bytes)} limit for it; refusing to read it")
    return data


def read_text(path, error: type[Exception], what: str = "file", max_bytes: int | None = None) -> str:
    """UTF-8 text of a regular file of at most max_bytes."""
    data = read_bytes(path, error, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def loads_json(text: str, error: type[Exception], what: str, max_chars: int | None = None) -> Any:
    """Parsed JSON of `text` (JSON embedded in another file, e.g. dump metadata); `what` names it in errors,
    e.g. "model.safetensors: metadata 'input_ids'"."""
    if not isinstance(text, str):
        raise error(f"{what}: expected JSON text, got {type(text).__name__}")
    if max_chars is not None and len(text) > max_chars:
        raise error(f"{what}: {len(text)} characters of JSON, over the limit of {max_chars}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply to read") from None
    except ValueError as e:  # integers past sys.get_int_max_str_digits()
        raise error(f"{what}: unreadable JSON value ({str(e).split(';')[0]})") from None
    except MemoryError:
        raise error(f"{what}: JSON too large to parse in memory") from None


def read_json(path: Path, error: type[Exception], what: str = "JSON", max_bytes: int | None = LIMITS["config"]) -> Any:
    """Parsed JSON of a regular file of at most max_bytes (default: the config limit); everything that can
    go wrong (not a regular file, too big, unreadable, not UTF-8, malformed, nested too deeply, integers too
    long) raises `error` naming the file (and line/column for syntax errors)."""
    text = read_text(path, error, what, max_bytes)
    return loads_json(text, error, str(path))
