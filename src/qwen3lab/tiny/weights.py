"""Tiny-model weights: made by a rule (random|identity|ones|arange) or read from a file a person can edit.

Weights are {hf_name: float64 ndarray} with the checkpoint's tensor names; `lm_head.weight` is always
present (for a tied model it is the embedding). Every init produces float32-representable values, so
writing them as a float32 checkpoint (`--save-model`) and reading it back changes nothing.

Init rules, per tensor:
- random:   `random_init.random_weights(cfg, seed)` -- the same seeded, scaled weights make-model writes.
- identity: a matrix [R, C] is eye(R, C); the embedding row of token t is the unit vector e_(t mod D), so
            every token has a non-zero embedding; norm weights are 1. An MoE router is eye(E, D).
- ones:     every element 1.
- arange:   element k (row-major) of a tensor with n elements is (k - (n-1)/2) / n, rounded to float32:
            distinct, signed, in [-0.5, 0.5], so a person can tell which element went where; norm
            weights are 1 + that.

Files (chosen by extension): `.safetensors`, `.npz`, `.json` ({name: nested lists}, one matrix row per
line, float64 repr so a round trip is exact). Reading checks every tensor against the config: missing
tensors, unexpected tensors and wrong shapes are WeightsErrors naming them. NaN/Inf are allowed on
purpose: planting one is how a person sees what the stability check reports. Reading is safe with any
file: a FIFO or device is refused before it is opened, .npz object arrays are never unpickled, JSON
leaves must be numbers (not true/null/"0.5") and tensors integer or float.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..errors import WeightsError
from ..jsonio import LIMITS, check_regular_file, read_json
from ..shapes import expected_shapes

INITS = ("random", "identity", "ones", "arange")
FORMATS = (".safetensors", ".npz", ".json")


def init_weights(cfg, init: str = "random", seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of the model (lm_head included even when tied), float64, by the named rule."""
    if init not in INITS:
        raise WeightsError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if init == "random":
        from ..random_init import random_weights  # torch (a second to import) only for this init

        out = {k: v.double().numpy() for k, v in random_weights(cfg, seed=seed).items()}
    else:
        out = {name: _rule(init, name, shape, cfg) for name, shape in expected_shapes(cfg).items()}
    out = {k: v.astype(np.float32).astype(np.float64) for k, v in out.items()}
    return complete(out, cfg)


def _rule(init: str, name: str, shape: tuple[int, ...], cfg) -> np.ndarray:
    is_norm = name.endswith("norm.weight")
    if init == "ones":
        return np.ones(shape)
    if init == "identity":
        if is_norm or len(shape) == 1:
            return np.ones(shape)
        R, C = shape
        if name == "model.embed_tokens.weight":
            return np.eye(C)[np.arange(R) % C]  # [V, D]: token t -> e_(t mod D)
        return np.eye(R, C)
    # arange
    n = int(np.prod(shape))
    vals = ((np.arange(n, dtype=np.float64) - (n - 1) / 2) / n).reshape(shape)
    return 1.0 + vals if is_norm else vals


def complete(weights: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """Add lm_head.weight for a tied model (it IS the embedding), as the backends expect."""
    if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    return weights


def checkpoint_tensors(weights: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    """What a file holds: every expected tensor, lm_head left out when tied."""
    return {name: weights[name] for name in expected_shapes(cfg)}


def check_weights(weights: dict[str, np.ndarray], cfg, source: str) -> dict[str, np.ndarray]:
    """Check names and shapes against the config; WeightsError naming every missing/extra/mis-shaped tensor."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in weights]
    if missing:
        raise WeightsError(f"{source}: missing {len(missing)} tensor(s): {', '.join(missing)}")
    allowed = set(want) | {"lm_head.weight"} if cfg.tie_word_embeddings else set(want)
    extra = [n for n in weights if n not in allowed]
    if extra:
        raise WeightsError(f"{source}: unexpected tensor(s) not in this model: {', '.join(extra)} "
                           f"(check the sizes flags against the file)")
    for name, shape in want.items():
        got = tuple(weights[name].shape)
        if got != tuple(shape):
            raise WeightsError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                               f"for this config")
    if cfg.tie_word_embeddings and "lm_head.weight" in weights:
        if tuple(weights["lm_head.weight"].shape) != tuple(want["model.embed_tokens.weight"]):
            raise WeightsError(f"{source}: tensor 'lm_head.weight' has shape "
                               f"{list(weights['lm_head.weight'].shape)}, expected "
                               f"{list(want['model.embed_tokens.weight'])}")
    return complete({k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}, cfg)


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise WeightsError(f"{path}: unknown weights format {suffix or '(no extension)'!r}; "
                           f"use one of {', '.join(FORMATS)}")
    return suffix


# Tensor dtypes a weights file may hold (safetensors names; .npz arrays likewise of integer or float kind):
# each converts to float64 exactly or by rounding. bool, complex, float8/float4 are refused, not reinterpreted.
TENSOR_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


def read_weights(path: str | Path, cfg) -> dict[str, np.ndarray]:
    """Read a weights file (by extension), check it against cfg, return float64 arrays."""
    path = Path(path)
    fmt = _format(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if fmt == ".safetensors":
        raw = _read_safetensors(path)
    elif fmt == ".npz":
        raw = _read_npz(path)
    else:
        raw = _read_json(path)
    return check_weights(raw, cfg, str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    check_regular_file(path, WeightsError, "the weights file")  # np.load would block forever on a FIFO
    try:
        # allow_pickle=False: an object array in the file is refused, never unpickled (that can run code)
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raw = None  # a single .npy array
        else:
            with z:
                raw = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise WeightsError(f"{path}: not a readable .npz file ({e})") from None
    except MemoryError:
        raise WeightsError(f"{path}: an array in the .npz file is too large to read into memory") from None
    if raw is None:
        raise WeightsError(f"{path}: a single .npy array, not an .npz archive of named tensors")
    for name, arr in raw.items():
        if arr.dtype.kind not in "iuf":
            raise WeightsError(f"{path}: tensor {name!r} has dtype {arr.dtype}; weights are integer or float numbers")
    return raw


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    check_regular_file(path, WeightsError, "the weights file")  # safe_open would block forever on a FIFO
    try:
        # through torch: bfloat16 files have no NumPy dtype
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                dtype = f.get_slice(k).get_dtype()
                if dtype not in TENSOR_DTYPES:
                    raise WeightsError(f"{path}: tensor {k!r} has dtype {dtype}; weights are one of "
                                       f"{', '.join(TENSOR_DTYPES)}")
                out[k] = f.get_tensor(k).double().numpy()
            return out
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the weights file ({e.strerror or e})") from None


def _read_json(path: Path) -> dict[str, np.ndarray]:
    d = read_json(path, WeightsError, "the weights file", max_bytes=LIMITS["tiny_weights"])
    if not isinstance(d, dict):
        raise WeightsError(f"{path}: expected a JSON object {{tensor name: nested lists}}, got {type(d).__name__}")
    return {name: _json_tensor(path, name, v) for name, v in d.items()}


def _json_tensor(path: Path, name: str, v) -> np.ndarray:
    """float64 array of a rectangular nested list of JSON numbers; true/false, null, strings and ragged rows are
    errors, not silently 1.0 / NaN / parsed (what np.array(v, dtype=float64) alone would do)."""
    bad = f"{path}: tensor {name!r} is not a rectangular list of numbers"
    if not isinstance(v, list):
        raise WeightsError(f"{bad} (got {type(v).__name__})")
    try:
        # dtype=object keeps each leaf as the JSON value it was; a ragged level stays a list leaf
        leaves = np.array(v, dtype=object)
    except ValueError as e:  # more than NumPy's 64 dimensions, or ragged in a way NumPy cannot hold
        raise WeightsError(f"{bad} ({e})") from None
    for x in leaves.reshape(-1).tolist():
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise WeightsError(f"{bad}: it holds {_short(x)}")
    try:
        return leaves.astype(np.float64)
    except OverflowError:
        raise WeightsError(f"{path}: tensor {name!r} holds an integer too large for a float64") from None


def _short(v, n: int = 60) -> str:
    r = json.dumps(v) if isinstance(v, (bool, list, dict, str)) or v is None else repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def write_weights(path: str | Path, weights: dict[str, np.ndarray], cfg) -> Path:
    """Write the weights (checkpoint names, lm_head left out when tied) in the format the extension names."""
    path = Path(path)
    fmt = _format(path)
    tensors = checkpoint_tensors(weights, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == ".safetensors":
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
    elif fmt == ".npz":
        np.savez(path, **{k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()})
    else:
        path.write_text(_json_text(tensors), encoding="utf-8")
    return path


def _json_text(tensors: dict[str, np.ndarray]) -> str:
    """One matrix row per line, so a person can find and edit a weight with a text editor."""

    def row(v: np.ndarray) -> str:
        return "[" + ", ".join(_num(x) for x in v.tolist()) + "]"

    parts = []
    for name, arr in tensors.items():
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim == 1:
            body = row(arr)
        else:
            rows = arr.reshape(arr.shape[0], -1) if arr.ndim == 2 else arr
            body = "[\n" + ",\n".join("    " + (row(r) if arr.ndim == 2 else json.dumps(r.tolist()))
                                     for r in rows) + "\n  ]"
        parts.append(f"  {json.dumps(name)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _num(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(float(x))


def load_checkpoint_weights(path: str | Path, cfg) -> dict[str, np.ndarray]:
    """A checkpoint dir's tensors as float64 through the project's loader (same checks as every command,
    except that NaN/Inf are let through: tiny mode is where a person looks at what they do)."""
    import torch  # torch and the project's loader (a second to import) only when reading a checkpoint dir

    from ..weights import load_weights

    tensors = load_weights(path, cfg, dtype=torch.float32, device="cpu", check_finite=False)
    return complete({k: v.double().numpy() for k, v in tensors.items()}, cfg)
