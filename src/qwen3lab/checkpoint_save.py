"""Writing a checkpoint dir (save_checkpoint): config.json plus safetensors, sharded by size with an index
like transformers' save_pretrained, each file written to a temporary name and renamed, so a failed write
leaves nothing half-made. weights.py reads what this writes."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_files import INDEX_FILE, SINGLE_FILE
from .errors import InputError, WeightsError
from .shapes import expected_shapes
from .weights import checkpoint_dtype, dtype_name

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from 123, "200MB" (10^6, as transformers counts), "1.5GiB" (2^30)."""
    if isinstance(size, bool):
        raise InputError(f"shard size must be a number of bytes or a string like '200MB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise InputError(f"shard size {size!r} not understood; use bytes or e.g. '200MB', '2GB', '512MiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise InputError(f"shard size must be positive, got {size!r}")
    return n


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def save_checkpoint(
    out_dir: str | Path,
    cfg,
    tensors: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype = torch.bfloat16,
    shard_size: int | str | None = None,
) -> Path:
    """Write config.json and model.safetensors (or shards + index) as transformers' save_pretrained does.

    A tied lm_head is not written (transformers re-ties it); earlier weight files in out_dir are removed so the
    dir never mixes two checkpoints. Nothing in out_dir changes until everything is validated and written: the
    new files go to a temporary directory inside out_dir first and are moved into place (renames) only then, so
    a bad option or a failed write leaves an existing checkpoint as it was."""
    dtype = checkpoint_dtype(dtype)
    limit = parse_size(shard_size) if shard_size is not None else None
    out = Path(out_dir)
    names = list(expected_shapes(cfg))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise WeightsError(f"save_checkpoint({out}): tensor {missing[0]!r} missing from the tensors given")
    prepared: dict[str, torch.Tensor] = {}
    for n in names:
        t = tensors[n].detach().to(device="cpu", dtype=dtype).contiguous()
        if not _owns_storage(t) or any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                                       for p in prepared.values()):
            t = t.clone()  # safetensors refuses views and shared storage
        prepared[n] = t

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen3lab-save-", dir=out))
    try:
        _write_checkpoint(tmp, cfg, prepared, dtype, limit)
        for old in [*out.glob("model-*-of-*.safetensors"), out / SINGLE_FILE, out / INDEX_FILE]:
            if old.exists():
                old.unlink()
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_checkpoint(out: Path, cfg, prepared: Mapping[str, torch.Tensor], dtype: torch.dtype,
                      limit: int | None) -> None:
    """config.json and the weight files (single or sharded + index) into the (empty) directory out."""
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype_name(dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")

    meta = {"format": "pt"}  # transformers refuses safetensors without it
    total = sum(t.numel() * t.element_size() for t in prepared.values())
    if limit is None or total <= limit:
        save_file(dict(prepared), str(out / SINGLE_FILE), metadata=meta)
        return

    shards: list[list[str]] = [[]]
    size = 0
    for n, t in prepared.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    N = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{N:05d}.safetensors"
        save_file({n: prepared[n] for n in shard}, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
