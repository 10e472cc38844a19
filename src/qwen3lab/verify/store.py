"""Where the reference's taps wait for the candidate: in memory, or spilled to disk for large models.

`DiskStore` writes each tap to its own .npy file as the reference run makes it and hands it back
memory-mapped, so verifying a large model holds about one tap at a time instead of all of them; it is
also a read-only Mapping, which is what taps.graft needs for the isolation run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


class MemoryStore(dict):
    def put(self, name: str, arr: np.ndarray) -> None:
        self[name] = arr

    def close(self) -> None:
        self.clear()


class DiskStore(Mapping):
    def __init__(self, where: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="qwen3lab-verify-", dir=where))
        self.files: dict[str, Path] = {}

    def put(self, name: str, arr: np.ndarray) -> None:
        path = self.dir / f"{len(self.files):06d}.npy"
        np.save(path, np.ascontiguousarray(arr))
        self.files[name] = path

    def __getitem__(self, name: str) -> np.ndarray:
        # copy-on-write map: writable (torch.from_numpy in a graft wants that), the file is never changed
        return np.load(self.files[name], mmap_mode="c")

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.files.clear()


class Without(Mapping):
    """A read-only view of a mapping without some keys (taps that must not be grafted)."""

    def __init__(self, base: Mapping, drop: set[str]):
        self.base, self.drop = base, drop

    def __getitem__(self, name: str):
        if name in self.drop:
            raise KeyError(name)
        return self.base[name]

    def get(self, name, default=None):
        return default if name in self.drop or name not in self.base else self.base[name]

    def __iter__(self):
        return (k for k in self.base if k not in self.drop)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name not in self.drop and name in self.base
