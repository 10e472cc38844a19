"""One side of a comparison (`Side`): a backend, found by its spec string, plus what verify needs to know of it.

Specs:
- `numpy` (the float64 oracle), `torch` (ours; --device/--dtype), `torch-fast` (ours through qwen3lab.fast:
  fused projections and the C++ kernels, CPU; --dtype float32 (default), bfloat16, or int8 / int4 = those
  weights with bfloat16 activations, judged at the int8 / int4 tolerance), `hf` (transformers, extra `[hf]`):
  the names `qwen3lab.load` knows (loading.py); --dtype int8 / int4 is refused for every backend but torch-fast;
- `PREFIX:REST` with a registered prefix (backends/__init__.py ADAPTERS): `dump:FILE`, a safetensors tap dump
  written by any program (backends/dump.py: metadata checked, a --map for foreign names, an --isolated twin);
  `llama.cpp:MODEL.gguf` / `llama.cpp`, llama.cpp itself (backends/llama_cpp.py, `--candidate-opt kv=, threads=`).
  What an adapter reports as problems (a dump's config_sha256 or dtype differing) goes into the report;
- any other `module:Class` or `path/to/file.py:Class`: a user's Python backend (backends/plugin.py).
A backend object (anything with .cfg, .name, .dtype, .run(input_ids, taps=, graft=)) can be passed directly.
Every side's taps go through the backend's shared check (backends/check.py), or one the Side keeps for it,
and its notes (tensors dropped, shapes not canonical) end in the report.

Streaming: `Side.run(..., sink=f)` hands each tap to `f(name, array)` as it is made instead of returning
them, when the backend can (its run takes `sink=`, or it is one of our tap-site models, for which an
outer taps.record / taps.graft session is opened around an un-recorded run).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..backends import adapter_for
from ..backends.check import TapCheck
from ..backends.dtypes import normalize_dtype
from ..backends.plugin import build_plugin
from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..loading import BACKENDS as BUILTIN  # the backends qwen3lab.load knows by name
from ..models.base import RunResult


class Side:
    """One side of a comparison: a backend plus what verify needs to know about it."""

    def __init__(self, backend, spec: str, label: str | None = None, precision: str | None = None,
                 problems: list[str] | None = None):
        self.backend = backend
        self.spec = spec
        self.cfg = backend.cfg
        self.dtype = normalize_dtype(getattr(backend, "dtype", None) or "float32")
        self.label = label or f"{getattr(backend, 'name', spec)} ({self.dtype})"
        # the precision its numbers can be trusted to (HF float64 still does RMSNorm/RoPE tables in float32)
        self.precision = precision or self.dtype
        self.problems = list(problems or [])
        self.fixed_input_ids: list[int] | None = getattr(backend, "fixed_input_ids", None)

    # ---- capabilities --------------------------------------------------------------------------------
    @property
    def supports_graft(self) -> bool:
        return bool(getattr(self.backend, "supports_graft", True))

    @property
    def supports_decode(self) -> bool:
        return callable(getattr(self.backend, "run_decode", None))

    def _accepts(self, fn, name: str) -> bool:
        try:
            return name in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return False

    def _tap_site_model(self) -> bool:
        """Our own models call taps.tap() at every site and open no session when run with taps=None."""
        mod = type(self.backend).__module__
        return mod in ("qwen3lab.models.numpy_ref", "qwen3lab.models.torch_model") or bool(
            getattr(self.backend, "uses_tap_sites", False))

    @property
    def check(self) -> TapCheck:
        """The backend's own tap check (the adapters keep one), else one this side keeps for it."""
        chk = getattr(self.backend, "check", None)
        if not isinstance(chk, TapCheck):
            chk = self.__dict__.setdefault("_check", TapCheck(self.cfg, getattr(self.backend, "name", self.spec)))
        return chk

    def notes(self, names, decode_steps: int, layers: set[int] | None) -> list[str]:
        """What the report should say about this side's tensors: the backend's own account when it keeps one
        (a dump's tensors not compared), else the shared check's."""
        if callable(getattr(self.backend, "uncompared", None)):
            return self.backend.uncompared(names, decode_steps, layers)
        return self.check.lines()

    # ---- running ---------------------------------------------------------------------------------------
    def run(self, input_ids, names, graft: Mapping | None = None, sink: Callable | None = None) -> RunResult:
        """Prefill taps of `names`, canonical (check.py), returned or handed to `sink` one at a time."""
        b, chk = self.backend, self.check
        n = int(np.asarray(input_ids).size)
        if sink is not None:
            sink = _checked(sink, chk, n)
        if sink is None:
            res = b.run(input_ids, taps=names, graft=graft)
            res.taps = chk.all(res.taps, n)
            return res
        if self._accepts(b.run, "sink"):
            return b.run(input_ids, taps=names, graft=graft, sink=sink)
        if self._tap_site_model():
            session = (_taps.graft(graft, names, sink=sink) if graft is not None else _taps.record(names, sink=sink))
            with session:
                res = b.run(input_ids)
            return RunResult(res.logits, {})
        res = b.run(input_ids, taps=names, graft=graft)
        for name, arr in res.taps.items():
            sink(name, arr)
        return RunResult(res.logits, {})

    @property
    def can_host_session(self) -> bool:
        """Whether an outer taps session (record / graft / routing pin) sees every tap of a plain run."""
        return self._tap_site_model()

    def run_in(self, session, input_ids) -> RunResult:
        """A plain run inside a taps session of the caller's making (tap-site models only)."""
        assert self.can_host_session, self.spec
        with session:
            res = self.backend.run(input_ids)
        return RunResult(res.logits, {})

    def run_decode(self, input_ids, decode_steps: int, names, graft: Mapping | None = None) -> RunResult:
        if self.supports_decode:
            res = self.backend.run_decode(input_ids, decode_steps, taps=names, graft=graft)
            res.taps = self.check.all(res.taps, int(np.asarray(input_ids).size), decode_steps)
            return res
        return decode_by_recompute(self, input_ids, decode_steps, names)


def _checked(sink: Callable, chk: TapCheck, n_ids: int) -> Callable:
    """sink fed canonical taps: model code taps with a leading batch of one (torch), which the check removes."""

    def f(name: str, arr) -> None:
        arr = chk.one(name, arr, n_ids)
        if arr is not None:
            sink(name, arr)

    return f


def decode_by_recompute(side: Side, input_ids, decode_steps: int, names) -> RunResult:
    """Decode taps of a backend without a KV cache: the prefill run, then one full run per step whose last
    row (probs: last query row over all keys) is that step's tap, named `step{j}.`."""
    ids = np.asarray(input_ids, dtype=np.int64)
    T = ids.shape[0]
    P = T - decode_steps
    pre = side.run(ids[:P], names)
    taps = dict(pre.taps)
    logits = None
    for j in range(decode_steps):
        full = side.run(ids[: P + j + 1], names)
        for name, arr in full.taps.items():
            arr = np.asarray(arr)
            taps[f"step{j}.{name}"] = arr[:, -1:, :] if _taps.split_name(name)[2] == "probs" else arr[-1:]
        logits = full.logits
    return RunResult(logits if logits is not None else pre.logits, taps)


# ---- resolution ------------------------------------------------------------------------------------
def resolve(spec, model_path: Path | None, cfg: Qwen3Config | None = None, *, device: str = "cpu",
            dtype: str | None = None, role: str = "plugin", name_map=None, isolated: str | None = None,
            options: dict[str, str] | None = None) -> Side:
    """A spec string (or a backend object) -> Side. `dtype` None picks the backend's default. role ("candidate",
    "reference") names a plugin in its errors. name_map (namemap.NameMap) and isolated (the isolated twin's
    path) are for dumps only; options (--candidate-opt key=value) are passed to a plugin's constructor."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "run", None)) or getattr(spec, "cfg", None) is None:
            raise Qwen3LabError(f"{spec!r} is not a backend (needs .cfg and .run(input_ids, taps=, graft=))")
        return Side(spec, getattr(spec, "name", type(spec).__name__))
    if options and (spec in BUILTIN or (":" not in spec and adapter_for(spec) is None)):
        raise InputError(f"--candidate-opt is for plugins (module:Class, file.py:Class) and adapters (PREFIX:...); "
                         f"the {role} is {spec!r}")
    if (isolated is not None or name_map is not None) and not spec.startswith("dump:"):
        raise InputError(f"--isolated and --map are for dumps (dump:FILE); the {role} is {spec!r}")
    if spec in BUILTIN:
        from ..loading import load

        if model_path is None:
            raise Qwen3LabError(f"backend {spec!r} needs a model path")
        b = load(model_path, backend=spec, device=device, dtype=dtype)
        dt = normalize_dtype(b.dtype)
        label = f"{spec} ({dt}{', ' + str(device) if spec != 'numpy' else ''})"
        return Side(b, spec, label=label, precision="float32" if spec == "hf" and dt == "float64" else dt)
    if cfg is None:
        if model_path is None:
            raise Qwen3LabError(f"backend {spec!r} needs --model-path for the model's config.json")
        cfg = Qwen3Config.from_file(model_path)
    adapter = adapter_for(spec)
    if adapter is not None:  # a registered PREFIX:REST (backends/__init__.py): dump:FILE, llama.cpp:MODEL.gguf
        rest, opener = adapter
        b = opener(rest, cfg=cfg, model_path=model_path, device=device, dtype=dtype, role=role, options=options,
                   name_map=name_map, isolated=isolated)
        cfg_file = None if model_path is None else Path(model_path) / "config.json"
        problems = b.problems(cfg_file, dtype) if callable(getattr(b, "problems", None)) else []
        label = f"dump {Path(rest).name}" if spec.startswith("dump:") else getattr(b, "name", spec)
        return Side(b, spec, label=f"{label} ({normalize_dtype(b.dtype)})", problems=problems)
    if ":" in spec:
        b = build_plugin(spec, model_path, cfg, device=device, dtype=dtype, role=role, options=options)
        return Side(b, spec, label=f"{spec} ({b.dtype})")
    raise Qwen3LabError(f"unknown backend {spec!r}; use one of {', '.join(BUILTIN)}, dump:FILE, module:Class "
                        f"or path/to/file.py:Class")
