"""Two revisions of the C++ kernels, timed in one process on one decode step's weights: an A/B of a kernel change.

    python benchmarks/ab_kernels.py --against REV [--path avx512] [--dtype bfloat16,float32,int8,int4]
                                    [--preset qwen3-0.6b] [--layers 28] [--rows 1] [--passes 15] [--threads 2]

REV is a git revision (the kernels.cpp and simd.h it holds are built into a temporary directory, then cached in
torch's extension cache as any build) or a directory holding the two files. Both builds run `--path` (one this
CPU has). Each pass times every build once over the same weights, in turn, so a minute when this machine's
memory bandwidth drops slows both; the table gives each build's median and best pass, the weight bytes per
second, and the new build's output against the old one (max relative difference: 0 unless the change
reorders sums). The weights are one decode step's projections: per layer fused qkv, o, fused gate/up, down,
each layer its own tensors so they stream from memory as in a real step, then lm_head (--dtype int8 / int4:
quantised as `--quant` does it; int4 in groups of 128).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from bench_fast_kernels import step_weights  # this directory's script: one decode step's weights

from qwen3lab.fast import build
from qwen3lab.fast.linear import Int4Linear, Int8Linear
from qwen3lab.presets import preset_config
from qwen3lab.runspec import available_paths

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = "src/qwen3lab/fast"


def sources_of(rev: str, into: Path) -> Path:
    """kernels.cpp of `rev` (a directory holding kernels.cpp and simd.h, or a git revision) -> its path."""
    if Path(rev).is_dir():
        return Path(rev) / "kernels.cpp"
    for name in ("kernels.cpp", "simd.h"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{KERNEL_DIR}/{name}"], check=True,
                              capture_output=True).stdout
        (into / name).write_bytes(text)
    return into / "kernels.cpp"


def step_calls(cfg, layers: int, dtype: str, rows: int):
    """(bytes, [fn(kernels) -> y]) for one decode step's projections of `layers` layers and lm_head."""
    act = torch.float32 if dtype == "float32" else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    xs: dict[int, torch.Tensor] = {}
    calls, nbytes = [], 0
    for w in step_weights(cfg, layers, torch.float32):  # float32 [N, K], quantised or converted below
        K = w.shape[1]
        if K not in xs:
            xs[K] = torch.randn(rows, K, generator=g).to(act)
        x = xs[K]
        if dtype == "int8":
            q = Int8Linear.from_float(w)
            nbytes += q.weight.numel() + 4 * q.scale.numel()
            calls.append(lambda k, q=q, x=x: k.linear_small(x, q.weight, q.scale))
        elif dtype == "int4":
            q = Int4Linear.from_float(w, 128)
            nbytes += q.weight.numel() + 4 * q.scales.numel()
            calls.append(lambda k, q=q, x=x: k.linear_q4(x, q.weight, q.scales, 128))
        else:
            w = w.to(act)
            nbytes += w.numel() * w.element_size()
            calls.append(lambda k, w=w, x=x: k.linear_small(x, w, None))
    return nbytes, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the old kernels: a git revision or a directory")
    ap.add_argument("--path", default=None, help="kernel path for both builds (default: the best this CPU has)")
    ap.add_argument("--dtype", default="bfloat16", help="comma-separated: bfloat16, float32, int8, int4")
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None, help="default: the preset's")
    ap.add_argument("--rows", type=int, default=1, help="tokens in the step (1: one sequence's decode)")
    ap.add_argument("--passes", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    have = available_paths()
    path = a.path or have[0]
    if path not in have:
        raise SystemExit(f"--path {path}: this CPU runs {', '.join(have)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset_config(a.preset)
    layers = a.layers or cfg.num_hidden_layers
    with tempfile.TemporaryDirectory() as tmp:
        builds = {"old": build.build_source(path, sources_of(a.against, Path(tmp)), prefix="qwen3lab_ab"),
                  "new": build.build_source(path, build.SOURCE)}
    print(f"{path} kernels, {torch.get_num_threads()} threads, {a.preset} x {layers} layers, {a.rows} row(s), "
          f"old = {a.against}, new = this checkout; medians of {a.passes} interleaved passes")
    for dtype in a.dtype.split(","):
        nbytes, calls = step_calls(cfg, layers, dtype, a.rows)
        times = {n: [] for n in builds}
        for _ in range(a.passes + 1):  # the first pass warms up
            for n, k in builds.items():
                t = time.perf_counter()
                for c in calls:
                    c(k)
                times[n].append(time.perf_counter() - t)
        ys = {n: torch.cat([c(k).float().flatten() for c in calls[:4]]) for n, k in builds.items()}
        diff = float((ys["new"] - ys["old"]).abs().max() / ys["old"].abs().max())
        row = []
        for n in builds:
            med, best = statistics.median(times[n][1:]), min(times[n][1:])
            row.append(f"{n} {med * 1e3:7.2f} ms ({nbytes / med / 1e9:5.1f} GB/s, best {nbytes / best / 1e9:5.1f})")
        old, new = (statistics.median(times[n][1:]) for n in builds)
        print(f"{dtype:9s} " + " | ".join(row) + f" | new/old speed {old / new:.2f}x | max rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
