"""`qwen3lab make-model | generate | chat | serve`: the commands that load a model and run it.

generate / chat run the fast CPU path (qwen3lab.fast: fused projections, C++ streaming kernels) by default;
--no-fast runs the plain eager model instead, --dtype int8 / int4 (or --quant with float32 / bfloat16) quantised
weights on the fast path, --threads N sets torch's intra-op threads. The options are checked together by
runspec.RunSpec before anything is loaded. The "loading ..." line says which path runs. Model code (and torch)
is imported inside the commands, so building the CLI (and --help) stays light.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import InputError, TokenizerError
from ..runspec import GROUP_SIZES, QUANTS, RUN_DTYPES
from ..serve.command import serve_options
from .main import MODEL_HELP, friendly_errors, main


# ---- make-model ----------------------------------------------------------------------------------
@main.command("make-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", default="tiny", show_default=True, help="qwen3-0.6b, qwen3-1.7b, ..., tiny, tiny-moe")
@click.option("--layers", type=int, default=None, help="override num_hidden_layers")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shard-size", default=None, help="split into shards of at most this size, e.g. 200MB")
@click.option("--overwrite", is_flag=True, help="replace an existing qwen3lab-made model in OUT_DIR")
@friendly_errors
def make_model_cmd(out_dir, preset, layers, dtype, seed, shard_size, overwrite):
    """Write a complete HF-layout checkpoint dir with deterministic random weights and the real shapes."""
    from ..guards import check_output_dir
    from ..make_model import make_model

    check_output_dir(out_dir, "OUT_DIR", parents=True)
    path = make_model(out_dir, preset=preset, layers=layers, dtype=dtype, seed=seed, shard_size=shard_size,
                      overwrite=overwrite)
    files = sorted(p.name for p in path.iterdir())
    size = sum(p.stat().st_size for p in path.iterdir())
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB): {', '.join(files)}")


# ---- generate / chat -----------------------------------------------------------------------------
def _model_options(fn):
    for opt in reversed([
        click.option("--model", "model", default=None, help=MODEL_HELP),
        click.option("--device", default="cpu", show_default=True,
                     help="cpu, cuda, cuda:1, mps: one this machine has"),
        click.option("--dtype", type=click.Choice(RUN_DTYPES), default="bfloat16", show_default=True,
                     help="int8 / int4: bfloat16 activations + those weights (CPU fast path)"),
        click.option("--quant", type=click.Choice(QUANTS), default=None,
                     help="int8 (per-row scales) or int4 (per-group scales) weights with --dtype float32 or "
                          "bfloat16 activations (CPU)"),
        click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default=None,
                     help="int4: weights per scale [default: 128, or 32 where 128 does not divide a weight's "
                          "input size]"),
        click.option("--no-fast", is_flag=True, help="run the plain eager model instead of the fast CPU path"),
        click.option("--threads", type=int, default=None,
                     help="torch intra-op threads [default: torch's, one per core]"),
    ]):
        fn = opt(fn)
    return fn


def _sampling_options(fn):
    for opt in reversed([
        click.option("--max-steps", type=int, default=128, show_default=True, help="new tokens at most (>= 1)"),
        click.option("--temperature", type=float, default=0.0, show_default=True,
                     help="0 = greedy, else >= 0.01 (below it, sampling is greedy in effect)"),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off"),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="in (0, 1]; 1 = off"),
        click.option("--seed", type=int, default=None, help="0..2**64-1 [default: a fresh random seed]"),
    ]):
        fn = opt(fn)
    return _model_options(fn)


def _run_options(max_steps, temperature, top_k, top_p, seed):
    """generate / chat's sampling options checked before any model loads: SamplingParams, named as options."""
    from ..engine.sampler import SamplingParams, check_max_tokens

    check_max_tokens(max_steps, "max_steps", cli=True)
    return SamplingParams.make(temperature, top_k, top_p, seed, cli=True)


def _utf8(text: str, what: str) -> str:
    """text, or InputError when it holds bytes that are not UTF-8. Python keeps such bytes of a command line
    (and of stdin, as chat reads it) in the str as lone surrogates (surrogateescape); the tokenizer cannot
    encode them. Refused rather than replaced: a port must see exactly the text it was given, or nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X} (a lone surrogate)"
        raise InputError(f"{what} is not valid UTF-8: {bad} at character {e.start}; give UTF-8 text") from None
    return text


def _ndev_option(fn):
    return click.option("--ndev", type=int, default=1, show_default=True,
                        help="tensor-parallel ranks: spawned here (cpu: gloo, cores split; cuda: one GPU each), "
                             "or under torchrun the launched world")(fn)


def _rank0() -> bool:
    """Under torchrun only rank 0 prints (spawned followers never run the CLI)."""
    return os.environ.get("RANK", "0") == "0"


def _path_line(device: str, fast: bool, ndev: int = 1) -> str:
    """Which forward runs: the fast path and its kernels (qwen3lab.fast.status()), or the plain eager model."""
    if ndev > 1:
        return "plain eager path (the tensor-parallel leaves)"
    if not fast:
        return "plain eager path (--no-fast)"
    if not device.startswith("cpu"):
        return f"plain eager path (the fast path is CPU only; {device})"
    from ..fast import status

    return f"fast kernels: {status()}"


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _load_model(model, device, dtype, quant=None, no_fast=False, threads=None, group_size=None, ndev=1):
    from ..config import load_config
    from ..paths import resolve_model_path
    from ..runspec import RunSpec

    spec = RunSpec.make(device, dtype, quant, fast=False if no_fast else None, threads=threads,
                        group_size=None if group_size is None else int(group_size), cli=True, ndev=ndev)
    import torch

    from ..qwen3 import Qwen3ForCausalLM

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    path = resolve_model_path(model)
    load_config(path)  # a bad config.json is refused before the status line builds the kernels
    if _rank0():
        from ..dist.group import rank_threads  # torch with it: loaded only when a command runs a model

        tp = f", {ndev} tensor-parallel ranks" if ndev > 1 else ""
        n = torch.get_num_threads() if ndev == 1 else rank_threads(ndev)  # the ranks split the cores (tp_run.py)
        click.echo(f"loading {path} ({spec.describe()}, {device}{tp}, {_threads(n)}{' a rank' if ndev > 1 else ''}, "
                   f"{_path_line(device, spec.fast, ndev)})", err=True)
    lm = Qwen3ForCausalLM.from_pretrained(path, spec=spec)
    if spec.fast:
        from ..fast import describe

        click.echo("kernels: " + ", ".join(f"{k} {v}" for k, v in describe(lm.model).items()), err=True)
    return lm


def _print_stats(res) -> None:
    click.echo(
        f"\n[{len(res.token_ids)} tokens | prompt {res.prompt_tokens} tokens in {res.prefill_s * 1e3:.1f} ms "
        f"({res.prefill_tokens_per_s:.1f} tok/s) | decode {res.tokens_per_s:.2f} tok/s | "
        f"finish: {res.finish_reason}]",
        err=True,
    )


def _stream_text(_tok: int, delta: str) -> None:
    click.echo(delta, nl=False)


@main.command("generate")
@click.argument("prompt")
@_sampling_options
@click.option("--chat", "as_chat", is_flag=True, help="wrap the prompt in the chat template as a user turn")
@click.option("--no-think", is_flag=True, help="with --chat: enable_thinking=False")
@click.option("--stop", multiple=True, help="extra stop string (repeatable); eos ids always stop")
@_ndev_option
@friendly_errors
def generate_cmd(prompt, model, device, dtype, quant, group_size, no_fast, threads, max_steps, temperature, top_k,
                 top_p, seed, as_chat, no_think, stop, ndev):
    """Continue PROMPT (UTF-8 text) with the model, streaming tokens as they come; tokens/s at the end."""
    prompt = _utf8(prompt, "PROMPT")
    if not prompt and not as_chat:  # refused before the model loads (and its kernels build)
        raise InputError("PROMPT is empty: give some text to continue (or --chat for an empty user turn)")
    stop = [_utf8(s, "--stop") for s in stop]
    sampling = _run_options(max_steps, temperature, top_k, top_p, seed)
    lm = _load_model(model, device, dtype, quant, no_fast, threads, group_size, ndev)
    if as_chat:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, enable_thinking=not no_think)
    click.echo(prompt, nl=False)
    res = lm.generate(prompt, max_steps=max_steps, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p, seed=sampling.seed, stop=stop or None, stream=_stream_text)
    _print_stats(res)


@main.command("chat")
@_sampling_options
@click.option("--system", default=None, help="system prompt")
@click.option("--no-think", is_flag=True, help="enable_thinking=False (Qwen3's /no_think mode)")
@_ndev_option
@friendly_errors
def chat_cmd(model, device, dtype, quant, group_size, no_fast, threads, max_steps, temperature, top_k, top_p, seed,
             system, no_think, ndev):
    """Interactive chat with the chat template; replies stream. /exit quits, /reset clears the history.
    A line that is not UTF-8, or that would take the conversation past the model's context, is refused
    with a message and not sent; the session and its history go on."""
    if system is not None:
        system = _utf8(system, "--system")
    sampling = _run_options(max_steps, temperature, top_k, top_p, seed)
    lm = _load_model(model, device, dtype, quant, no_fast, threads, group_size, ndev)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    click.echo("chat: /exit to quit, /reset to clear the history, /think or /no_think to switch thinking", err=True)
    think = not no_think
    _stdin_surrogateescape()
    while True:
        try:
            line = click.prompt(click.style("you", fg="cyan"), prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            click.echo("", err=True)
            return
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history = history[:1] if system else []
            click.echo("(history cleared)", err=True)
            continue
        if cmd in ("/think", "/no_think"):
            think = cmd == "/think"
            click.echo(f"(thinking {'on' if think else 'off'})", err=True)
            continue
        if not cmd:
            continue
        try:
            ids = _chat_turn_ids(lm, history + [{"role": "user", "content": _utf8(line, "this line")}], think)
        except (InputError, TokenizerError) as e:  # this message only: the session goes on
            click.secho(f"error: {e}. Not sent; the history is kept (/reset clears it).", fg="red", err=True)
            continue
        history.append({"role": "user", "content": line})
        click.echo(click.style("qwen3", fg="green") + "> ", nl=False)
        res = lm.generate(ids, max_steps=max_steps, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p, seed=sampling.seed, stream=_stream_text)
        history.append({"role": "assistant", "content": res.text})
        _print_stats(res)


def _chat_turn_ids(lm, messages: list[dict], think: bool) -> list[int]:
    """Token ids of the conversation with its next user message; InputError when it leaves no room in the
    context (the check generate makes, made before the message joins the history)."""
    from ..engine.runner import check_prompt

    prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think)
    ids = lm.encode(prompt)
    check_prompt(ids, lm.model.cfg, "the conversation with this message")
    return ids


def _stdin_surrogateescape() -> None:
    """Read stdin with errors="surrogateescape" for the rest of the process, so that a line of bad UTF-8 is one
    refused line (_utf8): a strict decoder raises inside readline and loses the buffered lines after it.
    (Not undone: a text stream cannot be reconfigured once read.)"""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


# ---- serve ----------------------------------------------------------------------------------------
@main.command("serve")
@_model_options
@serve_options
@_ndev_option
@friendly_errors
def serve_cmd(model, device, dtype, quant, group_size, no_fast, threads, ndev, **opts):
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.
    With --ndev N only rank 0 (this process, or torchrun's rank 0) serves HTTP."""
    from ..paths import resolve_model_path
    from ..serve.command import run_server

    lm = _load_model(model, device, dtype, quant, no_fast, threads, group_size, ndev)
    run_server(lm, str(resolve_model_path(model)), **opts)
