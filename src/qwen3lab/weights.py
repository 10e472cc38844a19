"""Checkpoint dir -> {hf_name: torch.Tensor}, and the reverse (save_checkpoint).

Notable:
- Reads one `model.safetensors` or a sharded `model.safetensors.index.json`. Files are memory-mapped
  (safetensors `safe_open`, copy-on-write pages); each tensor is converted to the requested dtype once and
  the mapped original dropped, so a checkpoint never sits in memory twice. When the requested dtype is the
  file's, the mapped tensor itself is returned.
- Every name, dtype and shape is checked against `shapes.expected_shapes(cfg)` from the file headers before
  any data is read; errors name the tensor and the file.
- Tied lm_head: `lm_head.weight` in the result IS the embedding tensor (a stored copy is accepted, unused).
- MoE experts may be per-expert (released checkpoints) or fused as transformers 5 keeps them in memory
  (`mlp.experts.gate_up_proj` [E, 2I, D], gate rows first; `mlp.experts.down_proj` [E, D, I]); fused ones are
  split into per-expert views.
- Pickle checkpoints (`*.bin`, `*.pt`, `*.pth`) are refused, never unpickled: unpickling runs arbitrary code.
- Only regular files are opened (a FIFO would block safe_open forever); safetensors validates each header,
  and when its error names no tensor, the tensor at fault is found and named (`_bad_entry`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import shorten
from .errors import InputError, NumericsError, WeightsError
from .jsonio import LIMITS, check_regular_file, read_json
from .pages import file_ranges, release
from .shapes import expected_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors header dtype -> torch dtype, for the dtypes a Qwen3 checkpoint may hold
FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64, "f64": torch.float64,
}

# Derived buffers some older exports store; they are recomputed from the config, never loaded.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
_FUSED = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a torch.dtype or a name like "bfloat16" / "bf16" / "torch.float32"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, float64")
    return DTYPE_NAMES[key]


def checkpoint_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype checkpoints may be written in: float32, bfloat16 or float16 (what load_weights accepts)."""
    dt = torch_dtype(dtype)
    if dt not in FILE_DTYPES.values():
        raise InputError(f"checkpoints are written in float32, bfloat16 or float16, not {dtype_name(dt)}")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# finding the files
# ---------------------------------------------------------------------------------------------------
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


def _open(file: Path):
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


def _header(file: Path, h, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype string, shape) of one tensor, from the header only."""
    try:
        sl = h.get_slice(name)
        return sl.get_dtype(), tuple(sl.get_shape())
    except (SafetensorError, TypeError, ValueError, AttributeError) as e:  # a dtype torch has no type for
        raise WeightsError(f"{file}: tensor {name!r} cannot be read ({e})") from None


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def _list(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def load_weights(
    path: str | Path,
    cfg,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    strict: bool = True,
    check_finite: bool = True,
    release_pages: bool = False,
    shard=None,
) -> dict[str, torch.Tensor]:
    """{hf_name: tensor} in `dtype` on `device`, checked against cfg; `lm_head.weight` always present.

    strict=False tolerates tensors the config does not know (they are skipped); missing or mis-shaped ones
    are always errors. check_finite scans every tensor for NaN/Inf (one cheap pass). release_pages gives back
    each memory-mapped tensor's file pages once scanned (fast.optimize copies every weight it streams, so
    the scan would otherwise leave the whole file resident next to the copies: an int8 load peaked at 1.5x
    its weight bytes); a later read of such a tensor faults its pages back in from the page cache.
    shard (tensor parallel, models/tp.py): name -> None (whole tensor), "skip" (not on this rank) or
    (dim, lo, hi): only that slice is read through the memory map, so a rank holds ~ weights / ranks."""
    dtype = torch_dtype(dtype)
    where, weight_map, files = resolve_files(path)
    want = expected_shapes(cfg, include_lm_head=False if cfg.tie_word_embeddings else True)

    handles = {f: _open(f) for f in files}
    # name -> (file, safetensors dtype, shape), from the headers only
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f, h in handles.items():
        for name in h.keys():
            if weight_map is not None and weight_map.get(name) != f:
                continue  # the index is authoritative; a stray copy in another shard is not read
            found[name] = (f, *_header(f, h, name))
    if weight_map is not None:
        absent = [n for n in weight_map if n not in found]
        if absent:
            raise WeightsError(
                f"{weight_map[absent[0]]}: tensor {absent[0]!r} is listed for this shard in {where.name} but the "
                f"shard does not contain it"
            )

    for name, (f, fdt, _) in found.items():
        if fdt not in FILE_DTYPES and not _IGNORED.match(name):
            raise WeightsError(
                f"{f}: tensor {name!r} has dtype {fdt}; Qwen3 checkpoints hold float32 (F32), bfloat16 (BF16) or "
                f"float16 (F16)"
            )

    # Fused MoE experts (transformers 5 layout): check, and note which per-expert names they provide.
    fused: dict[str, str] = {}  # fused name -> layer prefix "model.layers.{i}.mlp.experts"
    for name, (f, _, shape) in found.items():
        m = _FUSED.match(name)
        if not m:
            continue
        i = int(m.group(2))
        if not (i < cfg.num_hidden_layers and cfg.is_moe_layer(i)):
            continue  # reported as unexpected below
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        exp = (E, 2 * I, D) if m.group(3) == "gate_up_proj" else (E, D, I)
        if shape != exp:
            raise WeightsError(f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(exp)} (fused experts)")
        parts = ("gate_proj", "up_proj") if m.group(3) == "gate_up_proj" else ("down_proj",)
        for e in range(E):
            for p in parts:
                if f"{m.group(1)}.{e}.{p}.weight" in found:
                    raise WeightsError(
                        f"{f}: layer {i} stores experts both fused ({name!r}) and per expert "
                        f"('{m.group(1)}.{e}.{p}.weight'); keep one layout"
                    )
        fused[name] = m.group(1)
    provided = set(found) | {
        f"{prefix}.{e}.{p}.weight"
        for name, prefix in fused.items()
        for e in range(cfg.num_experts)
        for p in (("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",))
    }

    missing = [n for n in want if n not in provided]
    if missing:
        raise WeightsError(
            f"{where}: missing tensor {missing[0]!r} (expected shape {list(want[missing[0]])})"
            + (f"; {len(missing)} missing in all: {_list(missing)}" if len(missing) > 1 else "")
        )
    tied_copy = "lm_head.weight" if cfg.tie_word_embeddings else None
    unexpected = [n for n in found if n not in want and n not in fused and n != tied_copy and not _IGNORED.match(n)]
    if unexpected and strict:
        n = unexpected[0]
        raise WeightsError(
            f"{found[n][0]}: unexpected tensor {n!r} (shape {list(found[n][2])}) that a "
            f"{cfg.architecture} with this config does not have"
            + (f"; {len(unexpected)} unexpected in all: {_list(unexpected)}" if len(unexpected) > 1 else "")
            + " (pass strict=False to skip them)"
        )
    checks = [(n, s) for n, s in want.items() if n in found]
    if tied_copy and tied_copy in found:
        checks.append((tied_copy, want["model.embed_tokens.weight"]))
    for name, shape in checks:
        f, _, got = found[name]
        if got != shape:
            raise WeightsError(f"{f}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")

    ranges = file_ranges()  # the checkpoint files are mapped by now

    def convert(t: torch.Tensor) -> torch.Tensor:
        # One conversion per tensor; when nothing changes the mmapped tensor itself is kept. When a copy is
        # made (another dtype or device), the file pages just read are given back at once: otherwise they stay
        # resident in the mapping, and a float32 load of a bf16 checkpoint peaked at 1.5x its weight bytes.
        out = t.to(device=device, dtype=dtype)
        if out.data_ptr() != t.data_ptr():
            release([t], ranges)
        return out

    out: dict[str, torch.Tensor] = {}
    for name in want:
        if name in found:
            f = found[name][0]
            cut = shard(name) if shard is not None else None
            if cut == "skip":
                continue
            t = handles[f].get_tensor(name) if cut is None else _read_slice(handles[f], name, cut, ranges)
            out[name] = convert(t)
    for name, prefix in fused.items():
        f = found[name][0]
        t = convert(handles[f].get_tensor(name))  # [E, 2I, D] or [E, D, I]
        I = cfg.moe_intermediate_size
        for e in range(cfg.num_experts):
            if shard is not None and shard(f"{prefix}.{e}.down_proj.weight") == "skip":
                continue  # an expert on another rank (fused layouts are read whole, then cut)
            if name.endswith("gate_up_proj"):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :I]  # [I, D], gate rows come first
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, I:]  # [I, D]
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]  # [D, I]
    # expected_shapes order (embed, layer by layer, norm), then lm_head
    out = {n: out[n] for n in want if n in out}
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if cfg.tie_word_embeddings else out["lm_head.weight"]
    if check_finite:
        _assert_finite(out, source=str(where), ranges=ranges if release_pages else None)
    elif release_pages:
        release(list(out.values()), ranges)
    return out


def _read_slice(h, name: str, cut: tuple[int, int, int], ranges) -> torch.Tensor:
    """Rows / columns [lo, hi) of dim `dim` of one tensor. Rows (dim 0) stay a view of the memory map (only
    their pages are ever read); a cut on another dim is copied and the whole tensor's file pages given back
    (the strided read faulted in pages around every row)."""
    dim, lo, hi = cut
    full = h.get_tensor(name)  # a view of the mapping: nothing read yet
    if dim == 0:
        return full[lo:hi]
    part = full.narrow(dim, lo, hi - lo).contiguous()
    release([full], ranges)
    return part


def check_finite(weights: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Raise NumericsError naming the first tensor holding NaN or Inf."""
    _assert_finite(weights, source)


def _assert_finite(weights: Mapping[str, torch.Tensor], source: str, ranges=None) -> None:
    # A sum is one fast reduction (about 20x quicker than an elementwise isfinite pass on CPU) and any NaN/Inf
    # makes it non-finite. Only then is the exact elementwise scan run; it also clears the rare false alarm of a
    # sum that overflowed (possible in float16) while every element is finite.
    seen: set[int] = set()
    for name, t in weights.items():
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        finite = bool(torch.isfinite(t.sum()))
        if ranges is not None:
            release([t], ranges)  # file pages only (anonymous copies are never touched)
        if finite:
            continue
        flat = t.reshape(-1)
        bad = ~torch.isfinite(flat)
        if not bool(bad.any()):
            continue
        first = int(bad.nonzero()[0, 0])
        idx = [int(i) for i in torch.unravel_index(torch.tensor(first), t.shape)]
        n_nan = int(torch.isnan(flat).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NumericsError(
            f"{source}: tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values (first at index {idx}: "
            f"{flat[first].item()})"
        )


# ---------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------
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
