"""Running the bug zoo (bugzoo.py plants the bugs): the reference and candidates on shared tiny dense and MoE
checkpoints, one fresh candidate per bug, and whether verify named the planted op (`qwen3lab verify
--self-test`, tests/test_verify_bugzoo.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Qwen3Config
from ..make_model import make_model
from ..models import torch_model as tm
from ..models.numpy_ref import NumpyBackend
from ..weights import load_weights
from .bugzoo import Bug, BuggyBackend
from .runner import verify


@dataclass
class ZooResult:
    bug: Bug
    culprit: str | None
    first_divergence: str | None
    sentence: str

    @property
    def found(self) -> bool:
        return self.culprit in self.bug.expected


class Zoo:
    """Models, weights and references shared by the zoo's runs (each bug gets a fresh candidate)."""

    def __init__(self, models: dict, dtype: str = "float64"):
        """models: {"dense": (cfg, weights), "moe": (cfg, weights)} with torch weight dicts."""
        self.dtype = dtype
        self.models = {kind: (cfg, w, NumpyBackend(w, cfg)) for kind, (cfg, w) in models.items()}

    @classmethod
    def from_paths(cls, dense_path: Path, moe_path: Path, dtype: str = "float64") -> Zoo:
        models = {}
        for kind, path in (("dense", dense_path), ("moe", moe_path)):
            cfg = Qwen3Config.from_file(path)
            models[kind] = (cfg, load_weights(path, cfg, dtype=torch.float32))
        return cls(models, dtype)

    def candidate(self, bug: Bug | None, moe: bool = False, dtype: str | None = None):
        cfg, w, _ = self.models["moe" if moe else "dense"]
        if bug is not None and bug.fast:  # the kernels take float32 / bfloat16: float32 stands in for float64
            dt = dtype or self.dtype
            inner = tm.TorchBackend(cfg, w, dtype="float32" if dt == "float64" else dt, fast=True)
        else:
            inner = tm.TorchBackend(cfg, w, dtype=dtype or self.dtype)
        return inner if bug is None else BuggyBackend(inner, bug)

    def reference(self, moe: bool = False):
        return self.models["moe" if moe else "dense"][2]

    def check(self, bug: Bug, input_ids, **kw) -> ZooResult:
        rep = verify(self.reference(bug.moe), self.candidate(bug, bug.moe), input_ids,
                     decode_steps=bug.decode_steps, **kw)
        fd = rep.first_divergence
        return ZooResult(bug, rep.culprit.name if rep.culprit else None, fd.name if fd else None, rep.sentence())


def zoo_models(where: str | Path | None = None, **overrides) -> tuple[Path, Path]:
    """tiny and tiny-moe checkpoints (seed 0) made under `where` (a temp dir by default); `overrides` are
    config fields (e.g. vocab_size=10000 for a faster zoo)."""
    root = Path(where) if where is not None else Path(tempfile.mkdtemp(prefix="qwen3lab-zoo-"))
    dense = make_model(root / "tiny", preset="tiny", overwrite=True, **overrides)
    moe = make_model(root / "tiny-moe", preset="tiny-moe", overwrite=True, **overrides)
    return dense, moe
