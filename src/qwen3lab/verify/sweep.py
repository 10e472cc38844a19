"""`qwen3lab verify --sweep`: the torch backend in float32, bfloat16 and float16 on every available device, and
the fast CPU path (torch-fast) in float32, bfloat16, int8 and int4, against the NumPy float64 oracle, as one
matrix of worst errors. The reference runs once and is reused."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from .report import VerifyReport, fmt

SWEEP_DTYPES = ("float32", "bfloat16", "float16")
FAST_SWEEP_DTYPES = ("float32", "bfloat16", "int8", "int4")  # torch-fast, CPU only


def available_devices() -> list[str]:
    import torch

    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


@dataclass
class SweepCell:
    device: str
    dtype: str
    report: VerifyReport | None
    error: str | None = None
    backend: str = "torch"


class _Cached:
    """A backend whose taps are computed once (the oracle is deterministic) and replayed."""

    def __init__(self, inner):
        self.inner, self.cfg, self.dtype, self.name = inner, inner.cfg, inner.dtype, inner.name
        self._memo: dict = {}

    def run(self, input_ids, taps=None, graft=None):
        key = (tuple(int(i) for i in input_ids), repr(taps), graft is None)
        if graft is not None:
            return self.inner.run(input_ids, taps=taps, graft=graft)
        if key not in self._memo:
            self._memo[key] = self.inner.run(input_ids, taps=taps)
        return self._memo[key]


def run_sweep(model_path, input_ids=None, test_input=None, layers=None, dtypes=SWEEP_DTYPES, devices=None,
              console: Console | None = None, fast_dtypes=FAST_SWEEP_DTYPES, **kw) -> list[SweepCell]:
    from ..loading import load

    console = console or Console()
    ref = _Cached(load(model_path, backend="numpy", dtype="float64"))
    runs = [("torch", dev, dt) for dev in devices or available_devices() for dt in dtypes]
    if devices is None or "cpu" in devices:
        runs += [("torch-fast", "cpu", dt) for dt in fast_dtypes]
    cells = []
    for backend, dev, dt in runs:
        cells.append(_cell(ref, backend, dev, dt, model_path, input_ids, test_input, layers, kw))
    render_sweep(cells, console)
    return cells


def _cell(ref, backend, dev, dt, model_path, input_ids, test_input, layers, kw) -> SweepCell:
    from ..errors import Qwen3LabError
    from .runner import verify

    try:
        rep = verify(ref, backend, input_ids, model_path=model_path, test_input=test_input, device=dev, dtype=dt,
                     layers=layers, **kw)
        return SweepCell(dev, dt, rep, backend=backend)
    except Qwen3LabError as e:
        return SweepCell(dev, dt, None, str(e), backend=backend)
    except RuntimeError as e:  # e.g. a dtype a device's kernels do not implement
        return SweepCell(dev, dt, None, f"{type(e).__name__}: {str(e).splitlines()[0]}", backend=backend)


def render_sweep(cells: list[SweepCell], console: Console) -> None:
    from rich import box

    console.print("torch and torch-fast vs the NumPy float64 oracle: the worst tap per backend, device and dtype")
    failing = any(c.report is not None and not c.report.overall_success for c in cells)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    cols = ["backend", "device", "dtype", "", "worst tap", "rel err", "cosine"]
    cols += ["first divergence / culprit"] if failing else []
    for col in cols:
        table.add_column(col, no_wrap=True)
    for c in cells:
        if c.report is None:
            table.add_row(c.backend, c.device, c.dtype, "[yellow]error[/]", c.error or "", "", "",
                          *([""] if failing else []))
            continue
        r = c.report
        w = r.worst()
        m = w.metrics if w else None
        fd, cu = r.first_divergence, r.culprit
        row = [c.backend, c.device, c.dtype, "[green]PASS[/]" if r.overall_success else "[red]FAIL[/]",
               w.name if w else "-", fmt(m.relative_error) if m else "-", f"{m.cosine_similarity:.6f}" if m else "-"]
        if failing:
            row.append(f"{fd.name if fd else '-'} / {cu.name if cu else '-'}")
        table.add_row(*row)
    console.print(table)
