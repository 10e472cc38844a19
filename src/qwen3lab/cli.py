"""The `qwen3lab` command: generate | chat | verify | tiny | bench | params | make-model.

Every user-facing error is a Qwen3LabError; the command prints it as one line naming the file, tensor,
field or value and exits 2, instead of a traceback.

generate / chat run the fast CPU path (qwen3lab.fast: fused projections, C++ streaming kernels) by default;
--no-fast runs the plain eager model instead, --dtype int8 / int4 (or --quant with float32 / bfloat16) quantised
weights on the fast path, --threads N sets torch's intra-op threads. The options are checked together by
runspec.RunSpec before anything is loaded. The "loading ..." line says which path runs.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from .bench.options import click_options
from .errors import InputError, Qwen3LabError, TokenizerError
from .runspec import ACT_DTYPES, GROUP_SIZES, QUANTS, RUN_DTYPES
from .serve.command import serve_options

MODEL_HELP = "checkpoint dir (config.json + safetensors + tokenizer.json); default: the embedded default model"


def friendly_errors(fn):
    """Turn Qwen3LabError (and Ctrl-C) into a one-line message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Qwen3LabError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="qwen3lab")
def main() -> None:
    """qwen3lab: run, verify layer by layer, show and measure Qwen3 (dense and MoE) models."""
    _remove_torch_tmp_dirs_at_exit()


_TMP_WATCHED: list[set] = []


def _remove_torch_tmp_dirs_at_exit() -> None:
    """torch makes $TMPDIR/torchinductor_$USER (its compile cache dir) whenever torch._dynamo is imported, which
    building any nn.Module does (torch._compile's disable wrapper) and transformers does on import. We never
    compile, so a run would leave an empty dir behind: at exit, remove the ones that appeared and stayed empty."""
    import atexit
    import os
    import tempfile

    if _TMP_WATCHED:  # once per process (tests invoke main many times)
        return
    tmp = tempfile.gettempdir()

    def torch_dirs() -> set:
        try:
            return {e.path for e in os.scandir(tmp) if e.name.startswith("torchinductor_") and e.is_dir()}
        except OSError:
            return set()

    _TMP_WATCHED.append(torch_dirs())

    def cleanup() -> None:
        for d in torch_dirs() - _TMP_WATCHED[0]:
            try:
                os.rmdir(d)  # only when empty: a cache someone filled meanwhile stays
            except OSError:
                pass

    atexit.register(cleanup)


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
    from .guards import check_output_dir
    from .make_model import make_model

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
    from .engine.sampler import SamplingParams, check_max_tokens

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


def _path_line(device: str, fast: bool) -> str:
    """Which forward runs: the fast path and its kernels (qwen3lab.fast.status()), or the plain eager model."""
    if not fast:
        return "plain eager path (--no-fast)"
    if not device.startswith("cpu"):
        return f"plain eager path (the fast path is CPU only; {device})"
    from .fast import status

    return f"fast kernels: {status()}"


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _load_model(model, device, dtype, quant=None, no_fast=False, threads=None, group_size=None, ndev=1):
    from .config import load_config
    from .paths import resolve_model_path
    from .runspec import RunSpec

    spec = RunSpec.make(device, dtype, quant, fast=False if no_fast else None, threads=threads,
                        group_size=None if group_size is None else int(group_size), cli=True, ndev=ndev)
    import torch

    from .qwen3 import Qwen3ForCausalLM

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    path = resolve_model_path(model)
    load_config(path)  # a bad config.json is refused before the status line builds the kernels
    if _rank0():
        tp = f", {ndev} tensor-parallel ranks" if ndev > 1 else ""
        click.echo(f"loading {path} ({spec.describe()}, {device}{tp}, {_threads(torch.get_num_threads())}, "
                   f"{_path_line(device, spec.fast)})", err=True)
    lm = Qwen3ForCausalLM.from_pretrained(path, spec=spec)
    if spec.fast:
        from .fast import describe

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
    from .engine.runner import check_prompt

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


# ---- params ----------------------------------------------------------------------------------------
@main.command("params")
@click.option("--model", default=None, help="checkpoint dir whose config.json to read")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False), help="a config.json")
@click.option("--preset", default=None, help="qwen3-0.6b, ..., qwen3-235b-a22b, tiny, tiny-moe")
@click.option("--context", type=int, default=4096, show_default=True, help="tokens per sequence for KV/activations")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8", "int4"]), default="bfloat16",
              show_default=True, help="dtype of the weights the totals assume")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables")
@friendly_errors
def params_cmd(model, config, preset, context, batch, dtype, as_json):
    """Parameters by part (total, non-embedding, MoE activated) and memory: weights, KV cache, activations."""
    from .params import run_params_command

    run_params_command(model, config, preset, context, batch, dtype, as_json)



# ---- verify ----------------------------------------------------------------------------------------
@main.command("verify")
@click.option("--model-path", default=None, help=MODEL_HELP)
@click.option("--reference", default="numpy", show_default=True,
              help="numpy | torch | torch-fast | hf | dump:FILE | module:Class | file.py:Class "
                   "(torch-fast: the fast CPU path, fused projections + kernels)")
@click.option("--candidate", default="torch", show_default=True, help="same choices as --reference")
@click.option("--device", default="cpu", show_default=True, help="device of the torch/hf backend")
@click.option("--dtype", type=click.Choice(RUN_DTYPES), default=None,
              help="candidate dtype (default float32 for torch/torch-fast); int8, int4: torch-fast only")
@click.option("--test-input", default=None, help='text to tokenize [default: "Hello, this is a test input"]')
@click.option("--ids", default=None, help="comma-separated token ids instead of --test-input")
@click.option("--layers", default=None, help="layers to compare, e.g. 0-4 or 0,2,5-7")
@click.option("--decode-steps", type=int, default=0, show_default=True,
              help="prefill, then N KV-cache decode steps in the candidate, each compared")
@click.option("--isolate/--no-isolate", default=None,
              help="re-run the candidate on the reference's taps to label each failure op/inherited "
                   "[default: when a tap fails and the candidate supports graft]")
@click.option("--output", default=None, type=click.Path(dir_okay=False), help="write the JSON report here")
@click.option("--html", default=None, type=click.Path(dir_okay=False), help="write the HTML report here")
@click.option("--cos-min", type=float, default=None, help="override: minimum cosine similarity")
@click.option("--mse-max", type=float, default=None, help="override: maximum MSE")
@click.option("--rel-max", type=float, default=None, help="override: maximum relative error")
@click.option("--preset", type=click.Choice(["simple"]), default=None, help="simple: cos 0.99, MSE 1e-4, rel 0.01")
@click.option("--taps", type=click.Choice(["layer", "sublayer", "all"]), default="layer", show_default=True,
              help="terminal rows: one per layer, per sublayer, or per tap")
@click.option("--probs", is_flag=True, help="also compare attention probabilities (O(T*S) memory)")
@click.option("--sweep", is_flag=True, help="torch in float32, bfloat16, float16 (every device) and torch-fast in "
                                          "float32, bfloat16, int8, int4 (CPU) against the oracle")
@click.option("--quantised-reference", is_flag=True,
              help="with a quantised candidate (torch-fast --dtype int8 / int4): the oracle runs on the same "
                   "quantised weights, judged at the activations' tolerance (checks the arithmetic, not the "
                   "format's rounding loss)")
@click.option("--self-test", is_flag=True, help="plant known bugs and show verify names each one")
@click.option("--ndev", type=int, default=1, show_default=True,
              help="run the torch candidate on N tensor-parallel ranks; their taps are gathered to full shapes")
@click.option("--export-reference", default=None, type=click.Path(dir_okay=False),
              help="write the reference's taps, ids and positions as a dump (for a port's isolated run) and stop")
@click.option("--isolated", default=None, help="dump:FILE: the candidate dump's run on the reference's inputs "
                                               "(labels failing taps op / inherited)")
@click.option("--map", "name_map", default=None, help="name/layout map for foreign dump names: FILE.toml or llama.cpp")
@click.option("--kv-dtype", default=None, help="the candidate's KV-cache dtype (float16, bfloat16): loosens the "
                                               "taps after the cache [default: a dump's kv_dtype metadata]")
@click.option("--band", is_flag=True, help="per-tap thresholds from the reference's own spread at the candidate's "
                                        "precision vs float64")
@click.option("--save-baseline", default=None, type=click.Path(dir_okay=False), help="write each tap's error (JSON)")
@click.option("--baseline", default=None, type=click.Path(dir_okay=False),
              help="fail when a tap's error grew beyond noise since this --save-baseline file")
@click.option("--jsonl", default=None, type=click.Path(dir_okay=False), help="write one JSON record per tap")
@click.option("--candidate-opt", multiple=True, help="key=value for a plugin candidate's constructor (repeatable)")
@click.option("--repro", default=None, type=click.Path(file_okay=False),
              help="write the first failing op's inputs, weight, expected output and a NumPy script here")
@click.option("--text", default=None, type=click.Path(dir_okay=False),
              help="teacher-forced KL divergence, top-1 agreement and perplexity ratio over this text file")
def verify_cmd(**opts):
    """Verify an implementation layer by layer against a reference: every tap compared, the first
    divergence named, and each failure labelled as its own op's error or inherited."""
    from .verify.command import run_verify_command

    sys.exit(run_verify_command(**opts))


# ---- tiny ------------------------------------------------------------------------------------------
@main.command("tiny")
@click.option("--d", type=int, default=None, help="hidden size [default: 8]")
@click.option("--nlayer", type=int, default=None, help="layers [default: 2]")
@click.option("--nh", type=int, default=None, help="query heads [default: 2]")
@click.option("--nkvh", type=int, default=None, help="key/value heads [default: 2]")
@click.option("--dh", type=int, default=None, help="head_dim [default: 4]")
@click.option("--di", type=int, default=None, help="MLP (and MoE expert) intermediate size [default: 16]")
@click.option("--dvoc", type=int, default=None, help="vocabulary size [default: 10]")
@click.option("--dctx", type=int, default=None, help="context length, max_position_embeddings [default: 4]")
@click.option("--tokens", default=None, help="input token ids, comma-separated [default: 1,3,7,2]")
@click.option("--moe", is_flag=True, help="a tiny Qwen3-MoE (4 experts, top-2)")
@click.option("--experts", type=int, default=None, help="with --moe: number of experts [default: 4]")
@click.option("--topk", type=int, default=None, help="with --moe: experts per token [default: 2]")
@click.option("--init", type=click.Choice(["random", "identity", "ones", "arange"]), default="random",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="for --init random")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="weights file (.safetensors, .npz or .json) with HF tensor names")
@click.option("--save-weights", type=click.Path(dir_okay=False), default=None,
              help="write the weights used (.safetensors, .npz or .json)")
@click.option("--save-model", type=click.Path(file_okay=False), default=None,
              help="write an HF-layout checkpoint dir (config.json + model.safetensors, float32)")
@click.option("--model", default=None, help="run tiny mode on a small checkpoint dir")
@click.option("--explain", is_flag=True, help="hand-computed walkthrough of one token and channel")
@click.option("--explain-layer", type=int, default=0, show_default=True)
@click.option("--explain-token", type=int, default=None, help="[default: the last token]")
@click.option("--explain-channel", type=int, default=0, show_default=True)
@click.option("--explain-head", type=int, default=0, show_default=True)
@click.option("--compare", type=click.Choice(["torch"]), default=None, help="compare the torch model with the oracle")
@click.option("--dtype", type=click.Choice(ACT_DTYPES), default="float32", show_default=True,
              help="torch dtype for --compare")
@click.option("--device", default="cpu", show_default=True, help="torch device for --compare")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="write the JSON results here")
@click.option("--precision", type=int, default=4, show_default=True, help="decimals printed")
@click.option("--width", type=int, default=80, show_default=True, help="line width to wrap matrices at")
@friendly_errors
def tiny_cmd(**opts):
    """Qwen3 with matrices small enough to print: every step, stability checks, --explain, --compare."""
    from .tiny import run_tiny_command

    sys.exit(run_tiny_command(**opts))


# ---- serve ----------------------------------------------------------------------------------------
@main.command("serve")
@_model_options
@serve_options
@friendly_errors
def serve_cmd(model, device, dtype, quant, group_size, no_fast, threads, **opts):
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    from .paths import resolve_model_path
    from .serve.command import run_server

    lm = _load_model(model, device, dtype, quant, no_fast, threads, group_size)
    run_server(lm, str(resolve_model_path(model)), **opts)


# ---- bench -----------------------------------------------------------------------------------------
@main.group("bench")
def bench_group() -> None:
    """Benchmarks, ours and HF transformers side by side: attention, moe, generate. Ends with one JSON line."""


def _bench_command(kind: str, doc: str):
    @bench_group.command(kind, help=doc)
    @click_options(kind)
    @friendly_errors
    def cmd(**opts):
        from .bench.run import run_bench_command  # torch and the benches load when a bench runs, not at --help

        sys.exit(run_bench_command(kind, **opts))

    return cmd


_bench_command("attention", "One Qwen3 attention layer: prefill TTFT (4 requests with cached pasts) and "
                            "decode tok/s (16 requests), ours vs HF Qwen3Attention.")
_bench_command("moe", "The Qwen3-MoE sparse block, ours vs HF: latency and tok/s at prefill- and decode-sized "
                      "token counts, plus routing statistics.")
_bench_command("generate", "End to end on a checkpoint dir: prefill tok/s, TTFT, decode tok/s and inter-token "
                           "latency at batch 1 and 8, peak memory, roofline fraction; ours vs HF generate.")


@bench_group.command("serve")
@click.option("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 (else --model starts one)")
@click.option("--model", default=None, help="checkpoint dir: start `qwen3lab serve` on it in a subprocess")
@click.option("--dtype", type=click.Choice(RUN_DTYPES), default="bfloat16", show_default=True)
@click.option("--threads", type=int, default=None, help="the started server's torch threads")
@click.option("--num-requests", type=click.IntRange(1), default=32, show_default=True)
@click.option("--concurrency", default="1,16", show_default=True, help="comma list: requests in flight at most")
@click.option("--request-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="requests per second (Poisson) instead of --concurrency")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="new tokens per request")
@click.option("--served-model-name", default=None, help="model name to send [default: the server's]")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="also write the JSON here")
@friendly_errors
def bench_serve_cmd(**opts):
    """Serving throughput and latency: requests/s, output tok/s, TTFT and ITL p50/p90/p99."""
    from .bench.serve import bench_serve  # httpx: the serve extra

    bench_serve(**opts)
