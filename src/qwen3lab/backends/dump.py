"""A tap dump as a verify backend: the dump's taps, its isolated twin, and a note for every tensor not compared.

A port in any language writes its taps as one safetensors file (README "Dump format"). This backend:
- checks its metadata against the run: `input_ids` (must equal the ids verified), `positions` (the RoPE
  position of each row: prefill rows then one per decode step, so 0..len(input_ids)-1 for the one sequence
  verify runs; anything else is refused, naming the first row that differs), `config_sha256`, `dtype`;
- reads foreign names through a name map (namemap.py, `--map`) into canonical taps;
- drops, with a note saying why, every tensor that cannot be compared: not a tap name, a layer the model does
  not have, a dense site in a MoE layer (or the reverse), `probs` without --probs, `step{j}.` taps without
  --decode-steps, a layer outside --layers. Nothing in a dump is ignored silently;
- with an isolated twin (`--isolated dump:FILE`: the port's run with each op fed the reference's input,
  written from the reference exported by `--export-reference`) it "can graft": the grafted run is that file,
  and verify labels failing taps `op` / `inherited` as it does for Python backends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..config import Qwen3Config
from ..errors import InputError
from ..models.base import RunResult
from .check import TapCheck
from .dtypes import normalize_dtype


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _short(ids: list[int], n: int = 12) -> str:
    return "[" + ", ".join(map(str, ids[:n])) + (f", ... ({len(ids)} ids)]" if len(ids) > n else "]")


class DumpBackend:
    """A tap dump as a backend: run() returns the dump's taps; with an isolated twin, run(graft=...) returns the
    twin's (the port's ops on the reference's inputs)."""

    name = "dump"

    def __init__(self, path: str | Path, cfg: Qwen3Config, name_map=None, isolated: str | Path | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.name_map = name_map
        self.check = TapCheck(cfg, self.path.name)  # names and shapes (check.py); its notes end in the report
        self.taps, self.meta = self._read(self.path)
        self.dtype = normalize_dtype(self.meta.get("dtype") or _dominant_dtype(self.taps))
        self.kv_dtype = self.meta.get("kv_dtype")
        self.fixed_input_ids = self.meta.get("input_ids")
        self._check_positions(self.path, self.meta)
        self.isolated_path = Path(str(isolated).removeprefix("dump:")) if isolated is not None else None
        self.isolated_taps: dict[str, np.ndarray] | None = None
        if self.isolated_path is not None:
            self.isolated_taps, meta = self._read(self.isolated_path, note=False)
            self._check_positions(self.isolated_path, meta)
            if meta.get("input_ids") is not None and self.fixed_input_ids is not None \
                    and meta["input_ids"] != self.fixed_input_ids:
                raise InputError(f"{self.isolated_path}: the isolated dump was made for input_ids "
                                 f"{_short(meta['input_ids'])} but {self.path} for {_short(self.fixed_input_ids)}")

    @property
    def cache_taps(self) -> list[str]:
        """The KV-cache taps (taps.CACHE_SITES) the dump holds, by their prefill names."""
        return sorted({f"layers.{layer}.{site}" for step, layer, site in map(_taps.split_name, self.taps)
                       if site in _taps.CACHE_SITES})

    @property
    def supports_graft(self) -> bool:
        return self.isolated_taps is not None

    def _read(self, path: Path, note: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        taps, meta = _taps.read_dump(path)
        if self.name_map is not None:
            taps = self.name_map.apply(taps, meta, self.cfg, path=path,
                                       dropped=self.check.dropped if note else {})
        check = self.check if note else TapCheck(self.cfg, path.name)  # the twin's dropped names: not noted twice
        return {k: v for k, v in taps.items() if check.name(k)}, meta

    def _check_positions(self, path: Path, meta: dict) -> None:
        pos, ids = meta.get("positions"), meta.get("input_ids")
        if pos is None:
            return
        want = list(range(len(ids) if ids is not None else len(pos)))
        if pos != want:
            bad = next((i for i, (a, b) in enumerate(zip(pos, want, strict=False)) if a != b), min(len(pos), len(want)))
            got = pos[bad] if bad < len(pos) else "nothing"
            raise InputError(f"{path}: metadata 'positions' row {bad} is {got}, expected {bad}: verify runs one "
                             f"sequence from position 0, one position per input id ({len(want)} ids: prefill rows "
                             f"then one row per decode step)")

    def _check_ids(self, input_ids) -> int:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        if self.fixed_input_ids is not None and ids != self.fixed_input_ids:
            raise InputError(
                f"{self.path}: the dump was made for input_ids {_short(self.fixed_input_ids)} but verify was "
                f"asked for {_short(ids)}; run verify with --ids {','.join(map(str, self.fixed_input_ids))} "
                f"(or leave --ids/--test-input out to use the dump's)"
            )
        return len(ids)

    def _select(self, names, n_ids: int, decode_steps: int, graft) -> dict[str, np.ndarray]:
        """The taps asked for, each through the shape check (a batch of one removed, a wrong shape noted)."""
        src = self.isolated_taps if graft is not None and self.isolated_taps is not None else self.taps
        rec = _taps.record(names)
        return self.check.all({k: v for k, v in src.items()
                               if (decode_steps or _taps.split_name(k)[0] is None)
                               and (names is None or rec.selects(k, optional=True))}, n_ids, decode_steps)

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        n = self._check_ids(input_ids)
        out = self._select(taps, n, 0, graft)
        logits = out.get("logits", self.taps.get("logits"))
        return RunResult(np.asarray(logits) if logits is not None else np.zeros((0, 0)), out)

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        n = self._check_ids(input_ids)
        steps = {_taps.split_name(k)[0] for k in self.taps} - {None}
        if not steps:
            raise InputError(f"{self.path}: --decode-steps {decode_steps} was asked for but the dump has no "
                             f"step{{j}}. taps")
        logits = np.asarray(self.taps.get("logits", np.zeros((0, 0))))
        return RunResult(logits, self._select(taps, n, decode_steps, graft))

    def uncompared(self, names, decode_steps: int, layers: set[int] | None) -> list[str]:
        """One note per reason some dump tensors were not compared, and per wrong shape, naming them."""
        why: dict[str, list[str]] = {}
        rec = _taps.record(names)
        for k in self.taps:
            step, layer, site = _taps.split_name(k)
            if step is not None and (not decode_steps or step >= decode_steps):
                r = ("decode-step taps are compared only with --decode-steps N" if not decode_steps
                     else f"decode step {step} is past --decode-steps {decode_steps}")
            elif layers is not None and layer is not None and layer not in layers:
                r = "outside --layers"
            elif site == "probs" and not rec.selects(k, optional=True):
                r = "attention probs are compared only with --probs"
            else:
                continue
            why.setdefault(r, []).append(k)
        return self.check.lines(extra_dropped=why)

    def problems(self, model_config: Path | None, want_dtype: str | None) -> list[str]:
        out = []
        m = self.meta
        if m.get("format") is None:
            out.append(f"{self.path}: metadata has no 'format' (expected {_taps.DUMP_FORMAT!r}); read as a tap dump")
        got = m.get("config_sha256")
        if got and model_config is not None and model_config.exists():
            mine = {file_sha256(model_config), self.cfg.sha256()}
            if got not in mine:
                out.append(f"{self.path}: config_sha256 {got[:12]}... does not match {model_config} "
                           f"(sha256 {file_sha256(model_config)[:12]}...): the dump may come from another model")
        elif not got:
            out.append(f"{self.path}: metadata has no config_sha256; cannot check it was made from {model_config}")
        if want_dtype and m.get("dtype") and normalize_dtype(m["dtype"]) != normalize_dtype(want_dtype):
            out.append(f"{self.path}: dump dtype {m['dtype']!r} differs from --dtype {want_dtype!r}; "
                       f"tolerances follow the dump's dtype")
        return out


def _dominant_dtype(taps: Mapping[str, np.ndarray]) -> str:
    for v in taps.values():
        if np.issubdtype(np.asarray(v).dtype, np.floating):
            return str(np.asarray(v).dtype)
    return "float32"


def open_dump(rest: str, *, cfg: Qwen3Config, role: str = "candidate", options=None, name_map=None,
              isolated=None, **_) -> DumpBackend:
    """The registry's opener for `dump:FILE` (__init__.py)."""
    if options:
        raise InputError(f"--candidate-opt {next(iter(options))}: a dump takes no options (the {role} is dump:{rest})")
    if not rest:
        raise InputError(f"the {role} 'dump' needs a file: dump:FILE")
    return DumpBackend(Path(rest), cfg, name_map=name_map, isolated=isolated)
