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

from ..config import Qwen3Config
from ..errors import InputError
from ..guards import check_memory, check_output_file
from .choices import BENCH_DTYPES, GENERATE_DTYPES, HF_ATTN_IMPLS, HF_EXPERTS_IMPLS, KINDS

# torch (and the harness, which needs it) is imported when a bench runs, not when the CLI builds its options
DEFAULT_PRESET = {"attention": "qwen3-0.6b", "moe": "qwen3-30b-a3b"}

COMMON = {"preset": None, "config": None, "device": "cpu", "dtype": "bfloat16", "warmups": None, "runs": None,
          "json": None, "compare": None, "tolerance": 10.0, "plot": None, "no_hf": False, "threads": None,
          "seed": 0, "quiet": False}
PER_KIND: dict[str, dict[str, Any]] = {
    "attention": {"seqlens": "64,128,256,256", "past": "512,0,0,256", "decode_past": "50,100,200,400",
                  "decode_repeat": 4, "hf_attn": "sdpa"},
    "moe": {"prefill_tokens": "512", "decode_tokens": "1,8", "hf_experts": "grouped_mm"},
    "generate": {"model": None, "prompt_lens": "128,512", "batch": "1,8", "new_tokens": 64,
                 "decode_prompt_len": None, "hf_attn": "sdpa", "no_roofline": False, "no_fast": False,
                 "peer": None, "ndev": 1},
}
# spellings a caller may use for the same option
ALIASES = {"json_path": "json", "json_file": "json", "compare_path": "compare", "plot_path": "plot",
           "batches": "batch", "model_path": "model", "hf": None}


def _options(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise InputError(f"unknown bench {kind!r}; choose one of {', '.join(KINDS)}")
    opts = {**COMMON, **PER_KIND[kind]}
    for key, value in given.items():
        key = key.replace("-", "_")
        if key == "hf":  # hf=False is no_hf=True
            opts["no_hf"] = not value
            continue
        key = ALIASES.get(key, key) or key
        if key not in opts:
            raise TypeError(f"bench {kind}: unknown option {key!r}; accepted: {', '.join(sorted(opts))}")
        if value is not None or key in ("warmups", "runs", "threads"):
            opts[key] = value
    return opts


def _config(kind: str, o: dict[str, Any]) -> tuple[Qwen3Config, str]:
    from ..presets import preset_config

    if o["config"] is not None and o["preset"] is not None:
        raise InputError("give --preset or --config, not both")
    if o["config"] is not None:
        return Qwen3Config.from_file(o["config"]), str(o["config"])
    name = o["preset"] or DEFAULT_PRESET[kind]
    return preset_config(name), name


def _hf(o: dict[str, Any], quiet_log) -> bool:
    from .machine import hf_available

    if o["no_hf"]:
        return False
    if not hf_available():
        quiet_log("transformers is not installed: HF columns skipped (pip install 'qwen3lab[hf]')")
        return False
    return True


def parse_dtypes(text, kind: str) -> list[str]:
    """--dtype: one of BENCH_DTYPES for attention / moe; for generate a comma list of GENERATE_DTYPES (order
    kept, repeats dropped). A bad item is named."""
    items = [str(x) for x in text] if isinstance(text, (list, tuple)) else [
        x for x in str(text).replace(" ", "").split(",") if x]
    if kind != "generate" and len(items) > 1:
        raise InputError(f"--dtype {','.join(items)}: bench {kind} takes one dtype ({', '.join(BENCH_DTYPES)}); "
                         f"a comma list is for bench generate")
    allowed = GENERATE_DTYPES if kind == "generate" else BENCH_DTYPES
    if not items:
        raise InputError(f"--dtype {text!r}: expected {'a comma list of ' if kind == 'generate' else ''}"
                         f"{', '.join(allowed)}")
    for x in items:
        if x not in allowed:
            where = f" in --dtype {','.join(items)}" if len(items) > 1 else ""
            raise InputError(f"--dtype {x!r}{where}: not one of {', '.join(allowed)}"
                             + (f" ({x} is for bench generate)" if x in ("int8", "int4") else ""))
    return list(dict.fromkeys(items))


def _check_generate(dtypes: list[str], device, no_fast: bool) -> None:
    """Each dtype of the list as one run of ours, checked where every run is (runspec.RunSpec)."""
    from ..runspec import RunSpec

    for d in dtypes:
        RunSpec.make(device, d, fast=False if no_fast else None, cli=True)


def ours_path(device, fast: bool) -> str:
    """Which forward ours runs: the fast CPU path and its kernels (qwen3lab.fast.status()), or plain eager."""
    if not fast:
        return "plain eager (--no-fast)"
    if device.type != "cpu":
        return f"plain eager (the fast path is CPU only; {device})"
    from ..fast import status

    return f"fast ({status()})"


def run_bench_command(kind: str, **options: Any) -> int:
    """Run one bench with CLI-style options; print table (+ comparison) and the JSON line; return the exit code."""
    o = _options(kind, options)
    _check_outputs(o)  # before any timing: a report that cannot be written must not cost the bench
    if kind == "generate":
        _check_generate_sizes(o)
    import torch

    from .compare import parse_tolerance
    from .machine import loadavg
    from .report import load_report, make_report
    from .settings import parse_int_list, resolve_device, resolve_dtype, torch_threads
    from .timing import Progress

    device = resolve_device(o["device"])
    dtypes = parse_dtypes(o["dtype"], kind)
    if kind == "generate":
        _check_generate(dtypes, device, o["no_fast"])
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
        if kind == "attention":
            from . import attention as A

            cfg, source = _config(kind, o)
            warmups = A.DEFAULT_WARMUPS if o["warmups"] is None else o["warmups"]
            runs = A.DEFAULT_RUNS if o["runs"] is None else o["runs"]
            decode_past = parse_int_list(o["decode_past"], "--decode-past") if str(o["decode_past"]) != "0" else []
            repeat = _int(o["decode_repeat"], "--decode-repeat")
            if repeat < 1:
                raise InputError(f"--decode-repeat must be >= 1, got {repeat}")
            shape = A.AttentionShape(parse_int_list(o["seqlens"], "--seqlens"), _int_list0(o["past"], "--past"),
                                     decode_past)
            need = A.estimate_bytes(cfg, shape.seqlens, shape.past, decode_past, repeat,
                                    resolve_dtype(dtypes[0]).itemsize, hf)
            check_memory(need, _shape_text(o, ("seqlens", "past", "decode_past", "decode_repeat")))
            shape.decode_past = [p for p in decode_past for _ in range(repeat)]  # fits: expand the requests
            records, extra = A.run(cfg, device, dtypes[0], warmups, runs, shape, hf=hf, hf_attn=o["hf_attn"],
                                   seed=o["seed"], progress=progress)
        elif kind == "moe":
            from . import moe as M

            cfg, source = _config(kind, o)
            warmups = M.DEFAULT_WARMUPS if o["warmups"] is None else o["warmups"]
            runs = M.DEFAULT_RUNS if o["runs"] is None else o["runs"]
            prefill_tokens = _maybe_list(o["prefill_tokens"], "--prefill-tokens")
            decode_tokens = _maybe_list(o["decode_tokens"], "--decode-tokens")
            need = _moe_bytes(cfg, prefill_tokens + decode_tokens, resolve_dtype(dtypes[0]).itemsize, hf)
            check_memory(need, _shape_text(o, ("preset", "config", "prefill_tokens", "decode_tokens")))
            records, extra = M.run(cfg, device, dtypes[0], warmups, runs,
                                   prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                                   hf=hf, hf_experts=o["hf_experts"], seed=o["seed"], progress=progress)
        else:
            from . import generate as G

            if o["preset"] is not None or o["config"] is not None:
                raise InputError("bench generate runs a checkpoint dir: use --model DIR "
                                 "(make one with `qwen3lab make-model DIR --preset NAME`)")
            source = o["model"] or "default"
            warmups = G.DEFAULT_WARMUPS if o["warmups"] is None else o["warmups"]
            runs = G.DEFAULT_RUNS if o["runs"] is None else o["runs"]
            records, extra = G.run(o["model"], device, dtypes, warmups, runs,
                                   prompt_lens=parse_int_list(o["prompt_lens"], "--prompt-lens"),
                                   batches=parse_int_list(o["batch"], "--batch"),
                                   new_tokens=int(o["new_tokens"]), decode_prompt_len=o["decode_prompt_len"],
                                   hf=hf, hf_attn=o["hf_attn"], seed=o["seed"], roofline=not o["no_roofline"],
                                   progress=progress, fast=not o["no_fast"], log=log, peer=o["peer"],
                                   ndev=int(o["ndev"] or 1))
            if settings["fast"] and device.type == "cpu":
                from ..fast import tune

                settings["prefill_gemm"] = tune.status()  # decided while loading (fast/tune.py)
    settings.update({"source": source, "warmups": warmups, "runs": runs, **extra})
    report = make_report(kind, device, settings, records)
    return finish(report, o, old, tolerance)


def finish(report: dict[str, Any], o: dict[str, Any], old: dict[str, Any] | None, tolerance: float) -> int:
    """Table, comparison, JSON line (stdout and --json), plot; the exit code."""
    from rich.console import Console

    from .compare import compare_reports, print_comparison, regressions
    from .plot import plot_report
    from .report import emit_json, print_table
    from .timing import busy_warning

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


def _check_outputs(o: dict[str, Any]) -> None:
    """--json and --plot checked writable (guards.check_output_file) before anything runs; --plot's extension
    must be one matplotlib writes."""
    if o["json"]:
        o["json"] = check_output_file(o["json"], "--json")
    if o["plot"]:
        o["plot"] = check_output_file(o["plot"], "--plot", plot_formats())
        if o["json"] and o["plot"].resolve() == o["json"].resolve():
            raise InputError(f"--json and --plot are the same file {o['plot']}; give two paths")


def plot_formats() -> tuple[str, ...]:
    """The extensions --plot can write (matplotlib's savefig formats), e.g. .png, .pdf, .svg."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install matplotlib)") from None
    return tuple(f".{k}" for k in FigureCanvasBase.get_supported_filetypes())


def _check_generate_sizes(o: dict[str, Any]) -> None:
    """bench generate's sizes, before a model is loaded (the model's context is checked where it is known)."""
    new = _int(o["new_tokens"], "--new-tokens")
    if new < 1:
        raise InputError(f"--new-tokens must be >= 1, got {new}")
    if o["decode_prompt_len"] is not None:
        n = _int(o["decode_prompt_len"], "--decode-prompt-len")
        if n < 1:
            raise InputError(f"--decode-prompt-len must be >= 1 (a prompt of one token at least), got {n}")
    from ..paths import resolve_model_path
    from .settings import parse_int_list

    prompt_lens = parse_int_list(o["prompt_lens"], "--prompt-lens")
    batches = parse_int_list(o["batch"], "--batch")
    if o["preset"] is not None or o["config"] is not None:
        return  # refused with its own message where the bench starts
    path = resolve_model_path(o["model"])
    if not (path / "config.json").is_file():
        return  # the loader names what is missing
    cfg = Qwen3Config.from_file(path)
    ctx = cfg.max_position_embeddings
    decode = (o["decode_prompt_len"] or prompt_lens[0]) + new
    for option, n in (("--prompt-lens", max(prompt_lens)), ("--decode-prompt-len + --new-tokens", decode)):
        if n > ctx:
            raise InputError(f"{option}: {n} positions exceed the context of {path} ({ctx}, "
                             f"max_position_embeddings)")
    # each impl holds the weights and a KV cache of the largest batch; float32 is the widest activation dtype
    elt = 4 if "float32" in str(o["dtype"]) else 2
    kv = max(batches) * max(decode, max(prompt_lens)) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads \
        * cfg.head_dim * elt
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    check_memory((weights + kv) * (1 if o["no_hf"] else 2), _shape_text(o, ("model", "batch", "prompt_lens",
                                                                             "decode_prompt_len", "new_tokens")))


def _int(value, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise InputError(f"{option} {str(value)[:40]!r}: expected an integer") from None
    return value


def _shape_text(o: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The options that set a bench's size, as given, for a memory refusal ("--seqlens 99999999999 ...")."""
    parts = [f"--{k.replace('_', '-')} {o[k]}" for k in keys if o.get(k) is not None]
    text = " ".join(parts)
    return text if len(text) <= 200 else text[:180] + "..."


def _moe_bytes(cfg: Qwen3Config, token_counts: list[int], elt: int, hf: bool) -> int:
    """Memory of the MoE bench for these token counts: the block's experts and router (float32 while made,
    then in the bench dtype, once more for HF) and per token its input, output, router logits and the chosen
    experts' activations."""
    from .modules import one_layer_config

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


def _int_list0(text, option: str) -> list[int]:
    """Comma-separated integers >= 0 (a request may have no cached past)."""
    items = list(text) if isinstance(text, (list, tuple)) else [x for x in str(text).replace(" ", "").split(",") if x]
    try:
        out = [int(x) for x in items]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected comma-separated integers, e.g. 512,0,0,256") from None
    if not out or any(x < 0 for x in out):
        raise InputError(f"{option} {text!r}: expected integers >= 0")
    return out


def _maybe_list(text, option: str) -> list[int]:
    """A comma list; "" or "0" means none (e.g. --decode-tokens 0 to skip the decode sizes)."""
    from .settings import parse_int_list

    if text in ("", "0", None, [], ()):
        return []
    return parse_int_list(text, option)


# ---- click options (cli.py and benchmarks/ share them) ---------------------------------------------
def click_options(kind: str):
    """Decorator adding the options of `qwen3lab bench KIND` to a click command (keyword names as above)."""
    import click

    dtype_help = (f"one or more, comma-separated, run one after the other: {', '.join(GENERATE_DTYPES)} (int8, "
                  f"int4: bfloat16 activations + those weights, ours and llama.cpp only)" if kind == "generate"
                  else f"one of {', '.join(BENCH_DTYPES)}")
    common = [
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N"),
        click.option("--dtype", default="bfloat16", show_default=True, help=dtype_help),
        click.option("--warmups", type=int, default=None, help="untimed runs first (bench default)"),
        click.option("--runs", type=int, default=None, help="timed runs (bench default)"),
        click.option("--json", "json", type=click.Path(dir_okay=False), default=None,
                     help="also write the JSON line to FILE"),
        click.option("--compare", type=click.Path(dir_okay=False), default=None,
                     help="OLD.json: print each figure's change; exit 1 when one of ours regresses"),
        click.option("--tolerance", default="10", show_default=True, help="regression threshold, percent"),
        click.option("--plot", type=click.Path(dir_okay=False), default=None, help="draw the figures to FILE.png"),
        click.option("--no-hf", is_flag=True, help="skip the HuggingFace transformers peer"),
        click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--quiet", is_flag=True, help="no progress bars"),
    ]
    shape = [
        click.option("--preset", default=None, help=f"config preset (default {DEFAULT_PRESET.get(kind)})"),
        click.option("--config", type=click.Path(exists=True), default=None, help="a config.json (or its dir)"),
    ]
    per = {
        "attention": [
            click.option("--seqlens", default="64,128,256,256", show_default=True,
                         help="prefill: new tokens per request"),
            click.option("--past", default="512,0,0,256", show_default=True, help="prefill: cached past per request"),
            click.option("--decode-past", default="50,100,200,400", show_default=True,
                         help="decode: past lengths (each repeated --decode-repeat times)"),
            click.option("--decode-repeat", type=int, default=4, show_default=True),
            click.option("--hf-attn", type=click.Choice(HF_ATTN_IMPLS), default="sdpa", show_default=True),
        ],
        "moe": [
            click.option("--prefill-tokens", default="512", show_default=True, help="prefill-sized token counts"),
            click.option("--decode-tokens", default="1,8", show_default=True, help="decode-sized token counts"),
            click.option("--hf-experts", type=click.Choice(HF_EXPERTS_IMPLS), default="grouped_mm",
                         show_default=True, help="HF experts implementation (grouped_mm is HF's default)"),
        ],
        "generate": [
            click.option("--model", default=None, help="checkpoint dir (default: the embedded default model)"),
            click.option("--prompt-lens", default="128,512", show_default=True, help="prefill prompt lengths"),
            click.option("--batch", default="1,8", show_default=True, help="decode batch sizes"),
            click.option("--new-tokens", type=int, default=64, show_default=True,
                         help="tokens generated per decode run"),
            click.option("--decode-prompt-len", type=int, default=None,
                         help="decode prompt length (default: the first prompt length)"),
            click.option("--hf-attn", type=click.Choice(HF_ATTN_IMPLS), default="sdpa", show_default=True),
            click.option("--no-roofline", is_flag=True, help="skip the bandwidth measurement"),
            click.option("--no-fast", is_flag=True,
                         help="ours on the plain eager model, not the fast CPU path (to show the fast path's gain)"),
            click.option("--ndev", type=int, default=1, show_default=True,
                         help="ours on N tensor-parallel ranks (eager leaves); per-rank memory and collective time"),
            click.option("--peer", type=click.Choice(["llama.cpp"]), default=None,
                         help="also run llama.cpp (built once by `make peer`) on a GGUF of the same checkpoint"),
        ],
    }[kind]
    opts = (shape if kind != "generate" else []) + per + common

    def deco(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def script_main(kind: str) -> None:
    """Entry point of benchmarks/bench_KIND.py: the same options as `qwen3lab bench KIND`."""
    import click

    from ..errors import Qwen3LabError

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
