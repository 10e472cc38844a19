"""--compare: two reports matched record by record, each figure's change judged by its direction against a
tolerance; regressions of our own implementation are what the exit status reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .report import FIGURE_DIRECTION, fmt_figure, identity


@dataclass
class Change:
    record: tuple
    figure: str
    old: float
    new: float
    change: float  # signed relative change, (new - old) / old
    status: str  # "better" | "worse" | "same" | "REGRESSION"


def parse_tolerance(tol: float | str | None) -> float:
    """Percent: 10, '10', '10%' -> 0.10."""
    if tol is None:
        return 0.10
    text = str(tol).strip().rstrip("%")
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"--tolerance {tol!r}: expected a percentage such as 10 or 10%") from None
    if not math.isfinite(v) or v < 0:
        raise InputError(f"--tolerance {tol!r}: must be a non-negative percentage")
    return v / 100.0


def compare_reports(old: dict[str, Any], new: dict[str, Any], tolerance: float) -> tuple[list[Change], list[tuple]]:
    """Per matching record and figure, the change; a figure that got worse by more than `tolerance`
    (a fraction) is a REGRESSION. Returns (changes, identities of new records missing from old)."""
    old_by = {identity(r): r for r in old.get("results", [])}
    changes: list[Change] = []
    missing: list[tuple] = []
    for r in new["results"]:
        o = old_by.get(identity(r))
        if o is None:
            missing.append(identity(r))
            continue
        for k, d in FIGURE_DIRECTION.items():
            a, b = o.get(k), r.get(k)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or a == 0:
                continue
            rel = (b - a) / abs(a)
            worse = -rel * d  # > 0 when the figure moved the bad way
            if worse > tolerance:
                status = "REGRESSION"
            elif worse > 0.005:
                status = "worse"
            elif worse < -0.005:
                status = "better"
            else:
                status = "same"
            changes.append(Change(identity(r), k, float(a), float(b), rel, status))
    return changes, missing


def print_comparison(changes: list[Change], missing: list[tuple], tolerance: float, old_path: str,
                     console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"compared with {old_path} (tolerance {100 * tolerance:g}%)", title_justify="left")
    for col in ("impl", "phase", "case", "dtype", "figure", "old", "new", "change", ""):
        table.add_column(col, justify="right" if col in ("old", "new", "change") else "left")
    colors = {"REGRESSION": "bold red", "worse": "yellow", "better": "green", "same": ""}
    for c in changes:
        _, impl, phase, case, _, dtype = c.record
        style = colors[c.status]
        table.add_row(impl, phase, case, str(dtype), c.figure, fmt_figure(c.old, c.figure), fmt_figure(c.new, c.figure),
                      f"{100 * c.change:+.1f}%", f"[{style}]{c.status}[/]" if style else c.status)
    console.print(table)
    for ident in missing:
        console.print(f"[dim]not in {old_path}: {' / '.join(str(x) for x in ident)}[/]")


def regressions(changes: list[Change], impls: tuple[str, ...] = ("qwen3lab",)) -> list[Change]:
    """The regressions that fail the run: ours only (HF moving is the machine, not us; it is shown)."""
    return [c for c in changes if c.status == "REGRESSION" and c.record[1] in impls]
