"""--plot: a report's figures as bar charts (matplotlib), one panel per figure, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..guards import write_atomic
from .report import IMPLS, PLOT_FIGURES


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
