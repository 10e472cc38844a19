"""Name and layout maps (`--map FILE` / `--map llama.cpp`): a foreign port's dump tensors -> canonical taps.

A port's own tensor names (`Qcur-3`, `ffn_moe_logits-1`) and layouts (ggml lists dims fastest first; probs
padded to the KV-cache size) become the canonical taps of the DESIGN.md table. A map is TOML:

    [[tap]]
    name = 'Qcur-(?P<layer>\\d+)'   # regex, full match on the tensor name with any '#k' suffix removed
    op = "ROPE"                     # optional: the tensor's op (dump metadata "ops": {tensor: op}), to tell
                                    # apart nodes that share a name; the '#k' suffix keeps their keys unique
    tap = "layers.{layer}.q_rot"    # the canonical tap; {layer} and other named groups are filled in
    layout = ["reverse", "reshape:T,Hq,Dh"]

Layout steps, applied in order: `reverse` (the file lists the dims in the other order, e.g. ggml's ne: the
bytes are row-major in the reversed shape: a re-view, not a transpose), `permute:2,0,1` (a transpose),
`reshape:T,Hq,Dh` (sizes, symbols or -1), `slice:AXIS:LEN` (the first LEN entries along AXIS, e.g. probs
padded to the KV cache: `slice:2:S`). Symbols: T (rows of this tap: the prefill tokens, or 1 for a decode
step), S (positions attended: the prefill tokens, or prefill + step + 1), D, Hq, Hkv, Dh, I, MI (MoE
intermediate), E, K, V. A named group `step` makes the tap a decode step's (`step{step}.`).
Rules are tried in file order; the first that matches a tensor wins, and when two tensors map to one tap
the earlier rule's is kept. Canonical names pass through unmatched.
Every tensor no rule maps, and every duplicate, is reported by the dump backend as not compared, with why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..errors import DumpError, InputError
from .check import why_not_a_tap

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).with_name("maps")
_SUFFIX = re.compile(r"#\d+$")
_STEPS = ("reverse", "permute", "reshape", "slice")


@dataclass
class Rule:
    regex: re.Pattern
    tap: str
    op: str | None
    layout: list[str]
    where: str  # "FILE rule N", for errors


def builtin_maps() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


class NameMap:
    def __init__(self, rules: list[Rule], source: str):
        self.rules, self.source = rules, source

    @classmethod
    def load(cls, spec: str | Path) -> NameMap:
        """A map file, or the name of a built-in one ("llama.cpp"). Errors name the file, rule and field."""
        path = Path(spec)
        if not path.exists() and str(spec) in builtin_maps():
            path = BUILTIN_DIR / f"{spec}.toml"
        if not path.is_file():
            raise InputError(f"--map {spec}: no such file, and not a built-in map ({', '.join(builtin_maps())})")
        try:
            doc = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"--map {path}: not valid TOML ({e})") from None
        rows = doc.get("tap")
        if not isinstance(rows, list) or not rows:
            raise InputError(f"--map {path}: expected [[tap]] tables (name, tap, optional op and layout)")
        return cls([_rule(path, i, r) for i, r in enumerate(rows)], str(path))

    def match(self, key: str, op: str | None, step: int | None = None) -> tuple[str, Rule] | None:
        """The canonical tap and rule for a foreign tensor `key` (any '#k' suffix ignored) of op `op`, or None.
        step: the tensor is decode step `step`'s (a capture that knows it; the map's own `step` group otherwise)."""
        base = _SUFFIX.sub("", key)
        for rule in self.rules:
            m = rule.regex.fullmatch(base)
            if m and (rule.op is None or op == rule.op):
                g = m.groupdict()
                name = rule.tap.format(**g)
                step = int(g["step"]) if g.get("step") is not None else step
                return (f"step{step}.{name}" if step is not None else name), rule
        return None

    def to_foreign(self, ref: np.ndarray, rule: Rule, shape: tuple[int, ...], name: str, cfg,
                   prefill: int) -> np.ndarray:
        """A canonical tap's array laid out as the foreign tensor of `shape` (a graft written back into a port)."""
        return to_foreign(ref, rule, shape, name, cfg, prefill)

    def wants(self, key: str) -> bool:
        """Whether some rule could map a tensor of this name (its op not known yet)."""
        base = _SUFFIX.sub("", key)
        return any(rule.regex.fullmatch(base) for rule in self.rules)

    def apply(self, taps: dict[str, np.ndarray], meta: dict, cfg, path: Path,
              dropped: dict[str, list[str]], step: int | None = None,
              prefill: int | None = None) -> dict[str, np.ndarray]:
        """The dump's tensors renamed and re-laid-out; unmatched foreign names and duplicates go to `dropped`.
        step / prefill: every tensor is decode step `step`'s, after a `prefill`-token prompt (a capture that
        runs one step at a time, e.g. the llama.cpp candidate)."""
        ops = _ops(meta, path)
        matched: list[tuple[str, str, Rule]] = []  # (canonical, key, rule)
        out: dict[str, np.ndarray] = {}
        for key in taps:
            hit = self.match(key, ops.get(key), step)
            if hit is not None:
                matched.append((hit[0], key, hit[1]))
            else:
                if why_not_a_tap(key, cfg) is None:
                    out[key] = taps[key]  # already canonical
                else:
                    op = f" ({ops[key]})" if key in ops else ""
                    dropped.setdefault(f"no rule of the map {Path(self.source).name} matches", []).append(key + op)
        ids = meta.get("input_ids")
        steps = {_taps.split_name(n)[0] for n, _, _ in matched} - {None}
        if prefill is None:
            prefill = (len(ids) - len(steps)) if ids is not None else None
        order = {id(r): i for i, r in enumerate(self.rules)}
        for name, key, rule in sorted(matched, key=lambda m: order[id(m[2])]):  # earlier rules win duplicates
            if name in out:
                dropped.setdefault("another tensor mapped to the same tap (the earlier rule's is kept)", []).append(key)
                continue
            out[name] = _layout(np.asarray(taps[key]), rule, key, name, cfg, prefill, path)
        return out


def _rule(path: Path, i: int, r) -> Rule:
    where = f"{path} rule {i + 1}"
    if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not isinstance(r.get("tap"), str):
        raise InputError(f"--map {where}: needs string fields 'name' (a regex) and 'tap'")
    unknown = set(r) - {"name", "tap", "op", "layout"}
    if unknown:
        raise InputError(f"--map {where}: unknown field(s) {', '.join(sorted(unknown))} (name, tap, op, layout)")
    try:
        rx = re.compile(r["name"])
    except re.error as e:
        raise InputError(f"--map {where}: name {r['name']!r} is not a regex ({e})") from None
    layout = r.get("layout", [])
    if not isinstance(layout, list) or not all(isinstance(s, str) for s in layout):
        raise InputError(f"--map {where}: layout must be a list of strings like \"reverse\", \"reshape:T,Hq,Dh\"")
    for s in layout:
        if s.split(":", 1)[0] not in _STEPS:
            raise InputError(f"--map {where}: layout step {s!r} is not one of {', '.join(_STEPS)}")
    for field in re.findall(r"{(\w+)}", r["tap"]):
        if field not in rx.groupindex:
            raise InputError(f"--map {where}: tap {r['tap']!r} uses {{{field}}} but name has no group (?P<{field}>...)")
    op = r.get("op")
    return Rule(rx, r["tap"], str(op) if op is not None else None, layout, where)


def _ops(meta: dict, path: Path) -> dict[str, str]:
    raw = meta.get("ops")
    if raw is None:
        return {}
    try:
        ops = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as e:
        raise DumpError(f"{path}: metadata 'ops' is not JSON ({e})") from None
    if not isinstance(ops, dict):
        raise DumpError(f"{path}: metadata 'ops' must be a JSON object {{tensor: op}}")
    return {str(k): str(v) for k, v in ops.items()}


def _symbols(cfg, name: str, prefill: int | None) -> dict[str, int]:
    step = _taps.split_name(name)[0]
    T = 1 if step is not None else prefill
    S = None if prefill is None else (prefill if step is None else prefill + step + 1)
    out = {"D": cfg.hidden_size, "Hq": cfg.num_attention_heads, "Hkv": cfg.num_key_value_heads,
           "Dh": cfg.head_dim, "I": cfg.intermediate_size, "V": cfg.vocab_size,
           "E": cfg.num_experts or 0, "K": cfg.num_experts_per_tok or 0,
           "MI": getattr(cfg, "moe_intermediate_size", 0) or 0}
    if T is not None:
        out.update(T=T, S=S)
    return out


def _size(tok: str, sym: dict[str, int], where: str) -> int:
    tok = tok.strip()
    if tok.lstrip("-").isdigit():
        return int(tok)
    if tok not in sym:
        raise InputError(f"{where}: {tok!r} is not a size or one of {', '.join(sym)} (T and S need the dump's "
                         f"input_ids)")
    return sym[tok]


def _layout(a: np.ndarray, rule: Rule, key: str, name: str, cfg, prefill, path: Path) -> np.ndarray:
    sym = _symbols(cfg, name, prefill)
    for s in rule.layout:
        op, _, arg = s.partition(":")
        where = f"{path}: tensor {key!r} -> {name} ({rule.where}, layout step {s!r}, shape {tuple(a.shape)})"
        try:
            if op == "reverse":
                a = a.reshape(a.shape[::-1])
            elif op == "permute":
                a = np.transpose(a, [int(x) for x in arg.split(",")])
            elif op == "reshape":
                a = a.reshape([_size(x, sym, where) for x in arg.split(",")])
            else:  # slice:AXIS:LEN
                axis, n = arg.split(":")
                a = np.take(a, np.arange(_size(n, sym, where)), axis=int(axis))
        except (ValueError, IndexError, np.exceptions.AxisError) as e:
            raise DumpError(f"{where}: {e}") from None
    return a


def to_foreign(ref: np.ndarray, rule: Rule, shape: tuple[int, ...], name: str, cfg, prefill: int) -> np.ndarray:
    """The inverse of a rule's layout: a canonical tap's array `ref` laid out as the foreign tensor of `shape`
    (what a graft writes back into the port), padding a sliced axis with zeros. Errors name the tap."""
    sym = _symbols(cfg, name, prefill)
    where = f"graft of {name} into a foreign tensor of shape {shape} ({rule.where})"
    before = []  # the shape before each step
    cur = tuple(shape)
    for s in rule.layout:
        before.append(cur)
        op, _, arg = s.partition(":")
        if op == "reverse":
            cur = cur[::-1]
        elif op == "permute":
            cur = tuple(cur[int(x)] for x in arg.split(","))
        elif op == "reshape":
            cur = tuple(np.empty(cur, dtype=np.uint8).reshape([_size(x, sym, where) for x in arg.split(",")]).shape)
        else:
            axis, n = arg.split(":")
            cur = cur[:int(axis)] + (_size(n, sym, where),) + cur[int(axis) + 1:]
    a = np.asarray(ref)
    if a.size != int(np.prod(cur)):
        raise DumpError(f"{where}: the reference has {a.shape}, the map's layout gives {cur}")
    a = a.reshape(cur)
    for s, prev in zip(reversed(rule.layout), reversed(before), strict=True):
        op, _, arg = s.partition(":")
        if op == "permute":
            a = np.transpose(a, np.argsort([int(x) for x in arg.split(",")]))
        elif op == "slice":
            axis = int(arg.split(":")[0])
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, prev[axis] - a.shape[axis])
            a = np.pad(a, pad)
        else:  # reverse / reshape: a re-view of the same row-major bytes
            a = np.ascontiguousarray(a).reshape(prev)
    return np.ascontiguousarray(a)
