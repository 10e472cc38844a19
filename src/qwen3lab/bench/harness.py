"""Benchmark harness shared by `qwen3lab bench attention|moe|generate`.

Notable:
- every clock read is preceded by a device synchronise (`clock(device)`), so CUDA work is never
  half-counted; warmups run first and are not recorded;
- peak memory on CPU is the process RSS high-water mark (`VmHWM`), reset through
  `/proc/self/clear_refs` before each measured phase (tracemalloc does not see torch's allocator);
  on CUDA it is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`;
- a report is one JSON object {bench, machine, settings, results}; each result is a record with
  `bench`, `impl`, `phase`, `case`, `device`, `dtype` and figures (a report may hold several dtypes: the
  ours-vs-HF ratio and --compare match records on all six, dtype included). Figures know their direction
  (FIGURE_DIRECTION) so `compare` can tell a regression from an improvement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import pages
from ..errors import InputError
from ..guards import proc_kb, write_atomic, write_text_atomic
from ..runspec import cpu_flags

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# +1: higher is better, -1: lower is better. Only these keys are "figures" (compared, plotted).
FIGURE_DIRECTION = {
    "tok_per_s": +1,
    "roofline_fraction": +1,
    "bandwidth_gbs": +1,
    "ttft_ms": -1,
    "latency_ms": -1,
    "latency_p90_ms": -1,
    "peak_mem_bytes": -1,
    "peak_growth_x_weights": -1,  # a load's peak memory growth / the weight bytes it loaded
}
# The figure a speedup column is computed from, in order of preference.
PRIMARY_FIGURES = ("tok_per_s", "ttft_ms", "latency_ms")
PLOT_FIGURES = ("tok_per_s", "ttft_ms", "latency_ms", "roofline_fraction", "peak_mem_bytes")
IDENTITY_KEYS = ("bench", "impl", "phase", "case", "device", "dtype")
IMPLS = ("qwen3lab", "hf", "llama.cpp")
PEERS = {"hf": "speedup_vs_hf", "llama.cpp": "speedup_vs_llama_cpp"}  # peer impl -> ours' ratio key


# ---- settings --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """torch.device for --device; a clear error when CUDA is asked for and missing."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'no visible GPU'})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise InputError(f"--device {name}: benchmarks run on cpu or cuda")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_counts(warmups: int, runs: int) -> None:
    if warmups < 0:
        raise InputError(f"--warmups must be >= 0, got {warmups}")
    if runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")


def parse_int_list(text: str | list[int] | tuple[int, ...], option: str) -> list[int]:
    """'128,512' -> [128, 512]; positive integers only."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        try:
            items = [int(s) for s in str(text).replace(" ", "").split(",") if s]
        except ValueError:
            raise InputError(f"{option} {text!r}: expected comma-separated integers, e.g. 128,512") from None
    if not items or any(not isinstance(i, int) or i < 1 for i in items):
        raise InputError(f"{option} {text!r}: expected positive integers")
    return items


# ---- clocks and timing -----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Seconds; the device is synchronised first so queued kernels are counted."""
    sync(device)
    return time.perf_counter()


@dataclass
class Sample:
    """One timed run: total seconds and the marks (seconds from the start) the run reported."""

    total: float
    marks: list[float] = field(default_factory=list)


def run_timed(
    fn: Callable[[Callable[[], float]], Any],
    device: torch.device,
    warmups: int,
    runs: int,
    setup: Callable[[], Any] | None = None,
    progress: Progress | None = None,
    label: str = "",
) -> list[Sample]:
    """Call `fn(mark)` warmups + runs times; `mark()` returns seconds since this run started (synchronised).

    `setup()` (untimed) runs before every call, e.g. to reset a KV cache to its past length.
    """
    samples: list[Sample] = []
    task = progress.add(label, warmups + runs) if progress else None
    with torch.inference_mode():
        for i in range(warmups + runs):
            if setup is not None:
                setup()
            mark = _Marker(device)
            fn(mark)
            total = clock(device) - mark.t0
            marks = mark.marks
            if i >= warmups:
                samples.append(Sample(total, marks))
            if progress:
                progress.advance(task)
    return samples


class _Marker:
    """mark() -> seconds since this run started (device synchronised); the marks are kept in order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []
        self.t0 = clock(device)

    def __call__(self) -> float:
        m = clock(self.device) - self.t0
        self.marks.append(m)
        return m


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


# ---- progress bars ---------------------------------------------------------------------------------
class Progress:
    """rich progress bars on stderr (stdout keeps the table and the JSON line)."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._p = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True, disable=not enabled,
        )

    def __enter__(self) -> Progress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._p.__exit__(*exc)

    def add(self, label: str, total: int):
        return self._p.add_task(label, total=total)

    def advance(self, task) -> None:
        self._p.advance(task)

    def log(self, text: str) -> None:
        self._p.console.print(text, highlight=False)


# ---- memory ----------------------------------------------------------------------------------------
def _status_bytes(key: str) -> int | None:
    return proc_kb("/proc/self/status", key)


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux), else None."""
    return _status_bytes("VmRSS")


class PeakMemory:
    """Peak memory of a phase: `with PeakMemory(device) as pm: ...; pm.peak_bytes`.

    CPU: RSS high-water mark of the whole process (so it includes the interpreter, torch and any model
    still alive), reset on entry. Where the reset is not possible, `reset_ok` is False and the figure is
    the high-water mark since the process started. On entry the C allocator first returns the memory it
    holds free to the kernel (`pages.trim_heap`): otherwise a phase that reuses what an earlier one freed (the
    second model a bench loads) grows RSS by less than it allocates, and its growth reads too low.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None  # resident (CPU) / allocated (CUDA) bytes on entry
        self.reset_ok = True

    def growth_over(self, nbytes: int) -> float | None:
        """(peak - bytes on entry) / nbytes: e.g. a load's peak memory in units of the weights it loaded."""
        if self.peak_bytes is None or self.start_bytes is None or not nbytes or not self.reset_ok:
            return None
        return (self.peak_bytes - self.start_bytes) / nbytes

    def __enter__(self) -> PeakMemory:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            pages.trim_heap()
            self.start_bytes = rss_bytes()
            try:
                # "5" resets the peak RSS counter of this process (Linux >= 4.0).
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            hwm = _status_bytes("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
                self.reset_ok = False
            self.peak_bytes = hwm


# ---- machine ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The SIMD features that decide CPU kernel speed (AVX2 / AVX-512 / bf16 / AMX), as the kernel build reads them."""
    flags = cpu_flags()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    load = loadavg()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": load,  # other work on the machine skews CPU figures: look here first when they jump
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["mem_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        idx = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def busy_warning(report: dict[str, Any]) -> str | None:
    """A sentence when other work shared the CPU during the bench: CPU figures are then unreliable (and a
    thread pool may stall on preempted threads). Judged from the 1-minute load average at the start and at
    the end; at the end the bench's own threads are part of it and are subtracted."""
    m, settings = report["machine"], report.get("settings") or {}
    if not str(settings.get("device", "cpu")).startswith("cpu"):
        return None
    cores = m.get("cores") or 1
    others = []
    if settings.get("loadavg_start"):
        others.append(settings["loadavg_start"][0])
    if m.get("loadavg"):
        others.append(m["loadavg"][0] - (m.get("torch_threads") or 1))
    worst = max(others, default=0.0)
    if worst > 0.5 * cores:
        return (f"other work shared the CPU (about {worst:.1f} busy threads besides this bench on {cores} cores): "
                f"CPU figures are unreliable; rerun when the machine is idle")
    return None


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---- records and reports ---------------------------------------------------------------------------
def make_record(bench: str, impl: str, phase: str, case: str, device: torch.device, dtype: str,
                **figures: Any) -> dict[str, Any]:
    assert impl in IMPLS, impl
    rec: dict[str, Any] = {"bench": bench, "impl": impl, "phase": phase, "case": case,
                           "device": str(device), "dtype": dtype}
    rec.update({k: v for k, v in figures.items() if v is not None})
    return rec


def identity(rec: dict[str, Any]) -> tuple:
    return tuple(rec.get(k) for k in IDENTITY_KEYS)


def add_speedups(results: list[dict[str, Any]]) -> None:
    """Give each qwen3lab record `speedup_vs_hf` (and `speedup_vs_llama_cpp`): per figure, how many times better
    ours is than the peer's (> 1: ours faster / smaller) for its record of the same phase, case, device, dtype."""
    for impl, key in PEERS.items():
        peers = {identity({**r, "impl": "qwen3lab"}): r for r in results if r["impl"] == impl}
        for r in results:
            peer = peers.get(identity(r)) if r["impl"] == "qwen3lab" else None
            if peer is None:
                continue
            sp = {}
            for k, d in FIGURE_DIRECTION.items():
                a, b = r.get(k), peer.get(k)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b > 0:
                    sp[k] = a / b if d > 0 else b / a
            if sp:
                r[key] = {k: round(v, 4) for k, v in sp.items()}


def make_report(bench: str, device: torch.device, settings: dict[str, Any],
                results: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    add_speedups(results)
    report = {"bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(device),
              "settings": settings, "results": results}
    if extra:
        report.update(extra)
    return report


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "peak_mem_bytes":
        return f"{v / 2**20:,.0f} MiB"
    if key == "roofline_fraction":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def print_table(report: dict[str, Any], console=None) -> None:
    """The readable table: one row per record, one column per figure present, and ours ÷ HF."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    results = report["results"]
    figures = [k for k in FIGURE_DIRECTION if any(k in r for r in results)]
    m = report["machine"]
    # device / dtype as columns only when the records differ in them; otherwise in the title
    shared = [c for c in ("device", "dtype") if len({r[c] for r in results}) == 1]
    title = " · ".join([f"qwen3lab bench {report['bench']}", *(str(results[0][c]) for c in shared), m["cpu"],
                        f"{m['torch_threads']} threads", *([m["gpu"]] if m.get("gpu") else []), f"torch {m['torch']}"])
    settings = report.get("settings") or {}
    bw = settings.get("bandwidth")
    if bw:
        title += f" · bandwidth {bw['read_gbs']} GB/s"
    if settings.get("ours_path"):
        title += f" · ours: {settings['ours_path']}"
    if settings.get("prefill_gemm"):
        title += f" · {settings['prefill_gemm']}"
    table = Table(title=title, title_justify="left")
    cols = ["impl", "phase", "case"] + [c for c in ("device", "dtype") if c not in shared]
    for col in cols:
        table.add_column(col)
    units = {"tok_per_s": "tok/s", "ttft_ms": "TTFT ms", "latency_ms": "latency ms", "latency_p90_ms": "p90 ms",
             "peak_mem_bytes": "peak mem", "roofline_fraction": "roofline", "bandwidth_gbs": "GB/s",
             "peak_growth_x_weights": "load peak ×W"}
    for k in figures:
        table.add_column(units.get(k, k), justify="right")
    peers = [impl for impl in PEERS if any(r["impl"] == impl for r in results)] or ["hf"]
    for impl in peers:
        table.add_column(f"ours vs {'HF' if impl == 'hf' else impl} (×, >1 = ours better)", justify="right")
    for r in results:
        ratios = []
        for impl in peers:
            sp = r.get(PEERS[impl], {})
            key = next((k for k in PRIMARY_FIGURES if k in sp), None)
            ratios.append(f"{sp[key]:.2f}× {units[key]}" if key else "")
        table.add_row(*[str(r[c]) for c in cols], *[_fmt(r.get(k), k) for k in figures], *ratios)
    console.print(table)


def emit_json(report: dict[str, Any], json_path: str | None = None) -> None:
    """The report as ONE JSON line on stdout (the last line a bench prints), and in json_path when given."""
    line = json.dumps(report, sort_keys=False, default=str)
    print(line, flush=True)
    if json_path:
        write_text_atomic(json_path, line + "\n", "--json")


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by --json, or a captured stdout whose last JSON line is the report."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--compare {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--compare {p}: cannot read ({e})") from None
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--compare {p}: malformed JSON line ({e.msg} at column {e.colno})") from None
        if not isinstance(report, dict) or not isinstance(report.get("results"), list):
            raise InputError(f"--compare {p}: JSON has no 'results' list; is it a qwen3lab bench report?")
        return report
    raise InputError(f"--compare {p}: no JSON line found (expected the output of `qwen3lab bench ... --json`)")


# ---- compare ---------------------------------------------------------------------------------------
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
        table.add_row(impl, phase, case, str(dtype), c.figure, _fmt(c.old, c.figure), _fmt(c.new, c.figure),
                      f"{100 * c.change:+.1f}%", f"[{style}]{c.status}[/]" if style else c.status)
    console.print(table)
    for ident in missing:
        console.print(f"[dim]not in {old_path}: {' / '.join(str(x) for x in ident)}[/]")


def regressions(changes: list[Change], impls: tuple[str, ...] = ("qwen3lab",)) -> list[Change]:
    """The regressions that fail the run: ours only (HF moving is the machine, not us; it is shown)."""
    return [c for c in changes if c.status == "REGRESSION" and c.record[1] in impls]


# ---- plot ------------------------------------------------------------------------------------------
def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """One panel per figure present; grouped bars per (phase, case), one colour per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    figures = [k for k in PLOT_FIGURES if any(k in r for r in results)]
    if not figures:
        raise InputError(f"--plot {path}: the report has no figures to draw")
    fig, axes = plt.subplots(len(figures), 1, figsize=(10, 2.8 * len(figures)), squeeze=False)
    colors = {"qwen3lab": "tab:blue", "hf": "tab:orange", "llama.cpp": "tab:green"}
    several = len({r["dtype"] for r in results}) > 1  # a multi-dtype report: one group per (phase, case, dtype)
    for ax, k in zip(axes[:, 0], figures, strict=True):
        cases = []
        for r in results:
            if k in r and (r["phase"], r["case"], r["dtype"]) not in cases:
                cases.append((r["phase"], r["case"], r["dtype"]))
        width = 0.8 / len(IMPLS)
        for j, impl in enumerate(IMPLS):
            vals = []
            for ph, cs, dt in cases:
                rec = next((r for r in results if r["impl"] == impl and r["phase"] == ph and r["case"] == cs
                            and r["dtype"] == dt), None)
                v = rec.get(k) if rec else None
                vals.append(float("nan") if v is None else (v / 2**20 if k == "peak_mem_bytes" else v))
            xs = [i + (j - (len(IMPLS) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, vals, width, label=impl, color=colors[impl])
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{ph}\n{cs}" + (f"\n{dt}" if several else "") for ph, cs, dt in cases], fontsize=7)
        ax.set_ylabel("peak MiB" if k == "peak_mem_bytes" else k)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"qwen3lab bench {report['bench']} · {m['cpu']} · {m.get('gpu') or 'no GPU'}", fontsize=10)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), "--plot")
    finally:
        plt.close(fig)



@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (None: leave torch's setting)."""
    if n is None:
        yield
        return
    if n < 1:
        raise InputError(f"--threads must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
