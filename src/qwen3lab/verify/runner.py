"""verify(): reference run, candidate run, comparison, isolation run; streaming when the model is large.
Imports inside functions are on purpose: a NumPy-only or dump-only verify never loads torch or transformers.

Order of work, and what is held in memory:
1. the reference runs once; its taps go to a store (a dict, or .npy files on disk past `stream_bytes`);
2. the candidate runs; each tap is compared the moment it is made (taps sink) and dropped, so only its
   metrics stay (plus the arrays of the first failing tap, for the HTML plots);
3. if a tap failed and the candidate can graft, it runs again on the reference's taps (isolation, see
   isolate.py), compared the same way.
Decode (`decode_steps` > 0): the candidate's KV-cache steps (run_decode) against the reference's full
recompute at each position (its run_decode; for backends without one, one full run per step).
MoE: when the candidate's expert choices differ from the reference's only at near ties, the reference is
re-run routed as the candidate was (routing.py) and everything is compared with that run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..taps import CACHE_SITES, dataflow_key, reference_cache_tap, split_name, split_steps, tap_sites
from .band import band_for_run
from .compare import FAILING, Comparator, TapResult, layer_selected
from .inputs import DEFAULT_TEST_INPUT as DEFAULT_TEST_INPUT  # re-exported (qwen3lab.verify)
from .inputs import estimate_bytes, is_dump, load_name_map, parse_layers, parse_options, resolve_input_ids
from .isolate import attach_isolated, label_origins
from .quantref import quantised_reference_side
from .report import VerifyReport
from .side import Side, resolve
from .store import DiskStore, MemoryStore, Without
from .tolerances import Tolerance, tolerance_for

STREAM_BYTES = 1 << 30  # spill the reference's taps to disk past this estimated size


class Progress:
    """Progress events of a verify run (no-op); report_terminal has a rich progress bar with this API."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, n: int = 1) -> None: ...

    def stop(self) -> None: ...


def _same_config(a: Qwen3Config, b: Qwen3Config) -> list[str]:
    da, db = a.to_hf_dict(), b.to_hf_dict()
    return [f"config field {k!r}: reference {da.get(k)!r}, candidate {db.get(k)!r}"
            for k in sorted(set(da) | set(db)) if k != "torch_dtype" and da.get(k) != db.get(k)]


def verify(reference="numpy", candidate="torch", input_ids=None, *, model_path=None, test_input: str | None = None,
           device: str = "cpu", dtype: str | None = None, reference_dtype: str | None = None,
           layers=None, decode_steps: int = 0, isolate: bool | None = None, probs: bool = False,
           tolerance: Tolerance | None = None, preset: str | None = None, cos_min: float | None = None,
           mse_max: float | None = None, rel_max: float | None = None, stream: bool | None = None,
           stream_bytes: int = STREAM_BYTES, progress: Progress | None = None,
           quantised_reference: bool = False, name_map=None, isolated: str | None = None,
           kv_dtype: str | None = None, band: bool = False, candidate_opts=None) -> VerifyReport:
    """Compare `candidate` against `reference` tap by tap; find the first divergence and the culprit op.

    reference / candidate: a spec string ("numpy", "torch", "hf", "dump:FILE", "module:Class",
    "file.py:Class") or a backend object. input_ids: list of ints (or "1,2,3"); else `test_input` is
    tokenized; else a dump's own ids; else "Hello, this is a test input". `dtype`/`device` are the
    candidate's; the reference runs in float64 unless `reference_dtype` says otherwise. `layers`: "0-4",
    [0, 1] or None (all). `isolate`: None = when a tap fails and the candidate can graft. `probs`: also
    compare the attention probabilities (O(T*S) memory). Tolerance: `tolerance`, else `preset` ("simple"),
    else per-dtype defaults, then cos_min / mse_max / rel_max override. `stream`: None = automatic
    (reference taps spilled to disk past `stream_bytes`). `quantised_reference`: for a candidate with quantised
    weights (torch-fast --dtype int8 / int4), the NumPy oracle runs on the same weights quantised by the
    format's rules (models/numpy_quant.py) and the tolerance is that of the candidate's activations: the port's
    arithmetic is checked, not the format's rounding loss. `name_map`: a map file or built-in name
    ("llama.cpp") for dumps with foreign names (namemap.py); `isolated`: "dump:FILE" (or FILE), the candidate
    dump's isolated twin (its ops run on the reference's inputs, export.py), which labels taps op/inherited.
    `kv_dtype`: the candidate's KV-cache dtype (else the dump's), loosening the taps after the cache (tolerances.py);
    `band`: per-tap thresholds from the reference's spread at the candidate's precision (band.py; prefill only);
    `candidate_opts`: {key: value} or ["key=value"] for a plugin's constructor.
    """
    progress = progress or Progress()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    path = Path(model_path) if model_path is not None else None
    if path is not None and not (path / "config.json").exists():
        raise InputError(f"{path}: no config.json (expected a checkpoint directory)")
    cfg = Qwen3Config.from_file(path) if path is not None else None
    ref_dt = reference_dtype or "float64"
    nmap = load_name_map(name_map)
    ref = resolve(reference, path, cfg, device=device if reference == "torch" else "cpu", dtype=ref_dt,
                  role="reference", name_map=nmap if is_dump(reference) else None)
    cfg = cfg or ref.cfg
    cand = resolve(candidate, path, cfg, device=device, dtype=dtype, role="candidate",
                   name_map=nmap if is_dump(candidate) or not is_dump(reference) else None, isolated=isolated,
                   options=candidate_opts if isinstance(candidate_opts, dict) else parse_options(candidate_opts))
    if quantised_reference:
        ref, cand.precision = quantised_reference_side(reference, cand, path)  # at its activations' tolerance
    timings["load_s"] = time.perf_counter() - t
    problems = ref.problems + cand.problems + _same_config(ref.cfg, cand.cfg)

    ids, text = resolve_input_ids(input_ids, test_input, path, (cand, ref), cfg)
    sel = parse_layers(layers, cfg.num_hidden_layers)
    T = len(ids)
    if not isinstance(decode_steps, int) or not 0 <= decode_steps < T:
        raise InputError(f"--decode-steps must be in 0..{T - 1} for {T} input tokens (one prefill token at "
                         f"least), got {decode_steps!r}")
    if decode_steps and not cand.supports_decode:
        raise InputError(f"candidate {cand.spec!r} has no KV-cache decode (run_decode); drop --decode-steps")
    tol = tolerance or tolerance_for(cand.precision, ref.precision, preset=preset, cos_min=cos_min,
                                     mse_max=mse_max, rel_max=rel_max,
                                     kv_dtype=kv_dtype or getattr(cand.backend, "kv_dtype", None))
    names = tap_sites(cfg, probs=probs, layers=sel)
    tol, band_note = band_for_run(tol, ref, cand, path, ids, names, decode_steps) if band else (tol, None)

    ref_names = names
    if sel is not None:
        # the layer before each selected one: its output is what the isolation run grafts into the layer
        extra = [f"layers.{i - 1}.resid_post" for i in sel if i > 0 and i - 1 not in sel]
        ref_names = sorted(set(names) | set(extra), key=dataflow_key)
    if stream is None:
        stream = estimate_bytes(cfg, ref_names, T) * max(1, decode_steps) > stream_bytes
    report = VerifyReport(cfg=cfg, reference=ref.label, candidate=cand.label, dtype=cand.dtype, tolerance=tol,
                          input_ids=ids, results=[], model_path=str(path) if path else None, test_input=text,
                          layers=sel, decode_steps=decode_steps, problems=problems, timings=timings,
                          kernels=_kernels_of(cand.backend))
    if band_note:
        report.notes.append(band_note)
    run = _DecodeRun if decode_steps else _PrefillRun
    run(report, ref, cand, ids, names, ref_names, sel, stream, progress).go(isolate)
    for side in (ref, cand):  # tensors not compared or not in the canonical shape, and why (backends/check.py)
        report.notes += side.notes(names, decode_steps, None if sel is None else set(sel))
    return report


def _kernels_of(backend) -> dict[str, str] | None:
    """The kernel of every leaf kind of our torch model (verify runs exactly these), None for other backends
    (an HF candidate also has a `.model`, a transformers one: it is not ours to describe)."""
    from ..fast import describe  # here, not at the top: a NumPy-only verify need not import torch
    from ..models.torch_model import Qwen3LMHeadModel

    model = getattr(getattr(backend, "inner", backend), "model", None)  # BuggyBackend wraps a TorchBackend
    return describe(model) if isinstance(model, Qwen3LMHeadModel) else None


class _PrefillRun:
    def __init__(self, report: VerifyReport, ref: Side, cand: Side, ids, names, ref_names, sel, stream, progress):
        self.report, self.ref, self.cand, self.ids = report, ref, cand, np.asarray(ids, dtype=np.int64)
        self.names, self.ref_names, self.sel, self.stream, self.progress = names, ref_names, sel, stream, progress
        # what backends are asked for: "all" when that is the same set (their pattern matching is then free)
        every = sel is None and not any(n.endswith(".probs") for n in names)
        self.select, self.ref_select = ("all", "all") if every else (names, ref_names)
        self.sel_set = None if sel is None else set(sel)
        extra = [n for n in getattr(cand.backend, "cache_taps", ()) if layer_selected(n, self.sel_set)]
        if extra:  # KV-cache contents the candidate holds: asked of it by name, derived for the reference
            self.select = sorted(set(names) | set(extra), key=dataflow_key)
        self.store = DiskStore() if stream else MemoryStore()
        self.own_routing: dict[str, np.ndarray] = {}  # reference's own expert choice when routing is pinned
        self.routing: dict[str, np.ndarray] = {}  # the candidate's expert choice, per topk_idx tap

    def go(self, isolate: bool | None) -> None:
        try:
            self._go(isolate)
        finally:
            self.progress.stop()
            self.store.close()

    def _reference(self) -> None:
        t = time.perf_counter()
        self.progress.start("reference", len(self.ref_names))

        def keep(name: str, arr: np.ndarray) -> None:
            self.store.put(name, arr)
            self.progress.advance("reference")

        res = self.ref.run(self.ids, self.ref_select, sink=keep)
        for k, v in res.taps.items():  # backends that returned a dict instead of streaming
            keep(k, v)
        self.report.timings["reference_s"] = time.perf_counter() - t

    def _compare_run(self, phase: str, graft=None) -> dict[str, TapResult]:
        """Run the candidate, comparing each tap against the store as it arrives."""
        t = time.perf_counter()
        comp = Comparator(self.report.cfg, self.report.tolerance, grafted=graft is not None)
        out: dict[str, TapResult] = {}
        first: list = []
        self.progress.start(phase, len(self.names))

        def check(name: str, arr: np.ndarray) -> None:
            self.progress.advance(phase)
            if not layer_selected(name, self.sel_set):
                return
            r = out[name] = self._compare_tap(comp, name, arr)
            if r.status == "fail" and not first:
                first.append((name, np.array(arr), np.array(self.own_routing.get(name, self._ref_of(name)))))

        self.cand.run(self.ids, self.select, graft=graft, sink=check)
        self.report.timings[f"{phase}_s"] = self.report.timings.get(f"{phase}_s", 0.0) + time.perf_counter() - t
        if phase == "candidate":
            self.routing = comp.candidate_routing()
        if first:
            if phase == "candidate":
                self.report.divergence_arrays = first[0]
            else:
                self.report.culprit_arrays = first[0]
        return out

    def _ref_of(self, name: str):
        """The reference's tap (a KV-cache tap derived from its k_rot / v rows), or None."""
        ref = self.store.get(name)
        if ref is None and split_name(name)[2] in CACHE_SITES:
            ref = reference_cache_tap(self.store.get, name)
        return ref

    def _compare_tap(self, comp: Comparator, name: str, arr) -> TapResult:
        """One candidate tap against the reference. At a layer whose routing was pinned (routing.py), topk_idx
        is compared with the reference's own choice and the later topk_weight aligned to the pinned run."""
        own = self.own_routing.get(name)
        ref = self._ref_of(name) if own is None else own
        r = comp.compare(name, arr, None if ref is None else np.asarray(ref))
        if own is not None and name in self.store:
            comp.align_weights_to(name, self.store[name])
        return r

    def _go(self, isolate: bool | None) -> None:
        rep = self.report
        self._reference()
        plain = self._compare_run("candidate")
        ties = _near_ties(plain)
        if ties and self.ref.can_host_session:
            self._pin_routing(ties)
            plain = self._compare_run("candidate")
        wanted = set(self.names)
        for name in self.store:  # taps the candidate never produced
            if name not in plain and name in wanted:
                plain[name] = TapResult(name, "missing", shape=list(np.shape(self.store[name])),
                                        reasons=["the candidate does not provide this tap"])
        rep.results = sorted(plain.values(), key=lambda r: dataflow_key(r.name))
        self._isolate(isolate, plain)

    def _pin_routing(self, ties: dict[str, int]) -> None:
        """Re-run the reference routed as the candidate was (routing.py); later comparisons use that run."""
        from .routing import PinRouting

        rep = self.report
        t = time.perf_counter()
        self.store.close()
        self.store = DiskStore() if self.stream else MemoryStore()
        self.progress.start("pinned reference", len(self.ref_names))

        def keep(name: str, arr: np.ndarray) -> None:
            self.store.put(name, arr)
            self.progress.advance("pinned reference")

        pin = PinRouting(self.ref_select, keep, self.routing, rep.cfg)
        self.ref.run_in(pin, self.ids)
        self.own_routing = pin.own
        rep.timings["pinned_reference_s"] = time.perf_counter() - t
        rep.notes.append(_pinned_note(ties, "tokens per layer", "re-run"))

    def _isolate(self, isolate: bool | None, plain: dict[str, TapResult]) -> None:
        rep = self.report
        failing = any(r.status in FAILING for r in rep.results)
        if not failing:
            rep.isolation = "not needed: no tap failed"
        elif isolate is False:
            rep.isolation = "turned off"
        elif not self.cand.supports_graft:
            hint = " (give its isolated twin with --isolated dump:FILE)" if is_dump(self.cand.spec) else ""
            rep.isolation = f"the candidate {self.cand.spec} cannot run on grafted reference taps{hint}"
        else:
            # taps whose shape does not match cannot be grafted (and would make the graft raise)
            bad = {r.name for r in rep.results if r.status in ("shape_mismatch", "invalid")}
            graft = Without(self.store, bad) if bad else self.store
            try:
                iso = self._run_isolated(graft)
            except Qwen3LabError as e:
                rep.isolation = f"the grafted run failed: {e}"
                rep.problems.append(f"isolation run failed: {e}")
                return
            attach_isolated(plain, iso)
            rep.isolation = "ran"
        rep.culprit = label_origins(rep.results) if rep.isolation == "ran" else None
        if rep.isolation != "ran":
            for r in rep.results:
                if r.status in ("shape_mismatch", "invalid"):
                    r.origin = "op"

    def _run_isolated(self, graft) -> dict[str, TapResult]:
        return self._compare_run("isolation", graft=graft)


def _near_ties(results: dict[str, TapResult]) -> dict[str, int]:
    """topk_idx taps whose differing tokens all chose at near ties: {tap: tokens}."""
    return {n: r.metrics.near_tie_tokens for n, r in results.items()
            if r.site == "topk_idx" and r.metrics is not None and r.metrics.near_tie_tokens}


def _pinned_note(ties: dict[str, int], per: str, how: str) -> str:
    where = ", ".join(f"{n.rsplit('.', 1)[0]}: {k}" for n, k in ties.items())
    return (f"MoE routing: some tokens chose other experts than the reference at near ties (router logits within "
            f"their own error; {per}: {where}); the reference was {how} routed as the candidate was, and the taps "
            f"are compared with that run")


class _DecodeRun(_PrefillRun):
    """Prefill + decode steps: whole dicts (decode taps are one row each; nothing large to stream)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.store.close()  # the prefill run may have made a DiskStore (its temp dir): not used here
        self.store = MemoryStore()
        self.steps = self.report.decode_steps

    def _go(self, isolate: bool | None) -> None:
        rep = self.report
        t = time.perf_counter()
        self.progress.start("reference", 1)
        r = self.ref.run_decode(self.ids, self.steps, self.ref_select)
        self.store.update(r.taps)
        self.progress.advance("reference")
        rep.timings["reference_s"] = time.perf_counter() - t
        plain = self._compare("candidate", None)
        ties = _near_ties(plain)
        if ties and self.ref.can_host_session:
            self._pin_routing_decode(ties)
            plain = self._compare("candidate", None)
        rep.results = sorted(plain.values(), key=lambda r: dataflow_key(r.name))
        self._isolate(isolate, plain)

    def _pin_routing_decode(self, ties: dict[str, int]) -> None:
        """The pinned reference as a full recompute over the whole sequence (what a KV cache must reproduce),
        with each position routed as the candidate routed it (prefill rows, then one row per step), sliced
        into prefill and per-step taps the way a decode run records them."""
        from .routing import PinRouting

        rep, P = self.report, len(self.ids) - self.steps
        t = time.perf_counter()
        whole: dict[str, np.ndarray] = {}
        for name, idx in self.routing.items():
            if split_name(name)[0] is None:
                rows = [idx] + [self.routing.get(f"step{j}.{name}") for j in range(self.steps)]
                if all(r is not None for r in rows):
                    whole[name] = np.concatenate([np.asarray(r).reshape(-1, idx.shape[-1]) for r in rows])
        full: dict[str, np.ndarray] = {}
        pin = PinRouting(self.ref_select, full.__setitem__, whole, rep.cfg)
        self.ref.run_in(pin, self.ids)
        self.store = MemoryStore(split_steps(full, P, self.steps))
        self.own_routing = split_steps(pin.own, P, self.steps)
        rep.timings["pinned_reference_s"] = time.perf_counter() - t
        rep.notes.append(_pinned_note(ties, "tokens per tap", "recomputed"))

    def _compare(self, phase: str, graft) -> dict[str, TapResult]:
        t = time.perf_counter()
        self.progress.start(phase, 1)
        res = self.cand.run_decode(self.ids, self.steps, self.select, graft=graft)
        self.progress.advance(phase)
        rep = self.report
        comp = Comparator(rep.cfg, rep.tolerance, grafted=graft is not None)
        want = {n for n in self.store if split_name(n)[1] is None or layer_selected(n, self.sel_set)}
        names = sorted({n for n in (*want, *res.taps) if layer_selected(n, self.sel_set)}, key=dataflow_key)
        out = {}
        for n in names:
            if n not in want and n not in res.taps:
                continue
            out[n] = self._compare_tap(comp, n, res.taps.get(n))
            if out[n].status == "fail":
                key = "divergence_arrays" if phase == "candidate" else "culprit_arrays"
                if getattr(rep, key) is None:
                    setattr(rep, key, (n, np.asarray(res.taps[n]), np.asarray(self._ref_of(n))))
        rep.timings[f"{phase}_s"] = rep.timings.get(f"{phase}_s", 0.0) + time.perf_counter() - t
        if phase == "candidate":
            self.routing = comp.candidate_routing()
        return out

    def _run_isolated(self, graft) -> dict[str, TapResult]:
        return self._compare("isolation", graft)


