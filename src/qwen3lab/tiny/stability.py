"""Numerical stability checks over every tap of one run, each ending in a verdict.

Per tap: mean, std, min, max over its finite values and the counts of NaN / Inf, then the checks that
apply to that site:
- every tap: no NaN or Inf (the -inf above the diagonal of `scores` is the causal mask, and is expected);
  no magnitude blow-up: max |x| above BLOWUP_ABS fails; a hidden-state tap whose RMS grew more than
  GROWTH_WARN times the embedding's is a warning;
- `probs`: every row sums to 1, every value in [0, 1], exact zeros above the causal diagonal, and equal
  to softmax of `scores` (which the run recomputes from q_rot and k_rot, so a softmax or mask bug in the
  model shows up here);
- `scores`: -inf exactly above the diagonal and nowhere else;
- RMSNorm outputs (attn_in, mlp_in, q_norm, k_norm, final_norm): divided by their weight, each row has
  RMS sqrt(ms / (ms + eps)) where ms is the mean square of the norm's input tap -- i.e. 1 unless the input
  is tiny next to eps;
- MoE: topk_idx are distinct valid experts, topk_weight in [0, 1] and, with norm_topk_prob, rows sum to 1.
A tap's verdict is "ok", "warn" (growth only) or "FAIL"; the report passes when no tap fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..models.numpy_ref import softmax64
from ..taps import split_name

BLOWUP_ABS = 1e4  # |x| past this in a model whose weights are O(1) means something exploded
GROWTH_WARN = 1e3  # hidden-state RMS vs the embedding's
PROB_TOL = 1e-6  # row sums, [0, 1] bounds, softmax(scores) vs probs
NORM_TOL = 1e-6  # relative error of the unit-RMS check
HIDDEN_SITES = {"attn_out", "resid_mid", "mlp_out", "resid_post"}
NORM_SITES = {"attn_in", "mlp_in", "q_norm", "k_norm"}


@dataclass
class TapCheck:
    name: str
    shape: list[int]
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    nan: int = 0
    inf: int = 0
    problems: list[str] = field(default_factory=list)  # each makes the verdict FAIL
    warnings: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked, for the JSON

    @property
    def verdict(self) -> str:
        return "FAIL" if self.problems else "warn" if self.warnings else "ok"

    def to_json(self) -> dict:
        return {"shape": self.shape, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
                "nan": self.nan, "inf": self.inf, "verdict": self.verdict, "checks": self.checks,
                "problems": self.problems, "warnings": self.warnings}


@dataclass
class StabilityReport:
    taps: list[TapCheck]

    @property
    def passed(self) -> bool:
        return all(t.verdict != "FAIL" for t in self.taps)

    def failures(self) -> list[TapCheck]:
        return [t for t in self.taps if t.verdict == "FAIL"]

    def __getitem__(self, name: str) -> TapCheck:
        for t in self.taps:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> dict:
        first = self.failures()[0].name if self.failures() else None
        return {"passed": self.passed, "first_failure": first,
                "thresholds": {"blowup_abs": BLOWUP_ABS, "growth_warn": GROWTH_WARN, "prob_tol": PROB_TOL,
                               "norm_tol": NORM_TOL},
                "taps": {t.name: t.to_json() for t in self.taps}}


def stats(a: np.ndarray) -> dict:
    """mean/std/min/max over the finite values (None when there are none); NaN and Inf counted apart."""
    a = np.asarray(a, dtype=np.float64)
    fin = a[np.isfinite(a)]
    out = {"shape": list(a.shape), "nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum())}
    if fin.size:
        out.update(mean=float(fin.mean()), std=float(fin.std()), min=float(fin.min()), max=float(fin.max()))
    else:
        out.update(mean=None, std=None, min=None, max=None)
    return out


def _causal_upper(H: int, T: int, S: int) -> np.ndarray:
    """True above the causal diagonal of [H, T, S] (query t sits at position S - T + t)."""
    t = np.arange(T)[:, None] + (S - T)
    s = np.arange(S)[None, :]
    return np.broadcast_to(s > t, (H, T, S))


def _rms_rows(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(a), axis=-1))


def norm_input(cfg, name: str, taps: dict) -> str | None:
    """Name of the tap an RMSNorm output was computed from."""
    _, layer, site = split_name(name)
    if name == "final_norm":
        return f"layers.{cfg.num_hidden_layers - 1}.resid_post"
    if site == "attn_in":
        return "embed" if layer == 0 else f"layers.{layer - 1}.resid_post"
    return {"mlp_in": f"layers.{layer}.resid_mid", "q_norm": f"layers.{layer}.q",
            "k_norm": f"layers.{layer}.k"}.get(site)


def norm_weight(name: str, weights: dict) -> np.ndarray | None:
    _, layer, site = split_name(name)
    key = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm", "q_norm": "self_attn.q_norm",
           "k_norm": "self_attn.k_norm"}.get(site)
    if name == "final_norm":
        return weights.get("model.norm.weight")
    if key is None:
        return None
    return weights.get(f"model.layers.{layer}.{key}.weight")


def check_stability(cfg, taps: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None = None
                    ) -> StabilityReport:
    """Run every check that applies to each tap (see the module docstring)."""
    weights = weights or {}
    emb = taps.get("embed")
    emb_rms = float(_rms_rows(np.asarray(emb, dtype=np.float64)).mean()) if emb is not None else 0.0
    out = []
    for name, a in taps.items():
        a = np.asarray(a)
        site = split_name(name)[2]
        s = stats(a)
        c = TapCheck(name, s["shape"], s["mean"], s["std"], s["min"], s["max"], s["nan"], s["inf"])
        x = a.astype(np.float64)
        masked = _causal_upper(*x.shape) if site == "scores" and x.ndim == 3 else None
        _check_finite(c, x, masked)
        if site not in ("topk_idx",):
            _check_magnitude(c, x, site, emb_rms)
        if site == "probs":
            _check_probs(c, x, taps.get(name[: -len("probs")] + "scores"))
        elif site == "scores":
            _check_scores_mask(c, x, masked)
        elif site in NORM_SITES or name == "final_norm":
            inp = norm_input(cfg, name, taps)
            _check_norm(c, x, norm_weight(name, weights), taps.get(inp) if inp else None, cfg.rms_norm_eps)
        elif site == "topk_idx":
            _check_topk_idx(c, a, cfg)
        elif site == "topk_weight":
            _check_topk_weight(c, x, cfg)
        out.append(c)
    return StabilityReport(out)


def _check_finite(c: TapCheck, x: np.ndarray, masked: np.ndarray | None) -> None:
    c.checks.append("finite")
    nan = np.isnan(x)
    inf = np.isinf(x) if masked is None else np.isinf(x) & ~(masked & (x < 0))
    if nan.any():
        c.problems.append(f"{int(nan.sum())} NaN (first at {_where(nan)})")
    if inf.any():
        c.problems.append(f"{int(inf.sum())} Inf (first at {_where(inf)})")


def _where(mask: np.ndarray) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.argwhere(mask)[0]) + "]"


def _check_magnitude(c: TapCheck, x: np.ndarray, site: str, emb_rms: float) -> None:
    fin = np.abs(x[np.isfinite(x)])
    if not fin.size:
        return
    c.checks.append("magnitude")
    m = float(fin.max())
    if m > BLOWUP_ABS:
        c.problems.append(f"blow-up: max |x| = {m:.3g} > {BLOWUP_ABS:g} (first at {_where(np.abs(x) == m)})")
    if site in HIDDEN_SITES and emb_rms > 0:
        r = float(np.sqrt(np.mean(np.square(x[np.isfinite(x)])))) / emb_rms
        if r > GROWTH_WARN:
            c.warnings.append(f"RMS grew {r:.3g}x over the embedding's (> {GROWTH_WARN:g})")


def _check_probs(c: TapCheck, p: np.ndarray, scores: np.ndarray | None) -> None:
    H, T, S = p.shape
    c.checks += ["rows sum to 1", "in [0, 1]", "zero above causal diagonal"]
    sums = p.sum(-1)
    bad = np.abs(sums - 1.0) > PROB_TOL
    if bad.any():
        h, t = np.argwhere(bad)[0]
        c.problems.append(f"{int(bad.sum())} attention row(s) do not sum to 1 (head {h}, token {t}: "
                          f"sum {sums[h, t]:.6g})")
    out = (p < -PROB_TOL) | (p > 1 + PROB_TOL)
    if out.any():
        c.problems.append(f"{int(out.sum())} probabilities outside [0, 1] (first at {_where(out)}: "
                          f"{p[tuple(np.argwhere(out)[0])]:.6g})")
    upper = _causal_upper(H, T, S)
    leak = upper & (p != 0)
    if leak.any():
        h, t, s = np.argwhere(leak)[0]
        c.problems.append(f"causal mask broken: {int(leak.sum())} non-zero weight(s) above the diagonal "
                          f"(head {h}: token {t} attends to later position {s} with {p[h, t, s]:.4g})")
    if scores is not None:
        c.checks.append("equals softmax(scores)")
        ref = softmax64(np.asarray(scores, dtype=np.float64))
        with np.errstate(invalid="ignore"):
            d = np.abs(ref - p)
        bad = ~(d <= PROB_TOL) & ~(np.isnan(ref) & np.isnan(p))
        if bad.any():
            where = np.argwhere(bad)[0]
            c.problems.append(f"probs differ from softmax(q_rot·k_rot/sqrt(Dh)) by up to {np.nanmax(d):.3g} "
                              f"(first at {[int(i) for i in where]})")


def _check_scores_mask(c: TapCheck, x: np.ndarray, upper: np.ndarray) -> None:
    c.checks.append("-inf exactly above causal diagonal")
    neg = np.isneginf(x)
    if (upper & ~neg).any():
        c.problems.append(f"causal mask broken: {int((upper & ~neg).sum())} score(s) above the diagonal are "
                          f"not masked (first at {_where(upper & ~neg)})")
    if (~upper & neg).any():
        c.problems.append(f"{int((~upper & neg).sum())} score(s) on or below the diagonal are -inf "
                          f"(first at {_where(~upper & neg)})")


def _check_norm(c: TapCheck, y: np.ndarray, w: np.ndarray | None, x: np.ndarray | None, eps: float) -> None:
    if w is None:
        return
    w = np.asarray(w, dtype=np.float64)
    if (w == 0).any() or not np.isfinite(w).all():
        c.warnings.append("unit-RMS check skipped: the norm weight has zero or non-finite channels")
        return
    c.checks.append("unit RMS before weight")
    rms = _rms_rows(y / w)  # [T] or [T, H]
    if x is not None:
        ms = np.mean(np.square(np.asarray(x, dtype=np.float64)), axis=-1)
        expect = np.sqrt(ms / (ms + eps))
    else:
        expect = np.ones_like(rms)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(rms - expect) <= NORM_TOL * np.maximum(expect, 1e-30))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        c.problems.append(f"RMSNorm output / weight has RMS {rms[i]:.6g}, expected {expect[i]:.6g} "
                          f"at {[int(v) for v in i]} ({int(bad.sum())} row(s))")


def _check_topk_idx(c: TapCheck, idx: np.ndarray, cfg) -> None:
    c.checks.append("valid distinct experts")
    if (idx < 0).any() or (idx >= cfg.num_experts).any():
        c.problems.append(f"expert index outside 0..{cfg.num_experts - 1}")
    for t, row in enumerate(np.asarray(idx).astype(np.int64)):
        if len(set(row.tolist())) != len(row):
            c.problems.append(f"token {t} routes to the same expert twice: {row.tolist()}")


def _check_topk_weight(c: TapCheck, w: np.ndarray, cfg) -> None:
    c.checks.append("in [0, 1]")
    if ((w < -PROB_TOL) | (w > 1 + PROB_TOL)).any():
        c.problems.append("routing weights outside [0, 1]")
    if cfg.norm_topk_prob:
        c.checks.append("rows sum to 1")
        bad = np.abs(w.sum(-1) - 1.0) > PROB_TOL
        if bad.any():
            c.problems.append(f"{int(bad.sum())} routing weight row(s) do not sum to 1 (norm_topk_prob)")
