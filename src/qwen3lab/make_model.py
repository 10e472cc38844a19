"""make_model: a complete HF-layout Qwen3 checkpoint dir with deterministic random weights.

Writes config.json, model.safetensors (or shards + index), tokenizer.json and tokenizer_config.json (the
bundled Qwen3 tokenizer), generation_config.json (Qwen3's sampling defaults) and a README.md saying the
weights are random. The result loads in transformers as is. A `.qwen3lab-model` marker file lets a later
make_model overwrite a dir it made itself, never someone else's.

The default model (qwen3-0.6b shapes, 4 layers, seed 0, bfloat16) is made on first use into a cache dir,
atomically: written to a temp dir next to it and renamed, so an interrupted run never leaves half a model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint_save import parse_size, save_checkpoint
from .errors import InputError
from .guards import check_disk, check_memory
from .presets import preset_config
from .random_init import random_weights
from .shapes import expected_shapes
from .tokenizer import bundled_file_text
from .weights import checkpoint_dtype, dtype_name

MARKER = ".qwen3lab-model"
DEFAULT_PRESET, DEFAULT_LAYERS, DEFAULT_SEED, DEFAULT_DTYPE = "qwen3-0.6b", 4, 0, "bfloat16"

# Qwen3's published generation_config.json (sampling defaults for thinking mode)
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


def _readme(preset: str, cfg, seed: int, dtype: str) -> str:
    kind = "MoE" if cfg.is_moe else "dense"
    return f"""# Random-weight Qwen3 checkpoint (made by qwen3lab)

**The weights are random.** They are NOT Qwen3's trained weights and the model produces meaningless text.
They have the real shapes and are scaled so activations stay in a realistic range, which is what
testing a runtime, verifying a port layer by layer, and benchmarking need.

- preset: `{preset}` ({kind}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, \
heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, head_dim {cfg.head_dim})
- seed: {seed} (same preset, layers, seed and dtype give byte-identical files)
- dtype: {dtype}
- made with: `qwen3lab make-model <dir> --preset {preset} --layers {cfg.num_hidden_layers} --seed {seed} \
--dtype {dtype}`

The tokenizer files are Qwen3's (Apache-2.0, Copyright Alibaba Cloud, the Qwen team), byte-identical to
those published with Qwen/Qwen3-0.6B. The dir loads in HuggingFace transformers
(`AutoModelForCausalLM.from_pretrained(dir)`) and in qwen3lab.
"""


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite or (out / MARKER).is_file():
        return
    raise InputError(
        f"{out}: directory is not empty and was not made by qwen3lab make-model; refusing to overwrite it "
        f"(choose another dir, or pass overwrite=True / --overwrite)"
    )


def _check_resources(cfg, tdt, out: Path, preset: str, layers: int | None) -> None:
    """Refuse, with the figures, a model this machine cannot hold in memory or its disk cannot take, before
    minutes of random weights: they are all held in `dtype` (plus one tensor in float32 while it is made).
    A one-layer cfg stands for `layers` copies of its layer (no loop over the layers)."""
    shapes = {k: math.prod(s) for k, s in expected_shapes(cfg).items()}
    n = sum(shapes.values())
    if layers is not None and cfg.num_hidden_layers == 1:
        n += (layers - 1) * sum(v for k, v in shapes.items() if k.startswith("model.layers.0."))
    weights = n * tdt.itemsize
    what = f"--preset {preset}" + (f" --layers {layers}" if layers is not None else "")
    check_memory(weights + max(shapes.values()) * 4, what)
    check_disk(weights, out, what)


def make_model(
    out_dir: str | Path,
    preset: str = "tiny",
    layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_size: int | str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of `preset` (num_hidden_layers = layers if given) into out_dir."""
    out = Path(out_dir)
    _check_target(out, overwrite)
    tdt = checkpoint_dtype(dtype)
    name = dtype_name(tdt)
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0):
        raise InputError(f"layers must be a positive integer, got {layers!r}")
    if shard_size is not None:  # refused here, before minutes of random weights and before any file is touched
        shard_size = parse_size(shard_size)
    if layers is not None:  # sized from one layer first: a config of 10**12 layers is slow even to check
        one = preset_config(preset, num_hidden_layers=1, torch_dtype=name, **overrides)
        _check_resources(one, tdt, out, preset, layers)
    cfg = preset_config(preset, num_hidden_layers=layers, torch_dtype=name, **overrides)
    _check_resources(cfg, tdt, out, preset, layers)
    # generated per tensor in float32 and converted at once, so peak memory is the model in `dtype`
    tensors = random_weights(cfg, seed=seed, dtype=tdt)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, cfg, tensors, dtype=tdt, shard_size=shard_size)
    del tensors

    (out / "tokenizer.json").write_text(bundled_file_text("tokenizer.json"), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(bundled_file_text("tokenizer_config.json"), encoding="utf-8")
    gen = dict(GENERATION_CONFIG)
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(preset, cfg, seed, name), encoding="utf-8")
    marker = {"preset": preset, "layers": cfg.num_hidden_layers, "seed": seed, "dtype": name,
              "overrides": {k: v for k, v in overrides.items() if v is not None}}
    (out / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return out


def cache_dir() -> Path:
    env = os.environ.get("QWEN3LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwen3lab"


def default_model_dir() -> Path:
    return cache_dir() / f"default-{DEFAULT_PRESET}-{DEFAULT_LAYERS}l"


def ensure_default_model() -> Path:
    """The default model dir, made on first use (qwen3-0.6b shapes, 4 layers, seed 0, bfloat16)."""
    target = default_model_dir()
    if (target / MARKER).is_file() and (target / "config.json").is_file():
        return target
    if target.exists():
        # Never delete what we did not write: our own writes appear only complete (renamed into place).
        raise InputError(f"{target}: exists but is not a complete qwen3lab model; remove it to have it remade")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        make_model(tmp, preset=DEFAULT_PRESET, layers=DEFAULT_LAYERS, dtype=DEFAULT_DTYPE, seed=DEFAULT_SEED,
                   overwrite=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # another process renamed its (identical) model into place first: keep that one
            if not (target / MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
