"""`--compare torch`: the same tiny weights through the torch model and the NumPy oracle, tap by tap.

The comparison itself is `qwen3lab.verify` (per-tap metrics against the candidate dtype's tolerance, the
first divergence in dataflow order, and -- when a tap fails -- the isolation run that names the culprit
op); this module adds what tiny mode is for: every difference matrix (candidate − oracle) printed in
full, so a person sees which token, head and channel went wrong. Any backend object can stand in for
the torch model (tests hand in a deliberately broken one).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from ..taps import dataflow_key, tap_sites
from ..verify import verify
from ..verify.report import fmt
from .printer import format_tap


@dataclass
class CompareResult:
    report: object  # verify.VerifyReport
    diffs: dict[str, np.ndarray]  # tap -> candidate − reference (same-shape taps only)
    text: str

    @property
    def passed(self) -> bool:
        return bool(self.report.overall_success)

    @property
    def first_divergence(self) -> str | None:
        r = self.report.first_divergence
        return r.name if r is not None else None

    @property
    def culprit(self) -> str | None:
        return self.report.culprit.name if self.report.culprit is not None else None

    def to_json(self) -> dict:
        rep = self.report
        return {
            "reference": rep.reference, "candidate": rep.candidate, "dtype": rep.dtype,
            "tolerance": rep.tolerance.to_dict(), "passed": self.passed,
            "first_divergence": self.first_divergence, "culprit": self.culprit, "isolation": rep.isolation,
            "sentence": rep.sentence(),
            "taps": {r.name: {"status": r.status, "origin": r.origin, "reasons": r.reasons,
                              **({k: _j(v) for k, v in r.metrics.to_dict().items()} if r.metrics else {})}
                     for r in rep.results},
        }


_AXIS = {"token": "t", "head": "h", "channel": "c", "position": "s", "expert": "e", "vocab": "v"}


def _loc(loc: dict | None) -> str:
    return "-" if not loc else " ".join(f"{_AXIS.get(k, k)}{v}" for k, v in loc.items())


def _j(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def torch_candidate(cfg, weights: dict[str, np.ndarray], dtype: str = "float32", device: str = "cpu"):
    import torch  # torch and the torch model (a second to import) only when a torch candidate is asked for

    from ..models.torch_model import TorchBackend

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    return TorchBackend(cfg, tensors, device=device, dtype=dtype)


def compare(cfg, reference, candidate, input_ids: list[int], precision: int = 4, width: int = 80
            ) -> CompareResult:
    """verify(reference, candidate) over every tap (probs included), plus the printed difference matrices."""
    report = verify(reference=reference, candidate=candidate, input_ids=list(input_ids), probs=True)
    names = tap_sites(cfg, probs=True)
    ref = reference.run(input_ids, taps=names).taps
    cand = candidate.run(input_ids, taps=names).taps
    diffs, routing = {}, {}
    for n in names:
        if n not in ref or n not in cand or np.shape(ref[n]) != np.shape(cand[n]):
            continue
        if n.endswith("topk_idx"):  # expert ids: a difference of ids means nothing; show both sides
            routing[n] = (np.asarray(cand[n]).astype(np.int64), np.asarray(ref[n]).astype(np.int64))
        else:
            diffs[n] = np.asarray(cand[n], dtype=np.float64) - np.asarray(ref[n], dtype=np.float64)
    return CompareResult(report, diffs, _render(report, diffs, routing, precision, width))


def _render(report, diffs: dict[str, np.ndarray], routing: dict, precision: int, width: int) -> str:
    tol = report.tolerance
    out = [f"{report.candidate} vs {report.reference}",
           f"tolerance ({tol.name}): cosine >= {tol.cos_min:.12g}, relative error <= {tol.rel_max:g}"
           + (f", MSE <= {tol.mse_max:g}" if tol.mse_max is not None else ""), ""]
    rows = []
    for r in report.results:
        m = r.metrics
        rows.append((r.name, r.status + (f":{r.origin}" if r.origin else ""),
                     fmt(m.relative_error if m else None), fmt(m.max_abs_error if m else None),
                     _loc(m.max_abs_location if m else None)))
    w = [max(len(row[i]) for row in [("tap", "status", "rel err", "max |diff|", "at"), *rows]) for i in range(5)]
    for row in [("tap", "status", "rel err", "max |diff|", "at"), *rows]:
        out.append(f"{row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:>{w[2]}}  {row[3]:>{w[3]}}  {row[4]}")
    out.extend(textwrap.wrap("at: t token, h head, c channel, s key position, e expert, v vocab id. fail:op = the "
                             "tap's own op fails on the oracle's inputs; fail:inherited = it only received a wrong "
                             "input.", width))
    out.append("")
    out.append("Difference matrices (candidate − oracle), every element:")
    for name in sorted([*diffs, *routing], key=dataflow_key):
        out.append("")
        if name in routing:
            c, r = routing[name]
            if all(set(a) == set(b) for a, b in zip(c.tolist(), r.tolist(), strict=True)):
                out.append(f"{name}  {list(c.shape)}  the same experts at every token")
            else:
                out.append(format_tap(name, c, width=width, what="candidate's experts"))
                out.append(format_tap(name, r, width=width, what="oracle's experts"))
            continue
        # one digit past the point is enough to read an error's size and sign, and 8 columns fit in 80
        out.append(format_tap(name, diffs[name], precision=1, width=width, what="candidate − oracle", sci=True))
    out.append("")
    first = report.first_divergence
    if first is None:
        out.append(f"First differing tap: none -- every tap is within the {tol.name} tolerance.")
    else:
        out.append(f"First differing tap: {first.name} ({'; '.join(first.reasons)})")
        if report.culprit is not None:
            out.append(f"Culprit (its own op fails on the oracle's inputs): {report.culprit.name}")
    out.extend(textwrap.wrap(report.sentence(), width))
    return "\n".join(out)
