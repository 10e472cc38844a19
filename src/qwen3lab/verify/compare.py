"""Tap dict vs tap dict: one TapResult per tap, first divergence, and grouping by layer / sublayer.

A `Comparator` compares one tap at a time so a candidate run can stream its taps through it (taps.record
sink) without holding them all. Statuses:
- `pass` / `fail`: compared against the tolerance (reasons say which threshold broke);
- `shape_mismatch`: both sides have the tap but the shapes differ (both are reported); counts as failing.
  A leading batch dim of 1 on either side is accepted and dropped;
- `invalid`: topk_idx that are not expert ids; counts as failing;
- `missing`: the reference has the tap, the candidate does not (a dump may hold only some taps);
- `no_reference`: the candidate has a tap the reference cannot provide.
Missing and no_reference taps are reported but neither pass nor fail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..taps import dataflow_key, split_name
from .metrics import TapMetrics, axes_for, compare_arrays, compare_topk_idx, compare_topk_weight, valid_expert_ids
from .tolerances import Tolerance, check, for_tap

FAILING = ("fail", "shape_mismatch", "invalid")
ATTN_BLOCK = ("attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "probs", "attn", "attn_out",
              "resid_mid")


@dataclass
class TapResult:
    name: str
    status: str
    shape: list[int] | None = None  # reference shape
    candidate_shape: list[int] | None = None
    metrics: TapMetrics | None = None
    reasons: list[str] = field(default_factory=list)
    origin: str | None = None  # "op" | "inherited" (failing taps, when isolation ran)
    isolated: TapMetrics | None = None  # the same tap from the grafted run (candidate op, reference inputs)
    isolated_status: str | None = None
    isolated_reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool | None:
        if self.status == "pass":
            return True
        return False if self.status in FAILING else None

    @property
    def isolated_failed(self) -> bool:
        return self.isolated_status in FAILING

    @property
    def step(self) -> int | None:
        return split_name(self.name)[0]

    @property
    def layer(self) -> int | None:
        return split_name(self.name)[1]

    @property
    def site(self) -> str:
        return split_name(self.name)[2]


def _strip_batch(x: np.ndarray, ndim: int) -> np.ndarray:
    while x.ndim > ndim and x.shape[0] == 1:
        x = x[0]
    return x


class Comparator:
    """Compares taps one at a time against a tolerance. Keeps the last topk_idx of each side so a
    following topk_weight can be aligned by expert id even when taps stream."""

    def __init__(self, cfg, tol: Tolerance, grafted: bool = False):
        self.cfg = cfg
        self.tol = tol
        # grafted run: the op after topk_idx consumed the reference's ids (the graft pinned them), so the
        # candidate's topk_weight belongs to those ids, not to the topk_idx it recorded
        self.grafted = grafted
        self._idx: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self._router: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # router_logits, for near-tie routing
        self._router_failed: set[str] = set()  # router_logits taps that failed: no near-tie excuse after them

    def align_weights_to(self, idx_name: str, ref_idx: np.ndarray) -> None:
        """The expert ids the reference's topk_weight belongs to, when that is not the topk_idx it was compared
        with (routing pinned: the weights are for the candidate's experts, the comparison used the reference's
        own choice)."""
        c, _ = self._idx.get(idx_name, (None, None))
        self._idx[idx_name] = (c, np.asarray(ref_idx))

    def candidate_routing(self) -> dict[str, np.ndarray]:
        """The candidate's topk_idx of every MoE layer seen so far (to pin the reference's routing to)."""
        return {k: c for k, (c, _) in self._idx.items() if c is not None}

    def compare(self, name: str, cand: np.ndarray | None, ref: np.ndarray | None) -> TapResult:
        if ref is None and cand is None:
            return TapResult(name, "missing", reasons=["neither side has this tap"])
        if ref is None:
            return TapResult(name, "no_reference", candidate_shape=list(np.shape(cand)),
                             reasons=["the reference does not provide this tap"])
        ref = np.asarray(ref)
        if cand is None:
            return TapResult(name, "missing", shape=list(ref.shape),
                             reasons=["the candidate does not provide this tap"])
        cand = np.asarray(cand)
        orig_cand_shape = list(cand.shape)
        cand, ref = _strip_batch(cand, ref.ndim), _strip_batch(ref, cand.ndim)
        res = TapResult(name, "pass", shape=list(ref.shape), candidate_shape=orig_cand_shape)
        if cand.shape != ref.shape:
            res.status = "shape_mismatch"
            res.reasons = [f"candidate shape {tuple(orig_cand_shape)} != reference shape {tuple(ref.shape)}"]
            return res
        site = split_name(name)[2]
        m, why = self._metrics(name, site, cand, ref)
        res.metrics = m
        if m is None:
            res.status, res.reasons = "invalid", why
            return res
        res.reasons = why + check(m, for_tap(self.tol, name, self.grafted), site)
        res.status = "fail" if res.reasons else "pass"
        if site == "router_logits" and res.status == "fail":
            self._router_failed.add(name)
        return res

    def _metrics(self, name: str, site: str, cand: np.ndarray, ref: np.ndarray) -> tuple[TapMetrics | None, list]:
        E = self.cfg.num_experts
        if site == "topk_idx" and E:
            for side, arr in (("candidate", cand), ("reference", ref)):
                bad = valid_expert_ids(arr, E)
                if bad:
                    self._idx[name] = (None, None)
                    return None, [f"{side} topk_idx {bad}"]
            self._idx[name] = (cand, ref)
            rname = name.replace("topk_idx", "router_logits")
            # a failing router cannot excuse its own choices as near ties (its error is the bug, not rounding)
            rl = (None, None) if rname in self._router_failed else self._router.get(rname, (None, None))
            return compare_topk_idx(cand, ref, E, rl[0], rl[1], rel_cap=self.tol.rel_max), []
        if site == "topk_weight" and E:
            ci, ri = self._idx.get(name.replace("topk_weight", "topk_idx"), (None, None))
            if self.grafted and ri is not None:
                ci = ri  # the weights were gathered at the grafted (reference's) experts
            if ci is not None and ri is not None and ci.shape == cand.shape and ri.shape == ref.shape:
                return compare_topk_weight(cand, ref, ci, ri, E), []
            # without both sides' expert ids the weights can only be compared slot by slot
            return compare_arrays(cand, ref, ("token", "slot")), []
        if site == "router_logits":
            self._router[name] = (cand, np.asarray(ref))
        return compare_arrays(cand, ref, axes_for(site, ref.ndim)), []


def layer_selected(name: str, layers: set[int] | None) -> bool:
    if layers is None:
        return True
    layer = split_name(name)[1]
    return layer is None or layer in layers


def compare_taps(cand: dict, ref: dict, cfg, tol: Tolerance, layers: Iterable[int] | None = None) -> list[TapResult]:
    """Every tap of either side (within `layers`) compared, in dataflow order."""
    sel = None if layers is None else set(layers)
    names = sorted({n for n in (*ref, *cand) if layer_selected(n, sel)}, key=dataflow_key)
    comp = Comparator(cfg, tol)
    return [comp.compare(n, cand.get(n), ref.get(n)) for n in names]


def first_failing(results: Iterable[TapResult], isolated: bool = False) -> TapResult | None:
    for r in sorted(results, key=lambda r: dataflow_key(r.name)):
        if (r.isolated_failed if isolated else r.passed is False):
            return r
    return None


def badness(r: TapResult, tol: Tolerance) -> float:
    """How far past its tolerance a tap is (> 1 fails), to pick a group's worst tap."""
    if r.status in ("shape_mismatch", "invalid"):
        return float("inf")
    m = r.metrics
    if m is None:
        return -1.0
    if m.nonfinite_mismatch:
        return float("inf")
    if r.site == "topk_idx" and m.match_fraction is not None:
        return 0.0 if r.passed else 1e6  # near ties only (excused), or a wrong choice
    terms = [m.relative_error / tol.rel_max if tol.rel_max > 0 else (np.inf if m.relative_error > 0 else 0.0),
             (1 - m.cosine_similarity) / max(1 - tol.cos_min, 1e-300)]
    if tol.mse_max:
        terms.append(m.mse / tol.mse_max)
    return float(max(terms))


@dataclass
class Group:
    """A row of the report: a layer (or one of its sublayers), the embedding, or the head."""
    layer_index: int  # -1 for the embedding, num_hidden_layers for final_norm + logits
    layer_name: str
    step: int | None
    taps: list[TapResult]
    worst: TapResult | None = None

    @property
    def compared(self) -> list[TapResult]:
        return [t for t in self.taps if t.passed is not None]

    @property
    def passed(self) -> bool | None:
        c = self.compared
        return None if not c else all(t.passed for t in c)


def group_results(results: list[TapResult], cfg, tol: Tolerance, sublayers: bool = False) -> list[Group]:
    """Group taps into rows: embed, layers.i (or layers.i.attention / layers.i.mlp), head; per decode step."""
    groups: dict[tuple, Group] = {}
    L = cfg.num_hidden_layers
    for r in results:
        step, layer, site = split_name(r.name)
        prefix = "" if step is None else f"step{step}."
        if layer is None:
            idx, label = (-1, "embed") if site == "embed" else (L, "head")
            part = ""
        else:
            idx, label = layer, f"layers.{layer}"
            part = ("attn" if site in ATTN_BLOCK else "mlp") if sublayers else ""
            if part:
                label += f" {part}"
        key = (-1 if step is None else step, idx, part)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(idx, prefix + label, step, [])
        g.taps.append(r)
    out = [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "attn"))]
    for g in out:
        c = g.compared
        if c:
            g.worst = max(c, key=lambda t: (t.passed is False, badness(t, tol)))
    return out
