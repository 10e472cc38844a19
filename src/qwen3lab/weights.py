"""Checkpoint dir -> {hf_name: torch.Tensor} (checkpoint_files.py finds and opens the files; checkpoint_save.py
writes them).

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

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint_files import open_safetensors, resolve_files, tensor_header
from .errors import InputError, NumericsError, WeightsError
from .pages import file_ranges, release
from .shapes import expected_shapes

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
# -----------------------------------------------------------------------------------------
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

    handles = {f: open_safetensors(f) for f in files}
    found = _scan_headers(handles, weight_map, where)
    fused = _fused_experts(found, cfg)
    _check_names(found, fused, want, cfg, where, strict)
    ranges = file_ranges()  # the checkpoint files are mapped by now
    out = _read_tensors(handles, found, fused, want, cfg, dtype, device, ranges, shard)
    if check_finite:
        _assert_finite(out, source=str(where), ranges=ranges if release_pages else None)
    elif release_pages:
        release(list(out.values()), ranges)
    return out


def _scan_headers(handles, weight_map, where) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype, shape), from the headers only; the index (when there is one) decides
    which shard holds a name, and every tensor's dtype is one a Qwen3 checkpoint holds."""
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f, h in handles.items():
        for name in h.keys():
            if weight_map is not None and weight_map.get(name) != f:
                continue  # the index is authoritative; a stray copy in another shard is not read
            found[name] = (f, *tensor_header(f, h, name))
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

    return found


def _fused_experts(found, cfg) -> dict[str, str]:
    """Fused MoE experts (transformers 5 layout), checked: fused name -> layer prefix
    "model.layers.{i}.mlp.experts"."""
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
    return fused


def _check_names(found, fused, want, cfg, where, strict: bool) -> None:
    """Every expected tensor present (directly or from fused experts) with its shape; unexpected ones refused
    when strict."""
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



def _read_tensors(handles, found, fused, want, cfg, dtype, device, ranges, shard) -> dict[str, torch.Tensor]:
    """The tensors converted to dtype / device (a rank's slice when sharded), fused experts split per expert."""

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
