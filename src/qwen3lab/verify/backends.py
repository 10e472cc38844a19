"""Backends for verify, by spec string, behind one adapter (`Side`).

Specs:
- `numpy` (the float64 oracle), `torch` (ours; --device/--dtype), `torch-fast` (ours through qwen3lab.fast:
  fused projections and the C++ kernels, CPU; --dtype float32 (default), bfloat16, or int8 / int4 = those
  weights with bfloat16 activations, judged at the int8 / int4 tolerance), `hf` (transformers, extra `[hf]`);
  --dtype int8 / int4 is refused for every backend but torch-fast, naming the backend;
- `dump:FILE`: a safetensors tap dump (DESIGN.md format) written by any program. Its metadata is checked:
  `config_sha256` against the model's config.json (sha256 of the file's bytes, or of Qwen3Config.sha256()),
  `input_ids` against the ids being verified, `dtype` against --dtype. Differences become `problems` in the
  report (an input_ids mismatch is an input error: the numbers would not be comparable). The dump backend
  (dumpfile.py) also reads foreign names through a --map and an --isolated twin, and notes what it leaves out;
- `module:Class` or `path/to/file.py:Class`: a user's Python backend, built as `Class(model_path, **options)`
  (options it accepts among device/dtype), with `run(input_ids, graft=None) -> dict[tap name, array]`, an
  optional `dtype` attribute and optional `run_decode(input_ids, decode_steps, graft=None) -> dict`.
  When `graft` (reference taps) is given it must run each op on the reference's input; set a class
  attribute `supports_graft = False` if it cannot, and isolation is skipped.
A backend object (anything with .cfg, .name, .dtype, .run(input_ids, taps=, graft=)) can be passed directly.

Streaming: `Side.run(..., sink=f)` hands each tap to `f(name, array)` as it is made instead of returning
them, when the backend can (its run takes `sink=`, or it is one of our tap-site models, for which an
outer taps.record / taps.graft session is opened around an un-recorded run).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..loading import BACKENDS as BUILTIN  # the backends qwen3lab.load knows by name
from ..models.base import RunResult
from .dumpfile import DumpBackend, file_sha256  # noqa: F401 - file_sha256 re-exported
from .tolerances import normalize_dtype


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

    # ---- running ---------------------------------------------------------------------------------------
    def run(self, input_ids, names, graft: Mapping | None = None, sink: Callable | None = None) -> RunResult:
        b = self.backend
        if sink is None:
            return b.run(input_ids, taps=names, graft=graft)
        if self._accepts(b.run, "sink"):
            return b.run(input_ids, taps=names, graft=graft, sink=sink)
        if self._tap_site_model():
            session = (_taps.graft(graft, names, sink=_unbatched(sink)) if graft is not None
                       else _taps.record(names, sink=_unbatched(sink)))
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
            return self.backend.run_decode(input_ids, decode_steps, taps=names, graft=graft)
        return decode_by_recompute(self, input_ids, decode_steps, names)


def _unbatched(sink: Callable) -> Callable:
    """Model code taps with a leading batch dim of 1 (torch); the canonical shapes have none."""

    def f(name: str, arr: np.ndarray) -> None:
        if _taps.split_name(name)[2] != "probs" and arr.ndim and arr.shape[0] == 1 and arr.ndim > _canon_ndim(name):
            arr = arr[0]
        elif _taps.split_name(name)[2] == "probs" and arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        sink(name, arr)

    return f


def _canon_ndim(name: str) -> int:
    site = _taps.split_name(name)[2]
    return 3 if site in ("q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "attn", "probs") else 2


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


# ---- dumps: dumpfile.py ------------------------------------------------------------------------


# ---- plugins ---------------------------------------------------------------------------------------
class PluginBackend:
    """A user's class behind the backend contract: its dict of taps becomes a RunResult."""

    def __init__(self, obj, cfg: Qwen3Config, spec: str, dtype: str | None, role: str = "plugin"):
        self.obj = obj
        self.cfg = cfg
        self.name = spec
        self.role = role  # "candidate" / "reference": how its errors name it
        self.dtype = normalize_dtype(self._call(getattr, "its dtype", obj, "dtype", None) or dtype or "float32")
        self.kv_dtype = getattr(obj, "kv_dtype", None)  # a KV cache below its compute dtype (tolerances.py)
        self.cache_taps = list(getattr(obj, "cache_taps", ()))  # KV-cache contents it can give (taps.CACHE_SITES)
        self.supports_graft = bool(self._call(getattr, "its supports_graft", obj, "supports_graft", True)) \
            and _takes(obj.run, "graft")
        if callable(self._call(getattr, "its run_decode", obj, "run_decode", None)):
            self.run_decode = self._run_decode

    def _call(self, fn, where: str, *args, **kwargs):
        """fn(*args, **kwargs) on the user's object; whatever it raises is one line naming the plugin, where
        and the exception ("the candidate raised ZeroDivisionError: ..."), not a traceback out of verify."""
        try:
            return fn(*args, **kwargs)
        except Qwen3LabError:
            raise  # already one clear line
        except Exception as e:  # noqa: BLE001 - the user's code: any exception is its own
            raise Qwen3LabError(plugin_raised(self.role, self.name, where, e)) from None

    def _wrap(self, out, where: str) -> RunResult:
        if isinstance(out, RunResult):
            return out
        if not isinstance(out, Mapping):
            raise Qwen3LabError(f"{self.name}: {where} returned {type(out).__name__}; expected a dict "
                                f"{{tap name: array}}")
        arrays = {}
        for k, v in out.items():
            try:
                arrays[str(k)] = _taps.to_numpy(v)
            except Exception as e:  # a user's object: say which tap could not be read, whatever it was
                raise Qwen3LabError(f"{self.name}: tap {k!r} is not an array ({type(v).__name__}: {e})") from None
        arrays = dict(sorted(arrays.items(), key=lambda kv: _taps.dataflow_key(kv[0])))
        logits = arrays.get("logits")
        return RunResult(logits if logits is not None else np.zeros((0, 0)), arrays)

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        kw = {"graft": graft} if graft is not None else {}
        res = self._wrap(self._call(self.obj.run, "run()", ids, **kw), "run()")
        if taps is not None:
            rec = _taps.record(taps)
            res.taps = {k: v for k, v in res.taps.items() if rec.selects(k, optional=True)}
        return res

    def _run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        kw = {"graft": graft} if graft is not None else {}
        return self._wrap(self._call(self.obj.run_decode, "run_decode()", ids, decode_steps, **kw), "run_decode()")


def plugin_raised(role: str, spec: str, where: str, e: BaseException) -> str:
    """"the candidate raised ZeroDivisionError: division by zero (backend 'port.py:Port', in run())": one line,
    the message shortened when long."""
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 300 else msg[:300] + "..."
    return f"the {role} raised {type(e).__name__}{': ' + msg if msg else ''} (backend {spec!r}, in {where})"


def _takes(fn, name: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return name in sig.parameters or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def load_plugin_class(spec: str):
    """`module:Class` or `path/to/file.py:Class` -> the class object (errors name what is missing)."""
    target, _, cls_name = spec.rpartition(":")
    if not target or not cls_name:
        raise Qwen3LabError(f"backend spec {spec!r}: expected 'module:Class' or 'path/to/file.py:Class'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.exists():
            raise Qwen3LabError(f"backend spec {spec!r}: file {path} not found")
        mod_name = f"qwen3lab_plugin_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
        s = importlib.util.spec_from_file_location(mod_name, path)
        if s is None or s.loader is None:
            raise Qwen3LabError(f"backend spec {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        try:
            s.loader.exec_module(module)
        except Exception as e:  # the user's file: report its error as one line, not a traceback
            raise Qwen3LabError(f"backend spec {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise Qwen3LabError(f"backend spec {spec!r}: cannot import module {target!r} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise Qwen3LabError(f"backend spec {spec!r}: {target} has no attribute {cls_name!r}")
    if not callable(getattr(cls, "run", None)):
        raise Qwen3LabError(f"backend spec {spec!r}: {cls_name} has no run(input_ids, graft=None) method")
    return cls


def _accepted(cls, spec: str, options: dict[str, str]) -> dict[str, str]:
    """--candidate-opt key=value pairs, each one a parameter of the plugin's constructor (else an error naming
    the ones it takes)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    bad = sorted(set(options) - set(params))
    if bad:
        takes = ", ".join(p for p in params if p != "model_path") or "nothing"
        raise InputError(f"--candidate-opt {bad[0]}: {spec}'s constructor takes no such option (it takes {takes})")
    return dict(options)


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
    if spec == "llama.cpp" or spec.startswith("llama.cpp:"):
        return _llama_cpp(spec, model_path, cfg, dtype, role, options or {})
    if options and not (":" in spec and not spec.startswith("dump:")):
        raise InputError(f"--candidate-opt is for plugins (module:Class, file.py:Class); the {role} is {spec!r}")
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
    if spec.startswith("dump:"):
        path = Path(spec[5:])
        b = DumpBackend(path, cfg, name_map=name_map, isolated=isolated)
        cfg_file = None if model_path is None else Path(model_path) / "config.json"
        return Side(b, spec, label=f"dump {path.name} ({b.dtype})", problems=b.problems(cfg_file, dtype))
    if ":" in spec:
        cls = load_plugin_class(spec)
        opts = {"device": device, "dtype": dtype}
        try:
            sig = inspect.signature(cls)
            if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
                opts = {k: v for k, v in opts.items() if k in sig.parameters}
        except (TypeError, ValueError):
            opts = {}
        opts = {k: v for k, v in opts.items() if v is not None}
        opts.update(_accepted(cls, spec, options or {}))
        try:
            obj = cls(str(model_path) if model_path is not None else None, **opts)
        except Qwen3LabError:
            raise  # already one clear line
        except Exception as e:  # noqa: BLE001 - the user's constructor
            raise Qwen3LabError(plugin_raised(role, spec, f"{cls.__name__}({model_path!s}, {opts})", e)) from None
        b = PluginBackend(obj, cfg, spec, dtype, role)
        return Side(b, spec, label=f"{spec} ({b.dtype})")
    raise Qwen3LabError(f"unknown backend {spec!r}; use one of {', '.join(BUILTIN)}, dump:FILE, module:Class "
                        f"or path/to/file.py:Class")


def _llama_cpp(spec: str, model_path: Path | None, cfg: Qwen3Config | None, dtype: str | None, role: str,
               options: dict[str, str]) -> Side:
    """`llama.cpp:MODEL.gguf` (or `llama.cpp`: the checkpoint converted at --dtype) through llama.cpp itself
    (backends/llama_cpp.py), its nodes named through the built-in llama.cpp name map."""
    from ..backends.llama_cpp import LlamaCppCandidate  # loads libllama.so: only when asked for
    from .namemap import NameMap

    if cfg is None:
        if model_path is None:
            raise Qwen3LabError(f"backend {spec!r} needs --model-path for the model's config.json")
        cfg = Qwen3Config.from_file(model_path)
    unknown = set(options) - {"kv", "threads"}
    if unknown:
        raise InputError(f"--candidate-opt {', '.join(sorted(unknown))}: the llama.cpp candidate takes kv=f16|f32|"
                         f"bf16|q8_0 and threads=N")
    gguf = spec.partition(":")[2] or None
    obj = LlamaCppCandidate(model_path, gguf, dtype=dtype if gguf is None else None, cfg=cfg,
                            name_map=NameMap.load("llama.cpp"), **options)
    obj.check(cfg)
    b = PluginBackend(obj, cfg, spec, obj.dtype, role)
    b.name = obj.name
    return Side(b, spec, label=f"{obj.name} ({b.dtype})")
