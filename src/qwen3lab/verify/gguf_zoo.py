"""GGUF-level planted bugs for the llama.cpp candidate (`qwen3lab verify --self-test --candidate llama.cpp[:F.gguf]`).

Each bug edits a copy of a GGUF the way a broken converter or loader would: a tensor's bytes (heads swapped,
a weight scaled or set to one) or a metadata value (RoPE base, RMSNorm epsilon, experts per token), through
llama.cpp's own gguf-py (GGUFReader opened read-write on the copy; float tensors only: F32, F16, BF16).
llama.cpp then runs the edited file as the candidate, against the float64 oracle on the unedited checkpoint,
with isolation; the bug counts as found when verify's culprit is the tap where the edit acts and the taps
after it are labelled `inherited`.

One bug is not in the file: llama.cpp's Qwen3-MoE graph always renormalises the top-k router weights (the
GGUF has no key for it), so "norm_topk_prob ignored" is planted by giving the *reference* a config with
norm_topk_prob false: a port that hard-codes the flag, caught at topk_weight.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends import gguf as _gguf
from ..backends.dump import file_sha256
from ..errors import InputError
from ..models.numpy_ref import NumpyBackend
from .runner import verify


@dataclass
class GgufBug:
    name: str
    expected: tuple[str, ...]  # taps where the edit acts (the culprit must be one of them)
    moe: bool
    edit: Callable  # edit(reader, arch, cfg, ref_taps) on the GGUF copy opened read-write
    config: dict | None = None  # reference-side config change instead of a file edit


def _tensor(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise InputError(f"self-test: the GGUF has no tensor {name!r}")


def _as_float(t) -> tuple[np.ndarray, Callable[[np.ndarray], None]]:
    """A float copy of a tensor's values (numpy shape = ggml ne reversed) and a function writing values back."""
    kind = t.tensor_type.name
    raw = t.data
    if kind == "F32":
        return np.array(raw, dtype=np.float32), lambda v: raw.__setitem__(..., v.astype(np.float32))
    if kind == "F16":
        return np.array(raw, dtype=np.float32), lambda v: raw.__setitem__(..., v.astype(np.float16))
    if kind == "BF16":
        bits = raw.view(np.uint16).reshape(tuple(int(n) for n in reversed(t.shape)))
        return _gguf.bf16_to_f32(bits), lambda v: bits.__setitem__(..., _gguf.f32_to_bf16(v))
    raise InputError(f"self-test: tensor {t.name} is {kind}; GGUF-level bugs are planted in F32 / F16 / BF16 files")


def _scale(name: str, f: float, rows: slice | int = slice(None)):
    def edit(r, arch, cfg, ref):
        v, put = _as_float(_tensor(r, name))
        v[rows] *= f
        put(v)
    return edit


def _swap_heads(name: str, head_dim_of: Callable):
    def edit(r, arch, cfg, ref):
        v, put = _as_float(_tensor(r, name))  # [heads * Dh, D]: head h is rows h*Dh..(h+1)*Dh
        d = head_dim_of(cfg)
        v[:d], v[d:2 * d] = v[d:2 * d].copy(), v[:d].copy()
        put(v)
    return edit


def _ones(name: str):
    def edit(r, arch, cfg, ref):
        v, put = _as_float(_tensor(r, name))
        put(np.ones_like(v))
    return edit


def _meta(key: str, change: Callable):
    def edit(r, arch, cfg, ref):
        field = r.fields.get(key.format(arch=arch))
        if field is None:
            raise InputError(f"self-test: the GGUF has no metadata {key.format(arch=arch)!r}")
        part = field.parts[field.data[0]]
        part[0] = change(part[0])
    return edit


def _scale_used_expert(f: float):
    def edit(r, arch, cfg, ref):  # the expert the first token picks first in layer 0: the edit must be used
        e = int(np.asarray(ref["layers.0.topk_idx"])[0, 0])
        _scale("blk.0.ffn_down_exps.weight", f, e)(r, arch, cfg, ref)
    return edit


def _swap_router_rows(r, arch, cfg, ref):
    """Router rows of layer 0 swapped between the first token's top expert and its least likely one, so the
    swap changes that token's routing (two rows no token picks would change router_logits alone)."""
    logits = np.asarray(ref["layers.0.router_logits"])[0]
    a, b = int(np.argmax(logits)), int(np.argmin(logits))
    v, put = _as_float(_tensor(r, "blk.0.ffn_gate_inp.weight"))  # [E, D]
    v[[a, b]] = v[[b, a]]
    put(v)


def _dh(cfg):
    return cfg.head_dim


BUGS = [
    GgufBug("rope base 1e6 -> 1e4", ("layers.0.q_rot", "layers.0.k_rot"), False,
            _meta("{arch}.rope.freq_base", lambda x: x / 100)),
    GgufBug("RMSNorm eps x10", ("layers.0.attn_in",), False,
            _meta("{arch}.attention.layer_norm_rms_epsilon", lambda x: x * 10)),
    GgufBug("q heads 0 and 1 swapped", ("layers.0.q",), False, _swap_heads("blk.0.attn_q.weight", _dh)),
    GgufBug("k heads 0 and 1 swapped", ("layers.0.k",), False, _swap_heads("blk.0.attn_k.weight", _dh)),
    GgufBug("v heads 0 and 1 swapped", ("layers.0.v",), False, _swap_heads("blk.0.attn_v.weight", _dh)),
    GgufBug("ffn_down x1.5 (layer 1)", ("layers.1.mlp_out",), False, _scale("blk.1.ffn_down.weight", 1.5)),
    GgufBug("ffn_down x1.02 (layer 1)", ("layers.1.mlp_out",), False, _scale("blk.1.ffn_down.weight", 1.02)),
    GgufBug("q_norm weight -> 1", ("layers.0.q_norm",), False, _ones("blk.0.attn_q_norm.weight")),
    GgufBug("router rows swapped (a used expert)", ("layers.0.router_logits",), True, _swap_router_rows),
    GgufBug("experts per token + 1", ("layers.0.topk_idx", "layers.0.topk_weight"), True,
            _meta("{arch}.expert_used_count", lambda x: x + 1)),
    GgufBug("one used expert x1.5", ("layers.0.mlp_out",), True, _scale_used_expert(1.5)),
    GgufBug("norm_topk_prob ignored (hard-coded)", ("layers.0.topk_weight",), True, lambda *a: None,
            config={"norm_topk_prob": False}),
]


@dataclass
class GgufZooRow:
    bug: GgufBug
    culprit: str | None
    labels: dict[str, str]  # failing tap -> "op" / "inherited"
    sentence: str
    dump_culprit: str | None = None  # the same run written as dumps (plain + isolated twin) through --map llama.cpp
    dump_labels: dict[str, str] | None = None

    @property
    def found(self) -> bool:
        ok = self.culprit in self.bug.expected
        return ok and (self.dump_labels is None or self.dump_culprit in self.bug.expected)


def _reader(path: Path):
    sys.path.insert(0, str(_gguf.home() / "src" / "gguf-py"))  # llama.cpp's own gguf-py, from `make peer`
    try:
        from gguf import GGUFReader  # the peer's package, importable only once the line above ran
    finally:
        sys.path.pop(0)
    return GGUFReader(path, "r+")


def run_bug(bug: GgufBug, model: Path, base_gguf: Path, work: Path, ids: list[int], kv: str = "f32",
            threads: int | None = None, dumps: bool = True) -> GgufZooRow:
    """Plant one bug in a copy of base_gguf (or in the reference's config), verify, and read the labels."""
    ref_dir = model
    if bug.config:
        ref_dir = work / "reference"
        shutil.copytree(model, ref_dir, dirs_exist_ok=True)
        cfg_json = json.loads((ref_dir / "config.json").read_text())
        cfg_json.update(bug.config)
        (ref_dir / "config.json").write_text(json.dumps(cfg_json, indent=2))
    oracle = NumpyBackend.from_pretrained(ref_dir)
    ref_taps = oracle.run(ids, taps="all").taps
    planted = work / f"bug-{base_gguf.name}"
    shutil.copyfile(base_gguf, planted)
    r = _reader(planted)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    bug.edit(r, arch, oracle.cfg, ref_taps)
    r.data.flush()
    del r
    opts = {"kv": kv} if threads is None else {"kv": kv, "threads": str(threads)}
    rep = verify(oracle, f"llama.cpp:{planted}", ids, model_path=ref_dir, isolate=True,
                 candidate_opts=[f"{k}={v}" for k, v in opts.items()])
    labels = {t.name: t.origin for t in rep.results if t.passed is False and t.origin}
    row = GgufZooRow(bug, rep.culprit.name if rep.culprit else None, labels, rep.sentence())
    if dumps:  # the dump path: what a C++ port writes from its own eval callback, plain and isolated
        from ..backends.llama_cpp import LlamaCppCandidate
        from ..backends.namemap import NameMap

        nmap = NameMap.load("llama.cpp")
        port = LlamaCppCandidate(ref_dir, str(planted), kv=kv, threads=threads, cfg=oracle.cfg, name_map=nmap)
        sha = file_sha256(ref_dir / "config.json")
        plain = port.write_dump(ids, work / "port.safetensors", config_sha256=sha)
        iso = port.write_dump(ids, work / "port-isolated.safetensors", graft=ref_taps, config_sha256=sha)
        drep = verify(oracle, f"dump:{plain}", ids, model_path=ref_dir, isolated=f"dump:{iso}", name_map="llama.cpp")
        row.dump_culprit = drep.culprit.name if drep.culprit else None
        row.dump_labels = {t.name: t.origin for t in drep.results if t.passed is False and t.origin}
    return row


def run_zoo(dense: Path, moe: Path | None, dense_gguf: Path | None = None, moe_gguf: Path | None = None,
            ids: list[int] | None = None, kv: str = "f32", log: Callable[[str], None] = print) -> list[GgufZooRow]:
    """Every bug that fits the models given (MoE bugs need the MoE model), each on a fresh copy."""
    ids = ids or [9707, 11, 419, 374, 264, 1273, 1946]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen3lab-gguf-zoo-") as tmp:
        for i, bug in enumerate(BUGS):
            model, base = (moe, moe_gguf) if bug.moe else (dense, dense_gguf)
            if model is None:
                continue
            base = base or _gguf.gguf(model, "float32", log)
            work = Path(tmp) / f"{i}"
            work.mkdir()
            rows.append(run_bug(bug, model, base, work, ids, kv))
            shutil.rmtree(work)
    return rows


def self_test(console, model_path, candidate: str, options) -> int:
    """`verify --self-test --candidate llama.cpp[:F.gguf] [--model-path M]`: the GGUF bugs that fit the model(s),
    then the unedited file, which must pass (no false alarm). Without a GGUF: tiny and tiny-moe checkpoints,
    converted by llama.cpp's converter."""
    from rich import box
    from rich.table import Table

    from ..config import Qwen3Config
    from .zoo import zoo_models

    why = _gguf.missing(library=True)
    if why:
        raise InputError(f"--self-test --candidate llama.cpp: {why}")
    opts = dict(o.split("=", 1) for o in (options or ()))
    kv = opts.get("kv", "f32")
    given = candidate.partition(":")[2] or None
    ids = [9707, 11, 419, 374, 264, 1273, 1946]
    with tempfile.TemporaryDirectory(prefix="qwen3lab-gguf-zoo-") as tmp:
        if given:
            if model_path is None:
                raise InputError("--self-test --candidate llama.cpp:F.gguf needs --model-path (the checkpoint of F)")
            moe = Qwen3Config.from_file(model_path).is_moe
            dense_m, moe_m = (None, Path(model_path)) if moe else (Path(model_path), None)
            dense_g, moe_g = (None, Path(given)) if moe else (Path(given), None)
        else:
            dense_m, moe_m = zoo_models(tmp)
            dense_g = moe_g = None
        console.print(f"GGUF bug zoo: each bug planted in a copy of the GGUF, run by llama.cpp (kv {kv}), verified "
                      f"with isolation against the NumPy oracle; {len(ids)} tokens")
        rows = run_zoo(dense_m, moe_m, dense_g, moe_g, ids, kv, log=console.print)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
        table.add_column("planted in the GGUF", min_width=22)
        for col in ("expected", "culprit named", "labels", "dump path", ""):
            table.add_column(col, no_wrap=True)
        ok = True
        for r in rows:
            n_op = sum(v == "op" for v in r.labels.values())
            n_inh = sum(v == "inherited" for v in r.labels.values())
            ok &= r.found
            d = r.dump_labels or {}
            dump = f"{r.dump_culprit or 'none'}: {sum(v == 'op' for v in d.values())} op, " \
                   f"{sum(v == 'inherited' for v in d.values())} inh"
            table.add_row(r.bug.name, r.bug.expected[0], r.culprit or "none", f"{n_op} op, {n_inh} inh", dump,
                          "[green]right[/]" if r.found else "[red]MISSED[/]")
        for model, base in ((dense_m, dense_g), (moe_m, moe_g)):
            if model is None:
                continue
            base = base or _gguf.gguf(model, "float32", console.print)
            rep = verify("numpy", f"llama.cpp:{base}", ids, model_path=model, decode_steps=2,
                         candidate_opts=[f"kv={kv}"])
            ok &= rep.overall_success
            fd = rep.first_divergence
            table.add_row(f"no bug: {base.name} (decode 2)", "pass", fd.name if fd else "none", "", "",
                          "[green]pass[/]" if rep.overall_success else "[red]FALSE ALARM[/]")
    console.print(table)
    console.print("[bold green]self-test passed: every planted bug named, no false alarm[/]" if ok
                  else "[bold red]self-test FAILED[/]")
    return 0 if ok else 1
