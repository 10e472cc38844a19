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
from .tolerances import normalize_dtype

_TOP_SITES = ("embed", "final_norm", "logits")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _short(ids: list[int], n: int = 12) -> str:
    return "[" + ", ".join(map(str, ids[:n])) + (f", ... ({len(ids)} ids)]" if len(ids) > n else "]")


def _names(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} tensors)" if len(names) > n else "")


def why_not_a_tap(name: str, cfg: Qwen3Config) -> str | None:
    """Why `name` is no tap of this model (None: it is one, probs and decode steps included)."""
    _, layer, site = _taps.split_name(name)
    if layer is None:
        return None if site in _TOP_SITES else "not a tap name (give a name map with --map)"
    if layer >= cfg.num_hidden_layers:
        return f"layer {layer} does not exist: the model has {cfg.num_hidden_layers} layers"
    if site not in _taps.CACHE_SITES and f"layers.{layer}.{site}" not in _taps.layer_sites(cfg, layer, probs=True):
        kind = "MoE" if cfg.is_moe_layer(layer) else "dense"
        return f"not a tap of {kind} layer {layer}"
    return None


class DumpBackend:
    """A tap dump as a backend: run() returns the dump's taps; with an isolated twin, run(graft=...) returns the
    twin's (the port's ops on the reference's inputs)."""

    name = "dump"

    def __init__(self, path: str | Path, cfg: Qwen3Config, name_map=None, isolated: str | Path | None = None):
        self.path = Path(path)
        self.cfg = cfg
        self.name_map = name_map
        self.dropped: dict[str, list[str]] = {}  # why -> tensor names, for the notes
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
                                       dropped=self.dropped if note else {})
        keep = {}
        for k, v in taps.items():
            why = why_not_a_tap(k, self.cfg)
            if why is None:
                keep[k] = v
            elif note:
                self.dropped.setdefault(why, []).append(k)
        return keep, meta

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

    def _check_ids(self, input_ids) -> None:
        ids = [int(i) for i in np.asarray(input_ids).reshape(-1)]
        if self.fixed_input_ids is not None and ids != self.fixed_input_ids:
            raise InputError(
                f"{self.path}: the dump was made for input_ids {_short(self.fixed_input_ids)} but verify was "
                f"asked for {_short(ids)}; run verify with --ids {','.join(map(str, self.fixed_input_ids))} "
                f"(or leave --ids/--test-input out to use the dump's)"
            )

    def _select(self, names, decode: bool, graft) -> dict[str, np.ndarray]:
        src = self.isolated_taps if graft is not None and self.isolated_taps is not None else self.taps
        rec = _taps.record(names)
        return {k: v for k, v in src.items()
                if (decode or _taps.split_name(k)[0] is None) and (names is None or rec.selects(k, optional=True))}

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        self._check_ids(input_ids)
        out = self._select(taps, False, graft)
        logits = out.get("logits", self.taps.get("logits"))
        return RunResult(np.asarray(logits) if logits is not None else np.zeros((0, 0)), out)

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        self._check_ids(input_ids)
        steps = {_taps.split_name(k)[0] for k in self.taps} - {None}
        if not steps:
            raise InputError(f"{self.path}: --decode-steps {decode_steps} was asked for but the dump has no "
                             f"step{{j}}. taps")
        return RunResult(np.asarray(self.taps.get("logits", np.zeros((0, 0)))), self._select(taps, True, graft))

    def uncompared(self, names, decode_steps: int, layers: set[int] | None) -> list[str]:
        """One note per reason some dump tensors were not compared, naming them."""
        why = {k: list(v) for k, v in self.dropped.items()}
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
        return [f"{self.path.name}: {len(v)} tensor(s) not compared, {r}: {_names(v)}" for r, v in why.items()]

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
