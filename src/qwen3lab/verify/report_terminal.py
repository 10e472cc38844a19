"""The terminal report (rich): one row per layer (`rows="sublayer"`: attention / MLP; `"all"`: every tap),
its worst tap and pass/fail, then the verdict in one sentence. Plus a progress bar for long runs."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .compare import TapResult
from .report import VerifyReport, fmt
from .runner import Progress as ProgressHook
from .tolerances import cos_str

ROWS = ("layer", "sublayer", "all")


def _status(passed: bool | None) -> Text:
    if passed is None:
        return Text("-", style="dim")
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def _origin(taps: list[TapResult]) -> str:
    op = sum(1 for t in taps if t.origin == "op")
    inh = sum(1 for t in taps if t.origin == "inherited")
    parts = ([f"{op} op"] if op else []) + ([f"{inh} inh"] if inh else [])
    return ", ".join(parts)


_SHORT = {"token": "t", "head": "h", "channel": "c", "position": "p", "expert": "e", "vocab": "v", "slot": "k"}


def short_loc(loc: dict | None) -> str:
    return "" if not loc else " ".join(f"{_SHORT.get(k, k)}{v}" for k, v in loc.items())


def _row_cells(label: str, taps: list[TapResult], worst: TapResult | None, passed: bool | None,
               show_site: bool = True) -> list:
    n = sum(1 for t in taps if t.passed is not None)
    nfail = sum(1 for t in taps if t.passed is False)
    miss = sum(1 for t in taps if t.status == "missing")
    status = _status(passed)
    status.append(f" {n - nfail}/{n}" + (f" +{miss} missing" if miss else ""), style="default")
    if worst is None:
        return [label, status, "-", "-", "-", "-", _origin(taps)]
    m = worst.metrics
    site = worst.site if show_site else worst.name
    if m is None:  # shape mismatch / invalid
        return [label, status, site, "-", "-", worst.status, _origin(taps)]
    cos = f"{m.cosine_similarity:.6f}"
    if worst.site == "topk_idx" and m.match_fraction is not None:
        cos = f"{m.match_fraction:.0%} set"
    at = fmt(m.max_abs_error) + (f" @{short_loc(m.max_abs_location)}" if m.max_abs_location else "")
    return [label, status, site, cos, fmt(m.relative_error), at, _origin(taps)]


def render(rep: VerifyReport, console: Console | None = None, rows: str = "layer") -> None:
    console = console or Console()
    tol = rep.tolerance
    console.print(f"[bold]qwen3lab verify[/]: candidate [cyan]{rep.candidate}[/] vs reference "
                  f"[cyan]{rep.reference}[/]" + (f" on {rep.model_path}" if rep.model_path else ""))
    steps = rep.decode_steps
    what = f"{len(rep.input_ids)} tokens" + (f", {steps} decode step{'s' if steps > 1 else ''}" if steps else "")
    if rep.layers is not None:
        what += f", layers {_ranges(rep.layers)}"
    mse = f", MSE <= {tol.mse_max:g}" if tol.mse_max is not None else ""
    console.print(f"{what}; tolerance {tol.name}: cosine >= {cos_str(tol.cos_min)}, relative error <= "
                  f"{tol.rel_max:g}{mse}")
    if rep.kernels:
        console.print("candidate kernels: " + ", ".join(f"{k} {v}" for k, v in rep.kernels.items()))
    for n in rep.notes:
        console.print(f"[cyan]note:[/] {n}")
    for p in rep.problems:
        console.print(f"[yellow]warning:[/] {p}")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    show_origin = any(r.origin for r in rep.results)
    # on a narrow terminal the cosine column goes (the relative error says the same; JSON/HTML keep both)
    show_cos = console.width >= 100 or not console.is_terminal
    cols = [("layer", "left", True), ("taps ok", "left", True), ("worst tap", "left", True),
            ("cosine", "right", show_cos), ("rel err", "right", True), ("max abs @ where", "left", True),
            ("origin", "left", show_origin)]
    keep = [i for i, c in enumerate(cols) if c[2]]
    for i in keep:
        # fold, never cut: a name or number that does not fit wraps onto the next line instead of "2.14e…"
        table.add_column(cols[i][0], justify=cols[i][1], no_wrap=cols[i][0] != "origin", overflow="fold")
    if rows == "all":
        rows_cells = [_row_cells(r.name, [r], r if r.passed is not None or r.metrics else None, r.passed,
                                 show_site=False) for r in rep.results]
    else:
        rows_cells = [_row_cells(g.layer_name, g.taps, g.worst, g.passed)
                      for g in rep.groups(sublayers=rows == "sublayer")]
    for cells in rows_cells:
        table.add_row(*[cells[i] for i in keep])
    # piped (not a terminal): the table at its full width, not rich's 80-column default
    _print_full_width(console, table)
    style = "bold green" if rep.overall_success else "bold red"
    console.print(Text(rep.sentence(), style=style))
    t = rep.timings
    if t:
        console.print("[dim]" + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in t.items()) + "[/]")


def _print_full_width(console: Console, table: Table) -> None:
    """On a terminal: as wide as the terminal (cells fold). Piped: as wide as the table's widest cells side by
    side, so nothing is folded or cut at rich's 80-column default (print(width=) cannot exceed console.width,
    so the console's width is raised for this one print)."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    prev = console._width  # None = rich's default; restored as it was
    console.width = max(console.width, natural)
    try:
        console.print(table)
    finally:
        console._width = prev


def _ranges(ix: list[int]) -> str:
    out, start, prev = [], None, None
    for i in ix + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    return ",".join(out)


class RichProgress(ProgressHook):
    """verify's progress events as a rich progress bar (one bar per phase), shown on a terminal only."""

    def __init__(self, console: Console | None = None, min_taps: int = 200):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.min_taps = min_taps
        self.bar: Progress | None = None
        self.tasks: dict[str, int] = {}

    def start(self, phase: str, total: int) -> None:
        if not self.enabled or total < self.min_taps:
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("taps"), TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
        self.tasks[phase] = self.bar.add_task(phase, total=total)

    def advance(self, phase: str, n: int = 1) -> None:
        if self.bar is not None and phase in self.tasks:
            self.bar.advance(self.tasks[phase], n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
