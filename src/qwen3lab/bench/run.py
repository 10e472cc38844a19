"""`run_bench_command(kind, **options) -> exit code`: the one entry point of `qwen3lab bench attention|moe|generate`
and of the scripts in benchmarks/.

Options (keyword names; CLI spelling with dashes):
  common     preset, config, device="cpu", dtype="bfloat16" (one of BENCH_DTYPES; for generate a comma list
             of GENERATE_DTYPES, e.g. "bfloat16,float32,int8", run one after the other), warmups, runs (bench
             defaults when None),
             json (FILE), compare (OLD.json), tolerance (percent, default 10), plot (FILE.png), no_hf,
             threads, seed=0, quiet (no progress bars)
  attention  seqlens="64,128,256,256", past="512,0,0,256", decode_past="50,100,200,400", decode_repeat=4,
             hf_attn="sdpa"
  moe        prefill_tokens="512", decode_tokens="1,8", hf_experts="grouped_mm"
  generate   model (checkpoint dir; default the embedded model), prompt_lens="128,512", batch="1,8",
             new_tokens=64, decode_prompt_len (default the first prompt length), hf_attn="sdpa", no_roofline,
             no_fast (ours on the plain eager model instead of the fast CPU path, to show the fast path's gain)

Output: the table, the comparison (with --compare), then ONE JSON line on stdout. Exit code 0, or 1 when
--compare finds a qwen3lab figure worse than the tolerance. Bad options raise Qwen3LabError subclasses.
`click_options(kind)` decorates a click command with exactly these options (cli.py and benchmarks/ use it).
"""

from __future__ import annotations

import sys
from typing import Any

import click
import torch
from rich.console import Console

from ..config import Qwen3Config
from ..errors import InputError, Qwen3LabError
from ..fast import status, tune
from ..guards import check_memory
from ..presets import preset_config
from . import attention as A
from . import generate as G
from . import moe as M
from .choices import KINDS
from .compare import compare_reports, parse_tolerance, print_comparison, regressions
from .machine import hf_available, loadavg
from .modules import one_layer_config
from .options import (
    DEFAULT_PRESET,
    as_int,
    check_generate,
    check_generate_sizes,
    check_outputs,
    click_options,
    int_list0,
    maybe_list,
    parse_dtypes,
    parse_int_list,
    parse_options,
    shape_text,
)
from .plot import plot_report
from .report import emit_json, load_report, make_report, print_table
from .settings import resolve_device, resolve_dtype, torch_threads
from .timing import Progress, busy_warning


def _config(kind: str, o: dict[str, Any]) -> tuple[Qwen3Config, str]:
    if o["config"] is not None and o["preset"] is not None:
        raise InputError("give --preset or --config, not both")
    if o["config"] is not None:
        return Qwen3Config.from_file(o["config"]), str(o["config"])
    name = o["preset"] or DEFAULT_PRESET[kind]
    return preset_config(name), name


def _hf(o: dict[str, Any], quiet_log) -> bool:
    if o["no_hf"]:
        return False
    if not hf_available():
        quiet_log("transformers is not installed: HF columns skipped (pip install 'qwen3lab[hf]')")
        return False
    return True


def ours_path(device, fast: bool) -> str:
    """Which forward ours runs: the fast CPU path and its kernels (qwen3lab.fast.status()), or plain eager."""
    if not fast:
        return "plain eager (--no-fast)"
    if device.type != "cpu":
        return f"plain eager (the fast path is CPU only; {device})"
    return f"fast ({status()})"


def run_bench_command(kind: str, **options: Any) -> int:
    """Run one bench with CLI-style options; print table (+ comparison) and the JSON line; return the exit code."""
    o = parse_options(kind, options)
    check_outputs(o)  # before any timing: a report that cannot be written must not cost the bench
    if kind == "generate":
        check_generate_sizes(o)
    device = resolve_device(o["device"])
    dtypes = parse_dtypes(o["dtype"], kind)
    if kind == "generate":
        check_generate(dtypes, device, o["no_fast"])
    tolerance = parse_tolerance(o["tolerance"])
    old = load_report(o["compare"]) if o["compare"] else None  # fail early, before minutes of timing

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    hf = _hf(o, log)
    settings: dict[str, Any] = {"device": str(device), "dtype": ",".join(dtypes), "seed": o["seed"], "hf": hf,
                                "loadavg_start": loadavg()}
    if kind == "generate":
        settings.update(dtypes=dtypes, fast=not o["no_fast"], ours_path=ours_path(device, not o["no_fast"]))
    with torch_threads(o["threads"]), Progress(enabled=not o["quiet"]) as progress:
        settings["threads"] = torch.get_num_threads()
        runner = {"attention": _attention, "moe": _moe, "generate": _generate}[kind]
        source, warmups, runs, records, extra = runner(o, device, dtypes, hf, progress, log)
        if kind == "generate" and settings["fast"] and device.type == "cpu":
            settings["prefill_gemm"] = tune.status()  # decided while loading (fast/tune.py)
    settings.update({"source": source, "warmups": warmups, "runs": runs, **extra})
    report = make_report(kind, device, settings, records)
    return finish(report, o, old, tolerance)


def _counts(bench, o: dict[str, Any]) -> tuple[int, int]:
    """--warmups and --runs, each the bench module's default when not given."""
    return (bench.DEFAULT_WARMUPS if o["warmups"] is None else o["warmups"],
            bench.DEFAULT_RUNS if o["runs"] is None else o["runs"])

def _attention(o: dict[str, Any], device, dtypes: list[str], hf: bool, progress, log):
    cfg, source = _config("attention", o)
    warmups, runs = _counts(A, o)
    decode_past = parse_int_list(o["decode_past"], "--decode-past") if str(o["decode_past"]) != "0" else []
    repeat = as_int(o["decode_repeat"], "--decode-repeat")
    if repeat < 1:
        raise InputError(f"--decode-repeat must be >= 1, got {repeat}")
    shape = A.AttentionShape(parse_int_list(o["seqlens"], "--seqlens"), int_list0(o["past"], "--past"), decode_past)
    need = A.estimate_bytes(cfg, shape.seqlens, shape.past, decode_past, repeat, resolve_dtype(dtypes[0]).itemsize,
                            hf)
    check_memory(need, shape_text(o, ("seqlens", "past", "decode_past", "decode_repeat")))
    shape.decode_past = [p for p in decode_past for _ in range(repeat)]  # fits: expand the requests
    records, extra = A.run(cfg, device, dtypes[0], warmups, runs, shape, hf=hf, hf_attn=o["hf_attn"],
                           seed=o["seed"], progress=progress)
    return source, warmups, runs, records, extra


def _moe(o: dict[str, Any], device, dtypes: list[str], hf: bool, progress, log):
    cfg, source = _config("moe", o)
    warmups, runs = _counts(M, o)
    prefill_tokens = maybe_list(o["prefill_tokens"], "--prefill-tokens")
    decode_tokens = maybe_list(o["decode_tokens"], "--decode-tokens")
    need = _moe_bytes(cfg, prefill_tokens + decode_tokens, resolve_dtype(dtypes[0]).itemsize, hf)
    check_memory(need, shape_text(o, ("preset", "config", "prefill_tokens", "decode_tokens")))
    records, extra = M.run(cfg, device, dtypes[0], warmups, runs, prefill_tokens=prefill_tokens,
                           decode_tokens=decode_tokens, hf=hf, hf_experts=o["hf_experts"], seed=o["seed"],
                           progress=progress)
    return source, warmups, runs, records, extra


def _generate(o: dict[str, Any], device, dtypes: list[str], hf: bool, progress, log):
    if o["preset"] is not None or o["config"] is not None:
        raise InputError("bench generate runs a checkpoint dir: use --model DIR "
                         "(make one with `qwen3lab make-model DIR --preset NAME`)")
    warmups, runs = _counts(G, o)
    records, extra = G.run(o["model"], device, dtypes, warmups, runs,
                           prompt_lens=parse_int_list(o["prompt_lens"], "--prompt-lens"),
                           batches=parse_int_list(o["batch"], "--batch"),
                           new_tokens=int(o["new_tokens"]), decode_prompt_len=o["decode_prompt_len"],
                           hf=hf, hf_attn=o["hf_attn"], seed=o["seed"], roofline=not o["no_roofline"],
                           progress=progress, fast=not o["no_fast"], log=log, peer=o["peer"],
                           ndev=int(o["ndev"] or 1))
    return o["model"] or "default", warmups, runs, records, extra


def finish(report: dict[str, Any], o: dict[str, Any], old: dict[str, Any] | None, tolerance: float) -> int:
    """Table, comparison, JSON line (stdout and --json), plot; the exit code."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file or a pipe: do not squeeze the table into 80 columns
    print_table(report, console)
    rc = 0
    if old is not None:
        note = _path_change(old, report)
        if note:
            console.print(f"[yellow]note: {note}[/]")
        changes, missing = compare_reports(old, report, tolerance)
        print_comparison(changes, missing, tolerance, str(o["compare"]), console)
        bad = regressions(changes)
        report["comparison"] = {
            "against": str(o["compare"]), "tolerance": tolerance,
            "regressions": [{"impl": c.record[1], "phase": c.record[2], "case": c.record[3], "dtype": c.record[5],
                             "figure": c.figure, "old": c.old, "new": c.new, "change": round(c.change, 4)}
                            for c in bad]}
        if bad:
            console.print(f"[bold red]{len(bad)} regression(s) past {100 * tolerance:g}%[/]")
            rc = 1
        else:
            console.print(f"no qwen3lab figure regressed past {100 * tolerance:g}%")
    busy = busy_warning(report)
    if busy:
        console.print(f"[yellow]warning: {busy}[/]")
    emit_json(report, o["json"])
    if o["plot"]:
        plot_report(report, o["plot"])
        print(f"wrote {o['plot']}", file=sys.stderr)
    return rc


def _moe_bytes(cfg: Qwen3Config, token_counts: list[int], elt: int, hf: bool) -> int:
    """Memory of the MoE bench for these token counts: the block's experts and router (float32 while made,
    then in the bench dtype, once more for HF) and per token its input, output, router logits and the chosen
    experts' activations."""
    if not cfg.is_moe:
        return 0  # refused by the bench itself, with the config named
    one = one_layer_config(cfg, moe=True)
    D, E, Dm, k = one.hidden_size, one.num_experts, one.moe_intermediate_size, one.num_experts_per_tok
    weights = E * (3 * D * Dm + D)
    per_token = 2 * D + E + k * (3 * Dm + D)
    copies = 2 if hf else 1
    return weights * 4 + copies * (weights + max(token_counts, default=0) * per_token) * elt


def _path_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A sentence when OLD ran ours on another path (fast / plain) than this run: the qwen3lab changes are
    then the fast path's gain (or loss), not a regression of the same code."""
    a, b = (r.get("settings", {}).get("fast") for r in (old, new))
    if a is None or b is None or a == b:
        return None
    name = {True: "the fast path", False: "the plain eager path (--no-fast)"}
    return f"the old report ran ours on {name[a]}, this run on {name[b]}: the qwen3lab changes below compare the two"


def script_main(kind: str) -> None:
    """Entry point of benchmarks/bench_KIND.py: the same options as `qwen3lab bench KIND`."""
    @click.command(name=f"bench_{kind}", help=f"qwen3lab bench {kind} (see src/qwen3lab/bench/run.py)")
    @click_options(kind)
    def cmd(**kw):
        try:
            sys.exit(run_bench_command(kind, **kw))
        except Qwen3LabError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

    cmd()


__all__ = ["run_bench_command", "click_options", "script_main", "parse_dtypes", "KINDS"]
