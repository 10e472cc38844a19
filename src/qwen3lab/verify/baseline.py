"""A port's CI: `--save-baseline FILE` / `--baseline FILE` (regressions since a known run) and `--jsonl FILE`.

A baseline is JSON: the input_ids, candidate and tolerance of a run, and each compared tap's relative error
and 1 - cosine. Against a baseline, a tap has regressed when its relative error grew beyond rounding noise
since then: now > GROWTH x then + FLOOR (FLOOR: float32 rounding of the data itself, so a tap at 0 that moves
to 1e-9 is not flagged). A baseline from other input_ids is refused (the errors would not be comparable).
`--jsonl` writes one JSON record per tap (report_json.tap_dict), in dataflow order, for tools that stream.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import InputError
from .report import VerifyReport
from .report_json import tap_dict

FORMAT = "qwen3lab.verify-baseline"
GROWTH = 1.5
FLOOR = 1e-7


def baseline_dict(rep: VerifyReport) -> dict:
    taps = {r.name: {"relative_error": _finite(r.metrics.relative_error), "one_minus_cos":
                     _finite(1 - r.metrics.cosine_similarity)}
            for r in rep.compared if r.metrics is not None and r.metrics.match_fraction is None}
    return {"format": FORMAT, "input_ids": rep.input_ids, "candidate": rep.candidate,
            "tolerance": rep.tolerance.name, "taps": taps}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def write_baseline(rep: VerifyReport, path: Path) -> Path:
    path.write_text(json.dumps(baseline_dict(rep), indent=1) + "\n")
    return path


def regressions(rep: VerifyReport, path: Path) -> list[str]:
    """One line per tap whose relative error grew beyond noise since the baseline in `path`."""
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--baseline {path}: cannot read it as JSON ({e})") from None
    if not isinstance(base, dict) or base.get("format") != FORMAT or not isinstance(base.get("taps"), dict):
        raise InputError(f"--baseline {path}: not a verify baseline (format {FORMAT!r}; write one with "
                         f"--save-baseline)")
    if base.get("input_ids") != rep.input_ids:
        raise InputError(f"--baseline {path}: made for other input_ids; run with the same --ids as the baseline")
    out = []
    for r in rep.compared:
        then = base["taps"].get(r.name, {}).get("relative_error")
        if then is None or r.metrics is None or r.metrics.match_fraction is not None:
            continue
        now = r.metrics.relative_error
        if not now <= GROWTH * then + FLOOR:
            out.append(f"{r.name}: relative error {now:.3g} (baseline {then:.3g}, allowed {GROWTH * then + FLOOR:.3g})")
    return out


def write_jsonl(rep: VerifyReport, path: Path) -> Path:
    with open(path, "w") as f:
        for r in rep.results:
            f.write(json.dumps(tap_dict(r), allow_nan=False, default=str) + "\n")
    return path
