"""Clean-run and planted-bug errors of real llama.cpp block formats (Q8_0, Q4_0) against the float64 oracle.

benchmarks/calibrate_block_formats.py measures the formats with NumPy emulations; this runs llama.cpp itself
(`make peer`) as verify's candidate (`--candidate llama.cpp`) on a checkpoint converted and quantised by
llama.cpp's own tools, with its KV cache as configured, prefill and decode steps, and prints for each run the
worst relative error and the worst 1 - cosine over every tap, and for two real bugs planted in the checkpoint
before conversion (ffn_down of layer 1 x1.1, q_norm weight of layer 0 -> 1) the error at the tap they act on.
A format's tolerance must sit above every clean run and below the bugs.

    .venv/bin/python benchmarks/calibrate_llama_cpp.py MODEL_DIR [--dtype int8] [--kv f16,f32] [--decode-steps 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from qwen3lab.backends.gguf import gguf, missing
from qwen3lab.verify.runner import verify

PARAGRAPH = ("The lighthouse stood at the end of a long stone pier, and every evening the keeper climbed its ninety "
             "steps to light the lamp. Ships far out at sea would see the beam sweep across the water and know "
             "that the rocks were near. In winter the storms came from the north and the waves broke over the "
             "pier, but the light never failed.")
IDS = [9707, 11, 419, 374, 264, 1273, 1946, 13]  # "Hello, this is a test input."
BUGS = {"ffn_down x1.1": ("model.layers.1.mlp.down_proj.weight", "layers.1.mlp_out", lambda w: w * 1.1),
        "q_norm weight -> 1": ("model.layers.0.self_attn.q_norm.weight", "layers.0.q_norm", lambda w: w * 0 + 1)}


def worst(rep) -> tuple[float, float, str]:
    taps = [t for t in rep.results if t.metrics is not None and t.name.split(".")[-1] != "topk_idx"]
    t = max(taps, key=lambda t: t.metrics.relative_error)
    return t.metrics.relative_error, max(1 - x.metrics.cosine_similarity for x in taps), t.name


def at(rep, name: str) -> tuple[float, float]:
    t = next(t for t in rep.results if t.name == name)
    return t.metrics.relative_error, 1 - t.metrics.cosine_similarity


def planted(model: Path, tmp: Path, key: str, edit) -> Path:
    out = tmp / f"{model.name}-bug-{key.split('.')[2]}-{key.split('.')[-2]}"
    shutil.copytree(model, out)
    for f in out.glob("*.safetensors"):
        w = load_file(f)
        if key in w:
            w[key] = edit(w[key].float()).to(w[key].dtype)
            save_file(w, str(f), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--dtype", default="int8", help="int8 (Q8_0), int4 (Q4_0), bfloat16, float32")
    ap.add_argument("--kv", default="f16,f32")
    ap.add_argument("--decode-steps", type=int, default=2)
    ap.add_argument("--bugs-only", action="store_true", help="skip the clean runs")
    args = ap.parse_args()
    why = missing(library=True)
    if why:
        raise SystemExit(why)
    inputs = {"ids": dict(input_ids=IDS), "paragraph": dict(test_input=PARAGRAPH)}
    print(f"{'run':38s} {'worst rel':>10s} {'worst 1-cos':>12s}  at")
    for kv in ([] if args.bugs_only else args.kv.split(",")):
        for label, kw in inputs.items():
            rep = verify("numpy", "llama.cpp", model_path=args.model, dtype=args.dtype, decode_steps=args.decode_steps,
                         candidate_opts=[f"kv={kv}"], isolate=False, **kw)
            rel, cos, name = worst(rep)
            print(f"{'clean ' + args.dtype + ' kv ' + kv + ' (' + label + ')':38s} {rel:10.4f} {cos:12.2e}  {name}")
    with tempfile.TemporaryDirectory() as tmp:
        for bug, (key, tap, edit) in BUGS.items():
            m = planted(args.model, Path(tmp), key, edit)
            rel, cos = at(_bug_run(args, m), tap)
            print(f"{bug + ' (' + args.dtype + ', kv f16)':38s} {rel:10.4f} {cos:12.2e}  {tap}")
            shutil.rmtree(m)


def _bug_run(args, buggy: Path):
    """The edited copy converted by llama.cpp's tools, against the oracle on the clean checkpoint."""
    g = gguf(buggy, args.dtype, print)
    try:
        return verify("numpy", f"llama.cpp:{g}", IDS, model_path=args.model, isolate=False,
                      candidate_opts=["kv=f16"])
    finally:
        for f in g.parent.glob(f"{buggy.name}-*.gguf"):  # the edited copy's GGUFs are not worth a cache slot
            f.unlink()


if __name__ == "__main__":
    main()
