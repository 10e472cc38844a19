"""The one check of what an adapter hands verify: tap names and shapes, and weight names and shapes.

Every adapter (hf.py, dump.py, plugin.py, and the Side verify wraps our own models in) passes its taps
through `TapCheck`, so a tensor is judged by the same rules wherever it came from:
- its name must be a tap of this model (`why_not_a_tap`: a site of the DESIGN.md table, a layer the model has,
  dense sites in dense layers and MoE sites in MoE layers), else it is dropped with a note saying why;
- a leading batch of one is removed (model code taps [1, T, ...]; the canonical shapes have no batch);
- its shape must be the canonical one for the run (`taps.canonical_shape`: prefill rows T = the prefill tokens,
  a decode step's T = 1 attending over S = prefill + step + 1). A tensor of another shape is kept, so compare
  reports it as `shape_mismatch`, and a note names the shape expected with its symbols ([T, Hq, Dh] = ...).
Adapters that hold weights of their own (transformers' model) check them with `check_weight_shapes`
against `shapes.expected_shapes`, the one place checkpoint names and shapes are spelled out.
Before this module each adapter did its own part of this (the dump its names, the Side the batch dim, compare
the shapes, the HF adapter nothing), so the same bad tensor read differently by backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from .. import taps as _taps
from ..errors import WeightsError
from ..shapes import expected_shapes

_TOP_SITES = ("embed", "final_norm", "logits")
# the canonical shape of each site in symbols (DESIGN.md tap table), for notes
_SYMBOLS = {"q": "T, Hq, Dh", "q_norm": "T, Hq, Dh", "q_rot": "T, Hq, Dh", "attn": "T, Hq, Dh",
            "k": "T, Hkv, Dh", "k_norm": "T, Hkv, Dh", "k_rot": "T, Hkv, Dh", "v": "T, Hkv, Dh",
            "probs": "Hq, T, S", "k_cache": "S, Hkv, Dh", "v_cache": "S, Hkv, Dh",
            "gate": "T, I", "up": "T, I", "act": "T, I", "router_logits": "T, E",
            "topk_idx": "T, K", "topk_weight": "T, K", "logits": "T, V"}
_FUSED = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def why_not_a_tap(name: str, cfg) -> str | None:
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


class TapCheck:
    """Checks one backend's taps (module docstring), keeping the tensors it dropped and the shapes it found wrong.

    `dropped`: why -> tensor names not compared (an adapter may add its own reasons, e.g. a name map's);
    `shapes`: expected shape -> tensors of another shape (kept: compare reports them as shape_mismatch).
    """

    def __init__(self, cfg, source: str):
        self.cfg = cfg
        self.source = source
        self.dropped: dict[str, list[str]] = {}
        self.shapes: dict[str, list[str]] = {}

    def expected(self, name: str, n_ids: int, decode_steps: int = 0) -> tuple[int, ...] | None:
        """The canonical shape of tap `name` in a run of n_ids ids, the last decode_steps of them decode steps
        (None for a decode-step tap the run has no step for: nothing to hold it to)."""
        step = _taps.split_name(name)[0]
        P = n_ids - decode_steps
        if step is None:
            return _taps.canonical_shape(self.cfg, name, P)
        if step >= decode_steps:
            return None
        return _taps.canonical_shape(self.cfg, name, 1, P + step + 1)

    def name(self, name: str) -> bool:
        """Whether `name` is a tap of this model; if not, it is noted as dropped with the reason."""
        why = why_not_a_tap(name, self.cfg)
        if why is not None:
            _add(self.dropped, why, name)
        return why is None

    def one(self, name: str, arr, n_ids: int, decode_steps: int = 0) -> np.ndarray | None:
        """arr in its canonical layout (a batch of one removed), or None when `name` is no tap (noted)."""
        if not self.name(name):
            return None
        arr = np.asarray(arr)
        want = self.expected(name, n_ids, decode_steps)
        if want is None:
            return arr
        arr = strip_batch(self.cfg, name, arr)
        if tuple(arr.shape) != want:
            sym = _SYMBOLS.get(_taps.split_name(name)[2], "T, D")
            _add(self.shapes, f"[{sym}] = {list(want)}", f"{name} {list(arr.shape)}")
        return arr

    def all(self, taps: Mapping[str, np.ndarray], n_ids: int, decode_steps: int = 0) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in taps.items():
            a = self.one(name, arr, n_ids, decode_steps)
            if a is not None:
                out[name] = a
        return out

    def lines(self, extra_dropped: Mapping[str, list[str]] | None = None) -> list[str]:
        """One note per reason a tensor was not compared, and per wrong shape, naming the tensors."""
        dropped = {k: list(v) for k, v in self.dropped.items()}
        for k, v in (extra_dropped or {}).items():
            dropped.setdefault(k, []).extend(v)
        out = [f"{self.source}: {len(v)} tensor(s) not compared, {why}: {_names(v)}" for why, v in dropped.items()]
        out += [f"{self.source}: {len(v)} tensor(s) not in the canonical shape (compared as shape_mismatch): "
                f"{_names(v)}; expected {want}" for want, v in self.shapes.items()]
        return out


def strip_batch(cfg, name: str, arr):
    """arr without the leading batch of one model code taps with (torch: [1, T, ...]); a non-tap name as is."""
    try:
        ndim = len(_taps.canonical_shape(cfg, name, 1))
    except KeyError:
        return arr
    while arr.ndim > ndim and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def unbatched_sink(sink, cfg):
    """sink(name, arr) fed taps without a batch of one (for a taps.Recorder of the caller's making)."""
    return lambda name, arr: sink(name, strip_batch(cfg, name, arr))


def _add(notes: dict[str, list[str]], why: str, name: str) -> None:
    names = notes.setdefault(why, [])
    if name not in names:
        names.append(name)


def _names(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} tensors)" if len(names) > n else "")


def check_weight_shapes(cfg, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """A backend's own weights {hf_name: shape} against the config: WeightsError naming the first missing,
    unexpected or mis-shaped tensor. MoE experts may be per expert or fused (transformers 5:
    `mlp.experts.gate_up_proj` [E, 2*MI, D], `mlp.experts.down_proj` [E, D, MI]); a tied lm_head may be present."""
    want = expected_shapes(cfg, include_lm_head=not cfg.tie_word_embeddings)
    for name in shapes:
        m = _FUSED.match(name)
        if m and int(m[2]) < cfg.num_hidden_layers and cfg.is_moe_layer(int(m[2])):
            E, MI, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
            parts = ("gate_proj", "up_proj") if m[3] == "gate_up_proj" else ("down_proj",)
            for e in range(E):
                for p in parts:
                    want.pop(f"{m[1]}.{e}.{p}.weight", None)
            want[name] = (E, 2 * MI, D) if m[3] == "gate_up_proj" else (E, D, MI)
    if cfg.tie_word_embeddings and "lm_head.weight" in shapes:
        want["lm_head.weight"] = want["model.embed_tokens.weight"]
    missing = [n for n in want if n not in shapes]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing tensor {missing[0]!r} (expected shape {list(want[missing[0]])}){more}")
    extra = [n for n in shapes if n not in want]
    if extra:
        raise WeightsError(f"{source}: unexpected tensor {extra[0]!r} for this config"
                           + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in want.items():
        if tuple(shapes[name]) != tuple(shape):
            raise WeightsError(f"{source}: tensor {name!r} has shape {list(shapes[name])}, expected {list(shape)}")
