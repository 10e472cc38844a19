"""A user's Python backend (`module:Class` or `path/to/file.py:Class`) behind the backend contract.

The class is built as `Class(model_path, **options)`: device / dtype when its constructor takes them, and every
`--candidate-opt key=value` (an option it does not take is an error naming the ones it does). Its
`run(input_ids, graft=None) -> dict[tap name, array]` (and optional `run_decode(input_ids, decode_steps,
graft=None)`) results become RunResults after the shared tap check (check.py: names, batch of one, shapes);
an optional `dtype` attribute labels it, `supports_graft = False` turns isolation off. Whatever the user's code
raises becomes one line naming the plugin and where ("the candidate raised ZeroDivisionError: ... (backend
'port.py:Port', in run())"), never a traceback out of verify.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..models.base import RunResult
from .check import TapCheck
from .dtypes import normalize_dtype


def build_plugin(spec: str, model_path, cfg: Qwen3Config, *, device: str | None = None, dtype: str | None = None,
                 role: str = "plugin", options: Mapping[str, str] | None = None) -> PluginBackend:
    """Import the class of `spec`, build it on model_path with the options it accepts, wrap it."""
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
    return PluginBackend(obj, cfg, spec, dtype, role)


class PluginBackend:
    """A user's class behind the backend contract: its dict of taps becomes a RunResult."""

    def __init__(self, obj, cfg: Qwen3Config, spec: str, dtype: str | None, role: str = "plugin"):
        self.obj = obj
        self.cfg = cfg
        self.name = spec
        self.role = role  # "candidate" / "reference": how its errors name it
        self.check = TapCheck(cfg, spec)  # names, batch of one, shapes (check.py); notes end in the report
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

    def _wrap(self, out, where: str, n_ids: int, decode_steps: int = 0) -> RunResult:
        if isinstance(out, RunResult):
            out.taps = self.check.all(out.taps, n_ids, decode_steps)
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
        arrays = dict(sorted(self.check.all(arrays, n_ids, decode_steps).items(),
                             key=lambda kv: _taps.dataflow_key(kv[0])))
        logits = arrays.get("logits")
        return RunResult(logits if logits is not None else np.zeros((0, 0)), arrays)

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        kw = {"graft": graft} if graft is not None else {}
        res = self._wrap(self._call(self.obj.run, "run()", ids, **kw), "run()", len(ids))
        if taps is not None:
            rec = _taps.record(taps)
            res.taps = {k: v for k, v in res.taps.items() if rec.selects(k, optional=True)}
        return res

    def _run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        kw = {"graft": graft} if graft is not None else {}
        return self._wrap(self._call(self.obj.run_decode, "run_decode()", ids, decode_steps, **kw), "run_decode()",
                          len(ids), decode_steps)

    def uncompared(self, names=None, decode_steps: int = 0, layers=None) -> list[str]:
        """The shared check's notes: tensors dropped (not tap names of this model) and shapes not canonical."""
        return self.check.lines()


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
