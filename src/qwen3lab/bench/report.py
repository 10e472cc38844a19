"""Records and reports: a report is one JSON object {bench, machine, settings, results}; each result a record
with `bench`, `impl`, `phase`, `case`, `device`, `dtype` and figures (a report may hold several dtypes: the
ours-vs-peer ratios and --compare match records on all six). Figures know their direction (FIGURE_DIRECTION)
so a comparison can tell a regression from an improvement. The terminal table, the JSON file, reading one back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..guards import write_text_atomic
from .machine import machine_info

# +1: higher is better, -1: lower is better. Only these keys are "figures" (compared, plotted).
FIGURE_DIRECTION = {
    "tok_per_s": +1,
    "roofline_fraction": +1,
    "roofline_fraction_paired": +1,  # the roofline at the bandwidth read between the decode's steps
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


def fmt_figure(v: Any, key: str) -> str:
    if v is None:
        return "-"
    if key == "peak_mem_bytes":
        return f"{v / 2**20:,.0f} MiB"
    if key in ("roofline_fraction", "roofline_fraction_paired"):
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
             "peak_mem_bytes": "peak mem", "roofline_fraction": "roofline",
             "roofline_fraction_paired": "roofline paired", "bandwidth_gbs": "GB/s",
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
        table.add_row(*[str(r[c]) for c in cols], *[fmt_figure(r.get(k), k) for k in figures], *ratios)
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
