"""`qwen3lab params | verify | tiny | bench`: the tools. Each command's work lives in its package (params.py,
verify/command.py, tiny/run.py, bench/run.py, bench/serve.py), imported when the command runs, so building the
CLI (and --help) does not import torch."""

from __future__ import annotations

import sys

import click

from ..bench.options import click_options
from ..errors import InputError
from ..runspec import ACT_DTYPES, RUN_DTYPES
from .main import MODEL_HELP, friendly_errors, main


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
    from ..params import run_params_command

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
    from ..verify.command import run_verify_command

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
    from ..tiny import run_tiny_command

    sys.exit(run_tiny_command(**opts))


# ---- bench -----------------------------------------------------------------------------------------
@main.group("bench")
def bench_group() -> None:
    """Benchmarks, ours and HF transformers side by side: attention, moe, generate. Ends with one JSON line."""


def _bench_command(kind: str, doc: str):
    @bench_group.command(kind, help=doc)
    @click_options(kind)
    @friendly_errors
    def cmd(**opts):
        from ..bench.run import run_bench_command  # torch and the benches load when a bench runs, not at --help

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
@click.option("--ndev", type=click.IntRange(1), default=1, show_default=True,
              help="the started server's tensor-parallel ranks (serve --ndev)")
@click.option("--no-fast", is_flag=True, help="the started server runs the plain eager model (serve --no-fast)")
@click.option("--num-requests", type=click.IntRange(1), default=32, show_default=True)
@click.option("--concurrency", default="1,16", show_default=True, help="comma list: requests in flight at most")
@click.option("--request-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="requests per second (Poisson) instead of --concurrency")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="new tokens per request")
@click.option("--served-model-name", default=None, help="model name to send [default: the server's]")
@click.option("--peer", type=click.Choice(["llama.cpp"]), default=None,
              help="also run the same load on llama.cpp's llama-server (built by `make peer`; skipped with a note "
                   "otherwise)")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="also write the JSON here")
@friendly_errors
def bench_serve_cmd(**opts):
    """Serving throughput and latency: requests/s, output tok/s, TTFT and ITL p50/p90/p99."""
    try:
        from ..bench.serve import bench_serve  # httpx: the serve extra
    except ImportError as e:
        raise InputError(f"qwen3lab bench serve needs the serve extra: pip install 'qwen3lab[serve]' ({e})") from None
    bench_serve(**opts)
