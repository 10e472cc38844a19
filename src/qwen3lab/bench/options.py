"""The options of `qwen3lab bench attention|moe|generate` (and benchmarks/): their defaults, spellings, click
decorators and every check that runs before a bench starts (sizes, dtypes, output files, memory), so a bad
option costs nothing. run.py runs the bench; this file imports no torch (the CLI builds its options from it).
"""

from __future__ import annotations

from typing import Any

import click

from ..config import Qwen3Config
from ..errors import InputError
from ..guards import check_memory, check_output_file
from ..paths import resolve_model_path
from ..runspec import RunSpec
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


def parse_options(kind: str, given: dict[str, Any]) -> dict[str, Any]:
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


def check_generate(dtypes: list[str], device, no_fast: bool) -> None:
    """Each dtype of the list as one run of ours, checked where every run is (runspec.RunSpec)."""
    for d in dtypes:
        RunSpec.make(device, d, fast=False if no_fast else None, cli=True)


def check_outputs(o: dict[str, Any]) -> None:
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


def check_generate_sizes(o: dict[str, Any]) -> None:
    """bench generate's sizes, before a model is loaded (the model's context is checked where it is known)."""
    new = as_int(o["new_tokens"], "--new-tokens")
    if new < 1:
        raise InputError(f"--new-tokens must be >= 1, got {new}")
    if o["decode_prompt_len"] is not None:
        n = as_int(o["decode_prompt_len"], "--decode-prompt-len")
        if n < 1:
            raise InputError(f"--decode-prompt-len must be >= 1 (a prompt of one token at least), got {n}")
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
    check_memory((weights + kv) * (1 if o["no_hf"] else 2), shape_text(o, ("model", "batch", "prompt_lens",
                                                                             "decode_prompt_len", "new_tokens")))


def as_int(value, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise InputError(f"{option} {str(value)[:40]!r}: expected an integer") from None
    return value


def shape_text(o: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The options that set a bench's size, as given, for a memory refusal ("--seqlens 99999999999 ...")."""
    parts = [f"--{k.replace('_', '-')} {o[k]}" for k in keys if o.get(k) is not None]
    text = " ".join(parts)
    return text if len(text) <= 200 else text[:180] + "..."


def int_list0(text, option: str) -> list[int]:
    """Comma-separated integers >= 0 (a request may have no cached past)."""
    items = list(text) if isinstance(text, (list, tuple)) else [x for x in str(text).replace(" ", "").split(",") if x]
    try:
        out = [int(x) for x in items]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected comma-separated integers, e.g. 512,0,0,256") from None
    if not out or any(x < 0 for x in out):
        raise InputError(f"{option} {text!r}: expected integers >= 0")
    return out


def maybe_list(text, option: str) -> list[int]:
    """A comma list; "" or "0" means none (e.g. --decode-tokens 0 to skip the decode sizes)."""
    if text in ("", "0", None, [], ()):
        return []
    return parse_int_list(text, option)


# ---- click options (cli.py and benchmarks/ share them) ---------------------------------------------
def click_options(kind: str):
    """Decorator adding the options of `qwen3lab bench KIND` to a click command (keyword names as above)."""
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
