"""Taps: named intermediate tensors, recorded or grafted through one mechanism.

Model code (NumPy and torch alike) calls `x = tap("layers.3.q_norm", x)` at each site of the
DESIGN.md table. With nothing active that is one global read and a `None` check: the fast path pays
nothing else. Under `record()` a detached NumPy copy is kept. Under `graft(reference)` the copy is
kept and the *reference's* value is returned, so the next op runs on the reference's input and each
recorded tap measures only its own op ("candidate op applied to reference inputs").

Model code passes tensors with whatever leading batch dim it has; recorded arrays keep it and the
single-sequence API (`Model.run`) strips a batch of one. A grafted value is reshaped to the model's
tensor (same number of elements) and cast to its dtype and device.

Also here: the tap-site list in dataflow order, canonical shapes, and the dump file format.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .checks import shorten
from .errors import DumpError
from .jsonio import LIMITS, check_regular_file, loads_json

DUMP_FORMAT = "qwen3lab.taps"
DUMP_VERSION = "1"

# Per-layer sites in dataflow order (the order first divergence is searched in).
ATTN_SITES = ["attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "probs", "attn",
              "attn_out", "resid_mid", "mlp_in"]
DENSE_MLP_SITES = ["gate", "up", "act"]
MOE_SITES = ["router_logits", "topk_idx", "topk_weight"]
TAIL_SITES = ["mlp_out", "resid_post"]
OPTIONAL_SITES = {"probs"}  # O(T*S) memory: only recorded when asked for by name
# A port's KV-cache contents after a forward's write, [S, Hkv, Dh] over every position attended: compared when a
# candidate provides them (a dump that holds them, the llama.cpp candidate); the reference's are its k_rot / v
# rows of every position so far (verify/runner.py). Not recorded by our own models (their cache is k_rot / v).
CACHE_SITES = ["k_cache", "v_cache"]


def layer_sites(cfg, i: int, probs: bool = False) -> list[str]:
    mlp = MOE_SITES if cfg.is_moe_layer(i) else DENSE_MLP_SITES
    sites = [s for s in ATTN_SITES if probs or s not in OPTIONAL_SITES] + mlp + TAIL_SITES
    return [f"layers.{i}.{s}" for s in sites]


def tap_sites(cfg, probs: bool = False, layers: Iterable[int] | None = None) -> list[str]:
    """Every tap name of a model in dataflow order."""
    idx = range(cfg.num_hidden_layers) if layers is None else layers
    out = ["embed"]
    for i in idx:
        out += layer_sites(cfg, i, probs)
    return out + ["final_norm", "logits"]


_LAYER_RE = re.compile(r"^(?:step(\d+)\.)?layers\.(\d+)\.(\w+)$")


def split_name(name: str) -> tuple[int | None, int | None, str]:
    """'step2.layers.3.q' -> (2, 3, 'q'); 'logits' -> (None, None, 'logits')."""
    m = _LAYER_RE.match(name)
    if m:
        return (int(m[1]) if m[1] else None), int(m[2]), m[3]
    step = None
    if name.startswith("step") and "." in name:
        head, rest = name.split(".", 1)
        if head[4:].isdigit():
            step, name = int(head[4:]), rest
    return step, None, name


def canonical_shape(cfg, name: str, T: int, S: int | None = None) -> tuple[int, ...]:
    """Shape of a tap for one sequence of T tokens attending over S positions (DESIGN.md table)."""
    S = T if S is None else S
    _, _, site = split_name(name)
    Hq, Hkv, Dh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    I = cfg.intermediate_size
    shapes = {
        "embed": (T, D), "attn_in": (T, D), "attn_out": (T, D), "resid_mid": (T, D), "mlp_in": (T, D),
        "mlp_out": (T, D), "resid_post": (T, D), "final_norm": (T, D), "logits": (T, cfg.vocab_size),
        "q": (T, Hq, Dh), "q_norm": (T, Hq, Dh), "q_rot": (T, Hq, Dh), "attn": (T, Hq, Dh),
        "k": (T, Hkv, Dh), "k_norm": (T, Hkv, Dh), "k_rot": (T, Hkv, Dh),
        "v": (T, Hkv, Dh), "probs": (Hq, T, S), "k_cache": (S, Hkv, Dh), "v_cache": (S, Hkv, Dh),
        "gate": (T, I), "up": (T, I), "act": (T, I),
        "router_logits": (T, cfg.num_experts),
        "topk_idx": (T, cfg.num_experts_per_tok), "topk_weight": (T, cfg.num_experts_per_tok),
    }
    if site not in shapes:
        raise KeyError(f"unknown tap site {name!r}")
    return shapes[site]


def to_numpy(x: Any) -> np.ndarray:
    """A detached host copy; half-precision torch tensors become float32 (NumPy has no bfloat16)."""
    if isinstance(x, np.ndarray):
        return x.copy()
    import torch  # taps serve the NumPy oracle too: torch (a second to import) only when handed a tensor

    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.to("cpu", copy=True).numpy()
    return np.array(x)


# ---- the active session ---------------------------------------------------------------------------
_active: Recorder | None = None


def tap(name: str, x):
    """Record (and under graft, replace) the tensor at tap site `name`. Free when nothing is active."""
    s = _active
    if s is None:
        return x
    return s.on_tap(name, x)


def record_only(name: str, x) -> None:
    """Record x at `name` without offering a graft point: for values an adapter can observe but cannot feed
    back (e.g. what transformers computes and consumes inside one call)."""
    s = _active
    if s is not None:
        s.keep(s.prefix + name, x)


def wants(name: str) -> bool:
    """Whether an optional, costly tap (attention probs) is asked for: model code then materialises it."""
    s = _active
    return s is not None and s.selects(s.prefix + name, optional=True)


def active() -> bool:
    """Whether a session is active (tap() then records or grafts): model code may skip making a view that only a
    tap would see."""
    return _active is not None


class Recorder:
    """Keeps a NumPy copy of each selected tap. `names`: None or "all" = every site except the optional
    ones; else an iterable of names or fnmatch patterns ("layers.*.q", "layers.3.*"), which may name
    optional sites. `sink(name, array)` receives each tap instead of storing it (stream per layer)."""

    def __init__(self, names: Iterable[str] | str | None = None, sink: Callable | None = None,
                 prefix: str = ""):
        pats = None if names in (None, "all") else [names] if isinstance(names, str) else list(names)
        self.patterns = pats
        # exact names are a set lookup; only real patterns pay for fnmatch (verify asks for hundreds of names)
        self.exact = set() if pats is None else {p for p in pats if not any(c in p for c in "*?[")}
        self.wild = [] if pats is None else [p for p in pats if p not in self.exact]
        self.sink = sink
        self.prefix = prefix  # e.g. "step3." while a decode step runs
        self.taps: dict[str, np.ndarray] = {}

    def selects(self, name: str, optional: bool = False) -> bool:
        site = split_name(name)[2]
        if self.patterns is None:
            return site not in OPTIONAL_SITES
        bare = name.split(".", 1)[1] if name.startswith("step") and "." in name else name
        if name in self.exact or bare in self.exact:
            return True
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(bare, p) for p in self.wild)

    def keep(self, name: str, x) -> None:
        if not self.selects(name):
            return
        arr = to_numpy(x)
        if self.sink is not None:
            self.sink(name, arr)
        else:
            self.taps[name] = arr

    def on_tap(self, name: str, x):
        self.keep(self.prefix + name, x)
        return x

    # context manager: `with record() as rec: model(...)`; rec.taps afterwards
    def __enter__(self) -> Recorder:
        global _active
        if _active is not None:
            raise RuntimeError("a tap recorder is already active (record/graft do not nest)")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None


class Grafter(Recorder):
    """Records the candidate's own value at each site, then hands back the reference's value."""

    def __init__(self, reference: Mapping[str, Any], names=None, sink=None, prefix: str = ""):
        super().__init__(names, sink, prefix)
        self.reference = reference
        self.grafted: list[str] = []

    def on_tap(self, name: str, x):
        full = self.prefix + name
        self.keep(full, x)
        ref = self.reference.get(full)
        if ref is None:
            return x
        self.grafted.append(full)
        return _like(ref, x, full)


def _like(ref, x, name: str):
    """The reference value shaped, typed and placed like the model's tensor x."""
    ref = np.asarray(ref)
    if ref.size != _numel(x):
        raise DumpError(
            f"graft: reference tap {name!r} has shape {tuple(ref.shape)} but the candidate's tensor has "
            f"shape {tuple(x.shape)}"
        )
    if isinstance(x, np.ndarray):
        return ref.reshape(x.shape).astype(x.dtype, copy=False)
    import torch  # as in to_numpy: x is a torch tensor here

    t = torch.from_numpy(np.ascontiguousarray(ref)).reshape(x.shape)
    return t.to(device=x.device, dtype=x.dtype)


def _numel(x) -> int:
    return int(np.prod(x.shape))


def record(names=None, sink=None, prefix: str = "") -> Recorder:
    return Recorder(names, sink, prefix)


def graft(reference: Mapping[str, Any], names=None, sink=None, prefix: str = "") -> Grafter:
    return Grafter(reference, names, sink, prefix)


# ---- dump files -------------------------------------------------------------------------------------
def write_dump(path: str | Path, taps: Mapping[str, Any], *, backend: str, dtype: str,
               input_ids: list[int], config_sha256: str | None = None,
               positions: list[int] | None = None, extra: Mapping[str, str] | None = None) -> Path:
    """Write taps as one safetensors file in the qwen3lab.taps format (DESIGN.md)."""

    meta = {
        "format": DUMP_FORMAT, "version": DUMP_VERSION, "backend": backend, "dtype": dtype,
        "input_ids": json.dumps([int(i) for i in input_ids]),
    }
    if positions is not None:
        meta["positions"] = json.dumps([int(p) for p in positions])
    if config_sha256:
        meta["config_sha256"] = config_sha256
    meta.update(extra or {})
    arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in taps.items()}
    path = Path(path)
    save_file(arrays, str(path), metadata=meta)
    return path


# Tensor dtypes a dump may hold: what NumPy represents (bfloat16 is widened to float32 through torch).
# float8/float4/complex taps are refused: nothing qwen3lab compares them with.
DUMP_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")
_ID_MAX = 2**63 - 1  # ids and positions are int64 in every backend


def read_dump(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a dump: (taps in file order, metadata with input_ids/positions decoded). Anything malformed is a
    DumpError naming the file and the tensor or metadata key: a non-regular file (never opened), a corrupt
    header, a tensor dtype NumPy cannot hold (float8, ...), ids that are not a JSON list of integers."""
    path = Path(path)
    # before safe_open: it would block forever on a FIFO
    check_regular_file(path, DumpError, "dump file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            taps = {k: _read_tap(f, path, k) for k in f.keys()}
    except SafetensorError as e:
        raise DumpError(f"{path}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise DumpError(f"{path}: cannot read the dump file ({e.strerror or e})") from None
    if meta.get("format") not in (None, DUMP_FORMAT):
        raise DumpError(f"{path}: metadata format is {shorten(meta.get('format'))}, expected {DUMP_FORMAT!r}")
    for key in ("input_ids", "positions"):
        if key in meta:
            meta[key] = _id_list(path, key, meta[key])
    # keep the tensors in dataflow order even if the writer sorted them by name
    return dict(sorted(taps.items(), key=lambda kv: dataflow_key(kv[0]))), meta


def _read_tap(f, path: Path, key: str) -> np.ndarray:
    dtype = f.get_slice(key).get_dtype()
    if dtype not in DUMP_DTYPES:
        raise DumpError(f"{path}: tensor {key!r} has dtype {dtype}; dump tensors are float (F32, F16, BF16, F64), "
                        f"integer or bool")
    if dtype == "BF16":  # no NumPy dtype: read through torch
        return _read_via_torch(path, key)
    return f.get_tensor(key)


def _id_list(path: Path, key: str, text: str) -> list[int]:
    """A metadata JSON list of token ids / positions: non-negative int64 integers, nothing else."""

    what = f"{path}: metadata {key!r}"
    v = loads_json(text, DumpError, what, max_chars=LIMITS["dump_metadata"])
    if not isinstance(v, list):
        raise DumpError(f"{what} must be a JSON list of integers, got {type(v).__name__}: {shorten(text)}")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= _ID_MAX:
            raise DumpError(f"{what}[{i}] is {shorten(x)}; it must be an integer in 0..2**63-1")
    return v


def _read_via_torch(path: Path, key: str) -> np.ndarray:

    with safe_open(str(path), framework="pt") as f:
        return to_numpy(f.get_tensor(key))


_ORDERED = ATTN_SITES[:ATTN_SITES.index("k_rot") + 1] + CACHE_SITES + ATTN_SITES[ATTN_SITES.index("k_rot") + 1:]
_SITE_ORDER = {s: n for n, s in enumerate(_ORDERED + DENSE_MLP_SITES + MOE_SITES + TAIL_SITES)}


def dataflow_key(name: str) -> tuple:
    """Sort key putting tap names in DESIGN.md dataflow order (steps, then layers, then sites)."""
    step, layer, site = split_name(name)
    s = -1 if step is None else step
    if layer is not None:
        return (s, 1, layer, _SITE_ORDER.get(site, 99), site)
    head = {"embed": 0, "final_norm": 2, "logits": 3}.get(site, 4)
    return (s, head, 0, 0, site)


def split_steps(full: Mapping[str, np.ndarray], P: int, steps: int, keep=None) -> dict[str, np.ndarray]:
    """Whole-sequence taps (a full recompute of P + steps tokens) -> what a KV-cache decode run records:
    rows 0..P-1 under each name, row P+j under `step{j}.name`; probs [Hq, T, T] keep only the keys a cache
    holds at that point (0..P-1, then 0..P+j). keep(name): which of those names to return. Dataflow order."""
    out: dict[str, np.ndarray] = {}
    for j, (t0, t1) in enumerate([(0, P)] + [(P + i, P + i + 1) for i in range(steps)]):
        for name, arr in full.items():
            key = name if j == 0 else f"step{j - 1}.{name}"
            if keep is None or keep(key):
                out[key] = arr[:, t0:t1, :t1].copy() if split_name(name)[2] == "probs" else arr[t0:t1].copy()
    return dict(sorted(out.items(), key=lambda kv: dataflow_key(kv[0])))


def reference_cache_tap(get, name: str):
    """The reference's `layers.i.k_cache` / `v_cache` (or `step{j}.`): its k_rot / v rows of every position so far
    (prefill rows, then one per decode step up to j), [S, Hkv, Dh]; None when a row is missing. get: name -> array."""
    step, layer, site = split_name(name)
    src = {"k_cache": "k_rot", "v_cache": "v"}[site]
    names = [f"layers.{layer}.{src}"] + ([f"step{j}.layers.{layer}.{src}" for j in range(step + 1)]
                                         if step is not None else [])
    rows = [get(n) for n in names]
    if any(r is None for r in rows):
        return None
    return np.concatenate([np.asarray(r) for r in rows], axis=0)
