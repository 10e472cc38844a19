"""Finding and opening a checkpoint's safetensors files: one `model.safetensors` or a sharded
`model.safetensors.index.json` (resolve_files), pickles refused (never unpickled: unpickling runs arbitrary
code), only regular files opened (a FIFO would block safe_open forever), and a header safetensors rejects
explained by the tensor at fault (`_bad_entry`). weights.py loads through these."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .checks import shorten
from .errors import WeightsError
from .jsonio import LIMITS, check_regular_file, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(where: Path, pickles: list[Path]) -> WeightsError:
    names = ", ".join(p.name for p in pickles[:3]) + (" ..." if len(pickles) > 3 else "")
    return WeightsError(
        f"{where}: only pickle weights found ({names}). qwen3lab does not load pickles: unpickling can execute "
        f"arbitrary code hidden in the file. Convert the checkpoint to safetensors once in a trusted environment, "
        f"e.g. with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
        f"safe_serialization=True), or torch.load(file, weights_only=True) followed by "
        f"safetensors.torch.save_file(state_dict, 'model.safetensors', metadata={{'format': 'pt'}})."
    )


def _read_index(index: Path) -> dict[str, Path]:
    """weight_map of a sharded checkpoint as {tensor name: shard path}."""
    d = read_json(index, WeightsError, "the checkpoint index", max_bytes=LIMITS["index"])
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        got = type(d).__name__ if not isinstance(d, dict) else type(wm).__name__ if wm is not None else "nothing"
        raise WeightsError(f"{index}: no 'weight_map' object mapping tensor names to shard files (got {got})")
    out: dict[str, Path] = {}
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise WeightsError(f"{index}: weight_map[{name!r}] must be a shard file name, got {shorten(shard)}")
        p = Path(shard)
        # Shards live next to the index; refuse paths that leave the checkpoint dir.
        if p.is_absolute() or ".." in p.parts:
            raise WeightsError(f"{index}: weight_map[{name!r}] = {shard!r} points outside the checkpoint dir")
        if not p.parts:  # "." or "./": the directory itself
            raise WeightsError(f"{index}: weight_map[{name!r}] = {shard!r} is not a shard file name")
        out[name] = index.parent / p
    missing = sorted({p for p in out.values() if not _exists(p, index)})
    if missing:
        first = next(n for n, p in out.items() if p == missing[0])
        raise WeightsError(
            f"{index}: shard {missing[0].name} is listed in the index (e.g. for tensor {first!r}) but the file is "
            f"absent" + (f" (also absent: {', '.join(p.name for p in missing[1:4])})" if len(missing) > 1 else "")
        )
    return out


def _exists(p: Path, index: Path) -> bool:
    """Whether a shard named in the index exists (anything there; _open refuses what is not a regular file)."""
    try:
        os.stat(p)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # a name too long, a path through a file, ...
        raise WeightsError(f"{index}: shard {str(p.name)[:80]!r} cannot be opened ({e.strerror or e})") from None


def resolve_files(path: str | Path) -> tuple[Path, dict[str, Path] | None, list[Path]]:
    """(where, weight_map or None, safetensors files) for a checkpoint dir, index file or single file."""
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such checkpoint file or directory") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise WeightsError(f"{path}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    if not is_dir:  # a file, or a FIFO/device that _open and read_json refuse by name
        if path.name.endswith(".index.json"):
            wm = _read_index(path)
            return path, wm, sorted(set(wm.values()))
        if path.suffix == ".safetensors":
            return path, None, [path]
        if path.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickles(path, [path])
        raise WeightsError(f"{path}: not a safetensors file or {INDEX_FILE}")
    # exists(), not is_file(): a FIFO or directory under these names is refused by name, not skipped
    index = path / INDEX_FILE
    if index.exists():
        wm = _read_index(index)
        return index, wm, sorted(set(wm.values()))
    single = path / SINGLE_FILE
    if single.exists():
        return single, None, [single]
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:
        return others[0], None, others
    if len(others) > 1:
        raise WeightsError(
            f"{path}: {len(others)} safetensors files ({', '.join(p.name for p in others[:4])}) but no {INDEX_FILE} "
            f"saying which tensor is in which"
        )
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickles(path, pickles)
    raise WeightsError(f"{path}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def open_safetensors(file: Path):
    # safe_open would block forever on a FIFO and fail obscurely on a device: refuse those by name first
    check_regular_file(file, WeightsError, "safetensors file")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        # safetensors validates the header (length, JSON, dtypes, shapes, offsets covering the data exactly);
        # truncated data reads as "incomplete metadata, file not fully covered"
        culprit = _bad_entry(file)
        msg = str(e) if not culprit or len(str(e)) <= 160 else str(e)[:157] + "..."
        raise WeightsError(f"{file}: truncated or corrupt safetensors file ({msg})"
                           + (f"; {culprit}" if culprit else "")) from None
    except OSError as e:
        raise WeightsError(f"{file}: cannot open ({e.strerror or e})") from None


# bits per element of each safetensors dtype (to name the tensor whose header entry is inconsistent)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
               "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header length


def _bad_entry(file: Path) -> str | None:
    """'tensor NAME: what is wrong' for the first header entry safetensors would refuse, or None. Its errors
    ("invalid shape, data type, or offset for tensor", "unknown variant") often do not say which tensor."""
    try:
        with open(file, "rb") as fh:  # a regular file: _open checked
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(header, dict):
        return None
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict):
            return f"tensor {name!r}: header entry is {shorten(e)}, not an object"
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            return f"tensor {name!r}: unknown dtype {shorten(dtype)}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {name!r}: shape {shorten(shape)} is not a list of non-negative integers"
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r}: data_offsets {shorten(offsets)} is not [start, end] with 0 <= start <= end"
        nbytes = math.prod(shape) * _DTYPE_BITS[dtype]
        if nbytes % 8 or nbytes // 8 != offsets[1] - offsets[0]:
            return (f"tensor {name!r}: shape {shape} of {dtype} takes {nbytes / 8:g} bytes but data_offsets "
                    f"{offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            return f"tensor {name!r}: data starts at byte {start}, expected {end} (gap or overlap)"
        end = stop
    if end != size - 8 - n:
        return f"the tensors' data ends at byte {end} but the file holds {size - 8 - n} data bytes"
    return None


def tensor_header(file: Path, h, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype string, shape) of one tensor, from the header only."""
    try:
        sl = h.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())
    except (SafetensorError, TypeError, ValueError, AttributeError) as e:  # a dtype torch has no type for
        raise WeightsError(f"{file}: tensor {name!r} cannot be read ({e})") from None


