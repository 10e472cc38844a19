"""`qwen3lab verify ...` as a function the CLI calls: `run_verify_command(**options) -> exit code`.
Imports inside functions are on purpose: a NumPy-only or dump-only verify never loads torch or transformers.

Exit codes: 0 everything compared passes (self-test: every planted bug named); 1 a divergence was found
(self-test: a bug missed or a false alarm); 2 usage or input error (printed as one line, no traceback).

Options (the CLI flag is the option name with dashes): model_path, reference ("numpy"), candidate
("torch"; "torch-fast" is the fast CPU path), device ("cpu"), dtype (candidate's; None = its default, float32
for torch and torch-fast; "int8" / "int4" = those weights, torch-fast only), test_input, ids
("1,2,3"), layers ("0-4"), decode_steps, isolate (None = automatic, True/False), output (JSON path),
html (HTML path), cos_min, mse_max, rel_max, preset ("simple"), taps ("layer" | "sublayer" | "all": rows of
the terminal table), probs (also compare attention probs), stream (None = automatic), sweep, self_test,
export_reference (write the reference's taps as a dump and stop: export.py), isolated ("dump:FILE", the candidate
dump's run on the reference's inputs), name_map (--map: a TOML file or "llama.cpp", namemap.py), kv_dtype
(the candidate's KV-cache dtype, tolerances.py), band (per-tap noise-floor thresholds, band.py), save_baseline /
baseline / jsonl (a port's CI, baseline.py), candidate_opt (["key=value"]: a plugin's constructor options),
repro (DIR: the first failing op as a standalone NumPy script, repro.py), text (FILE: teacher-forced
KL / top-1 / perplexity figures over a text instead of the tap comparison, quality.py).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..errors import Qwen3LabError
from .report_terminal import ROWS, RichProgress, render
from .side import BUILTIN

KNOWN = {"model_path", "reference", "candidate", "device", "dtype", "test_input", "ids", "layers", "decode_steps",
         "isolate", "output", "html", "cos_min", "mse_max", "rel_max", "preset", "taps", "probs", "stream",
         "sweep", "self_test", "quantised_reference", "ndev", "export_reference", "isolated", "name_map", "kv_dtype",
         "band", "save_baseline", "baseline", "jsonl", "candidate_opt", "repro", "text"}


def run_verify_command(console: Console | None = None, **opts) -> int:
    console = console or Console()
    err = Console(stderr=True)
    unknown = sorted(set(opts) - KNOWN)
    if unknown:
        err.print(f"error: unknown verify option(s): {', '.join(unknown)}", style="red", soft_wrap=True)
        return 2
    try:
        return _run(console, **opts)
    except Qwen3LabError as e:
        err.print(f"error: {e}", style="red", highlight=False, markup=False, soft_wrap=True)
        return 2


def _run(console: Console, model_path=None, reference="numpy", candidate="torch", device="cpu", dtype=None,
         test_input=None, ids=None, layers=None, decode_steps=0, isolate=None, output=None, html=None,
         cos_min=None, mse_max=None, rel_max=None, preset=None, taps="layer", probs=False, stream=None,
         sweep=False, self_test=False, quantised_reference=False, ndev=1, export_reference=None, isolated=None,
         name_map=None, kv_dtype=None, band=False, save_baseline=None, baseline=None, jsonl=None,
         candidate_opt=(), repro=None, text=None) -> int:
    from ..paths import resolve_model_path

    # before anything runs: a report that cannot be written must not cost the whole (possibly hour-long) run
    outputs = _check_outputs(output, html)
    from ..guards import check_output_file

    jsonl, save_baseline = (check_output_file(p, o) if p else None
                            for o, p in (("--jsonl", jsonl), ("--save-baseline", save_baseline)))
    taps = taps or "layer"
    if taps not in ROWS:
        raise Qwen3LabError(f"--taps {taps!r}: choose one of {', '.join(ROWS)}")
    if test_input is not None and ids is not None:
        raise Qwen3LabError("give either --test-input or --ids, not both")
    if sweep and self_test:
        raise Qwen3LabError("give either --sweep or --self-test, not both")
    decode_steps = int(decode_steps or 0)
    if self_test and isinstance(candidate, str) and candidate.split(":")[0] == "llama.cpp":
        from .gguf_zoo import self_test as gguf_self_test  # llama.cpp's bindings: only when asked for

        return gguf_self_test(console, model_path, candidate, candidate_opt)
    if self_test:
        return _self_test(console, model_path)
    needs_model = model_path is not None or any(
        s in BUILTIN for s in (reference, candidate) if isinstance(s, str))
    path = resolve_model_path(model_path) if needs_model else None
    if path is not None and layers is not None:
        _check_layers(path, layers)
    if text:
        from .quality import run_text

        q = run_text(text, reference, candidate, path, device=device, dtype=dtype, candidate_opts=candidate_opt)
        for line in q.lines():
            console.print(line, highlight=False)
        return 0
    if export_reference:
        return _export(console, export_reference, reference, path, ids, test_input, decode_steps, probs, layers)
    tol_kw = dict(preset=preset, cos_min=cos_min, mse_max=mse_max, rel_max=rel_max)
    if sweep:
        from .sweep import run_sweep

        cells = run_sweep(path, input_ids=ids, test_input=test_input, layers=layers, console=console, probs=probs,
                          decode_steps=decode_steps, isolate=isolate, **tol_kw)
        return 0 if all(c.report is not None and c.report.overall_success for c in cells) else 1

    from .runner import verify

    tp = None
    if int(ndev or 1) > 1:  # the candidate split over ndev ranks, its taps gathered to full shapes
        candidate, tp = _tensor_parallel(candidate, path, int(ndev), device, dtype)
    try:
        rep = verify(reference, candidate, ids, model_path=path, test_input=test_input, device=device, dtype=dtype,
                     layers=layers, decode_steps=decode_steps, isolate=isolate, probs=probs, stream=stream,
                     progress=RichProgress(), quantised_reference=quantised_reference, name_map=name_map,
                     isolated=isolated, kv_dtype=kv_dtype, band=band, candidate_opts=list(candidate_opt or ()),
                     **tol_kw)
    finally:
        if tp is not None:
            tp.close()
    return _report(console, rep, taps, outputs, save_baseline, baseline, jsonl, repro, path)


def _tensor_parallel(candidate, path, ndev: int, device: str, dtype):
    """--ndev N: the torch candidate as N tensor-parallel ranks (models/tp_run.py)."""
    from ..models.tp_backend import TPBackend
    from ..models.tp_run import start_local
    from ..runspec import RunSpec

    if candidate != "torch":
        raise Qwen3LabError(f"--ndev {ndev} runs the torch candidate tensor parallel; got --candidate {candidate!r}")
    spec = RunSpec.make(device, dtype or "float32", fast=False, ndev=ndev, cli=True)
    tp = start_local(path, ndev, device=spec.device, dtype=spec.torch_dtype)
    return TPBackend(tp), tp


def _report(console, rep, taps, outputs, save_baseline, baseline, jsonl, repro, path) -> int:
    render(rep, console, rows=taps)
    for option, p in outputs:
        console.print(f"wrote {_write_report(rep, option, p)}")
    if repro:
        from pathlib import Path

        from .repro import write_repro

        console.print(write_repro(rep, Path(repro), path), highlight=False)
    return _ci(console, rep, save_baseline, baseline, jsonl, rep.overall_success)


def _ci(console: Console, rep, save_baseline, baseline, jsonl, ok: bool) -> int:
    """--jsonl, --save-baseline, --baseline (baseline.py): a regression since the baseline fails the run."""
    from .baseline import regressions, write_baseline, write_jsonl

    if jsonl:  # both checked writable before the run
        console.print(f"wrote {write_jsonl(rep, jsonl)}")
    if save_baseline:
        console.print(f"wrote {write_baseline(rep, save_baseline)}")
    if baseline:
        grown = regressions(rep, baseline)
        for line in grown:
            console.print(f"[red]regressed since the baseline:[/] {line}", highlight=False)
        if not grown:
            console.print(f"no tap's error grew beyond noise since the baseline {baseline}")
        ok = ok and not grown
    return 0 if ok else 1


def _export(console: Console, out, reference, path, ids, test_input, decode_steps, probs, layers) -> int:
    """--export-reference: the reference's taps as a dump, for a port's isolated run (export.py)."""
    from ..guards import check_output_file
    from .export import export_reference

    if path is None:
        raise Qwen3LabError("--export-reference needs --model-path (the model the port runs)")
    written, n = export_reference(check_output_file(out, "--export-reference"), reference, ids, model_path=path,
                                  test_input=test_input, decode_steps=decode_steps, probs=probs, layers=layers)
    console.print(f"wrote {written}: {n} reference taps ({reference}), input_ids and positions in the dump format")
    return 0


def _check_outputs(output, html) -> list:
    """[(option, path)] of the reports to write, each checked writable (guards.check_output_file)."""
    from pathlib import Path

    from ..guards import check_output_file

    chosen = [(o, check_output_file(p, o)) for o, p in (("--output", output), ("--html", html)) if p]
    if len(chosen) == 2 and Path(chosen[0][1]).resolve() == Path(chosen[1][1]).resolve():
        raise Qwen3LabError(f"--output and --html are the same file {chosen[0][1]}; give two paths")
    return chosen


def _write_report(rep, option: str, path):
    """The JSON (--output) or HTML (--html) report, renamed into place when complete (guards.write_atomic)."""
    from ..guards import write_atomic
    from .report_html import write_html
    from .report_json import write_json

    write = write_json if option == "--output" else write_html
    return write_atomic(path, lambda tmp: write(rep, tmp), option)


def _check_layers(path, layers) -> None:
    """--layers against the checkpoint's layer count, from config.json, before any backend loads."""
    from ..config import Qwen3Config
    from .runner import parse_layers

    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is not None and cfg_file.is_file():
        parse_layers(layers, Qwen3Config.from_file(path).num_hidden_layers)


def _self_test(console: Console, model_path=None, moe_path=None, power: bool = True) -> int:
    """The bug zoo on tiny / tiny-moe models (or the given models), plus the correct torch model in float64,
    float32 and bfloat16, which must pass with no false alarm; then (power) the detection-power table."""
    import tempfile
    from pathlib import Path

    from rich import box

    from ..config import Qwen3Config
    from ..fast import build
    from .bugzoo import BUGS, KERNEL_BUGS
    from .runner import verify
    from .zoo import Zoo, zoo_models

    ids = [9707, 11, 419, 374, 264, 1273, 1946, 13]  # "Hello, this is a test input." in Qwen3's vocab
    with tempfile.TemporaryDirectory(prefix="qwen3lab-zoo-") as tmp:
        dense, moe = (Path(model_path), Path(moe_path)) if model_path and moe_path else zoo_models(tmp)
        if model_path is not None and moe_path is None:
            dense = Path(model_path)
            if Qwen3Config.from_file(dense).is_moe:
                moe = dense
        zoo = Zoo.from_paths(dense, moe, "float64")
        console.print(f"bug zoo: each bug planted in the torch model (float64), verified against the NumPy "
                      f"oracle on {dense.name} / {moe.name}, {len(ids)} tokens")
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
        table.add_column("candidate")
        table.add_column("culprit named by verify", no_wrap=True)
        table.add_column("", no_wrap=True)
        ok = True
        kernel_bugs = KERNEL_BUGS if build.kernels() is not None else []
        for bug in BUGS + kernel_bugs:
            r = zoo.check(bug, ids)
            ok &= r.found
            where = f" (torch-fast float32, {build.path()} kernels)" if bug.fast else ""
            table.add_row(bug.title + where, r.culprit or "none",
                          "[green]right[/]" if r.found else f"[red]MISSED[/] (expected {bug.expected[0]})")
        if not kernel_bugs:
            table.add_row(f"kernel bugs: skipped ({build.status()})", "", "")
        for dt in ("float64", "float32", "bfloat16"):
            for kind in ("dense", "moe"):
                rep = verify(zoo.reference(kind == "moe"), zoo.candidate(None, kind == "moe", dt), ids,
                             decode_steps=2)
                good = rep.overall_success
                ok &= good
                fd = rep.first_divergence
                table.add_row(f"no bug: torch {dt} ({kind}, decode 2)", fd.name if fd else "none",
                              "[green]pass[/]" if good else "[red]FALSE ALARM[/]")
    console.print(table)
    if power:
        ok &= _power_table(console, bool(kernel_bugs))
    console.print("[bold green]self-test passed: every planted bug named, no false alarm[/]" if ok
                  else "[bold red]self-test FAILED[/]")
    return 0 if ok else 1


def _power_table(console: Console, fast_ok: bool) -> bool:
    """Detection power (power.py) on Qwen3-0.6B shapes (1 layer, vocab 4096: both bugs start in layer 0): per
    dtype, the smallest bug of each scalable kind verify catches; False when a clean run raised a false alarm."""
    import tempfile
    from pathlib import Path

    from rich import box

    from ..make_model import make_model
    from .power import BUGS, detection_power, fmt_eps

    ids = [9707 % 4096, 11, 419, 374, 264, 1273, 1946, 13]
    with tempfile.TemporaryDirectory(prefix="qwen3lab-power-") as tmp:
        path = make_model(Path(tmp) / "power", preset="qwen3-0.6b", layers=1, vocab_size=4096, seed=1)
        rows = detection_power(path, ids, fast_ok=fast_ok)
    console.print(f"detection power: the smallest eps (ladder 1e-4 .. 1000, bisection) at which verify catches "
                  f"layer 0's ffn_down weight x (1 + eps) and every RMSNorm's eps x (1 + eps); NumPy float64 oracle "
                  f"as reference, Qwen3-0.6B shapes (1 layer, vocab 4096), {len(ids)} tokens")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for col in ("candidate", "clean run", *BUGS.values()):
        table.add_column(col, overflow="fold")  # piped at 80 columns: wrap, never cut a figure
    good = True
    for r in rows:
        if r.clean_ok is None:
            table.add_row(r.dtype, f"skipped: {r.clean_note}", "", "")
            continue
        good &= r.clean_ok
        clean = "[green]pass[/]" if r.clean_ok else f"[red]FALSE ALARM[/] at {r.clean_note}"
        table.add_row(r.dtype, clean, *(fmt_eps(r.smallest.get(b)) if r.clean_ok else "-" for b in BUGS))
    console.print(table)
    return good
