"""make_model: checkpoints load in transformers with HF's parameters equal ours, real Qwen3-0.6B shapes,
determinism, overwrite protection, and the atomically made default model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import qwen3lab.make_model as mm
from qwen3lab.config import Qwen3Config
from qwen3lab.errors import InputError, WeightsError
from qwen3lab.make_model import default_model_dir, ensure_default_model, make_model
from qwen3lab.tokenizer import Tokenizer
from qwen3lab.weights import load_weights

pytestmark = pytest.mark.slow


def _hf_split(sd: dict, cfg) -> dict:
    """transformers 5 fuses MoE experts ([E, 2I, D] gate rows then up rows; [E, D, I]): split per expert."""
    out = {}
    I = cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k.removesuffix(".gate_up_proj")
            for e in range(v.shape[0]):
                out[f"{p}.{e}.gate_proj.weight"], out[f"{p}.{e}.up_proj.weight"] = v[e, :I], v[e, I:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k.removesuffix(".down_proj")
            for e in range(v.shape[0]):
                out[f"{p}.{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("preset,shard", [("tiny", None), ("tiny-moe", None), ("tiny-moe", "4MB")])
def test_loads_in_transformers_with_equal_parameters(tmp_path, preset, shard):
    transformers = pytest.importorskip("transformers")
    d = make_model(tmp_path / preset, preset, dtype="bfloat16", seed=1, shard_size=shard)
    assert (d / "model.safetensors.index.json").exists() == bool(shard)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if preset == "tiny-moe" else "Qwen3ForCausalLM")
    cfg = Qwen3Config.from_file(d)
    ours = load_weights(d, cfg, dtype=torch.float32)
    theirs = _hf_split({k: v.detach() for k, v in hf.state_dict().items()}, cfg)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    only_ours, only_hf = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not only_ours and not only_hf, (only_ours[:5], only_hf[:5])
    diffs = {k: (ours[k].float() - theirs[k].float()).abs().max().item() for k in ours
             if ours[k].shape != theirs[k].shape or not torch.equal(ours[k].float(), theirs[k].float())}
    assert not diffs, diffs
    # and what transformers reads of the rest of the dir
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert (gen.eos_token_id, gen.bos_token_id, gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (
        [151645, 151643], 151643, True, 0.6, 20, 0.95)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(prompt) == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    ours_tok = Tokenizer.from_dir(d)
    assert ours_tok.note is None and ours_tok.eos_token_ids == [151645, 151643]
    assert ours_tok.encode(prompt) == tok.encode(prompt)


def test_0_6b_one_layer_has_real_shapes(tmp_path):
    d = make_model(tmp_path / "q06", "qwen3-0.6b", layers=1, seed=0)
    # Qwen3-0.6B's tensors (hand-written from the published checkpoint: hidden 1024, 16 q heads, 8 kv heads,
    # head_dim 128, intermediate 3072, vocab 151936, tied lm_head not stored)
    want = {
        "model.embed_tokens.weight": [151936, 1024],
        "model.layers.0.input_layernorm.weight": [1024],
        "model.layers.0.self_attn.q_proj.weight": [2048, 1024],
        "model.layers.0.self_attn.k_proj.weight": [1024, 1024],
        "model.layers.0.self_attn.v_proj.weight": [1024, 1024],
        "model.layers.0.self_attn.o_proj.weight": [1024, 2048],
        "model.layers.0.self_attn.q_norm.weight": [128],
        "model.layers.0.self_attn.k_norm.weight": [128],
        "model.layers.0.post_attention_layernorm.weight": [1024],
        "model.layers.0.mlp.gate_proj.weight": [3072, 1024],
        "model.layers.0.mlp.up_proj.weight": [3072, 1024],
        "model.layers.0.mlp.down_proj.weight": [1024, 3072],
        "model.norm.weight": [1024],
    }
    with safe_open(d / "model.safetensors", "pt") as f:
        got = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert dtypes == {"BF16"}
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["head_dim"], cfg["torch_dtype"], cfg["tie_word_embeddings"],
            cfg["architectures"]) == (1, 128, "bfloat16", True, ["Qwen3ForCausalLM"])
    readme = (d / "README.md").read_text()
    assert "**The weights are random.**" in readme and "qwen3-0.6b" in readme


def test_determinism(tmp_path):
    a = make_model(tmp_path / "a", "tiny-moe", seed=7)
    b = make_model(tmp_path / "b", "tiny-moe", seed=7)
    c = make_model(tmp_path / "c", "tiny-moe", seed=8)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    cfg = Qwen3Config.from_file(a)
    wa, wc = load_weights(a, cfg), load_weights(c, cfg)
    same = [k for k in wa if torch.equal(wa[k], wc[k])]
    # only the norm weights could coincide, and with noise they must not either
    assert not same, same
    f32 = make_model(tmp_path / "f32", "tiny-moe", seed=7, dtype="float32")
    w32 = load_weights(f32, cfg, dtype=torch.bfloat16)  # same numbers, rounded once to bf16
    assert all(torch.equal(w32[k], wa[k].to(torch.bfloat16)) for k in wa)


def test_overwrite_protection(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="not empty and was not made by qwen3lab"):
        make_model(foreign, "tiny")
    assert (foreign / "notes.txt").read_text() == "precious" and not (foreign / "config.json").exists()
    make_model(foreign, "tiny", overwrite=True)
    assert (foreign / "config.json").exists()
    # a qwen3lab-made dir may be remade; a sharded remake leaves no stale single file behind
    ours = make_model(tmp_path / "ours", "tiny")
    make_model(ours, "tiny", shard_size="5MB", seed=2)
    assert not (ours / "model.safetensors").exists() and (ours / "model.safetensors.index.json").exists()
    make_model(ours, "tiny")
    assert (ours / "model.safetensors").exists() and not list(ours.glob("model-*-of-*.safetensors"))
    with pytest.raises(InputError, match="layers must be a positive integer"):
        make_model(tmp_path / "x", "tiny", layers=0)
    with pytest.raises(InputError, match="unknown dtype"):
        make_model(tmp_path / "x", "tiny", dtype="int4")
    with pytest.raises(InputError, match="float32, bfloat16 or float16, not float64"):
        make_model(tmp_path / "x", "tiny", dtype="float64")
    assert not (tmp_path / "x").exists()


def test_default_model_is_made_atomically(tmp_path, monkeypatch):
    # the mechanics, on the tiny preset to stay fast (the real default is checked in the slow test below)
    monkeypatch.setenv("QWEN3LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mm, "DEFAULT_PRESET", "tiny")
    target = default_model_dir()
    assert target == tmp_path / "cache" / "default-tiny-4l"

    def boom(*a, **k):
        raise WeightsError("disk full (simulated)")

    monkeypatch.setattr(mm, "save_checkpoint", boom)
    with pytest.raises(WeightsError, match="simulated"):
        ensure_default_model()
    assert not target.exists() and os.listdir(tmp_path / "cache") == [], "an interrupted run left files"
    monkeypatch.undo()
    monkeypatch.setenv("QWEN3LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mm, "DEFAULT_PRESET", "tiny")
    d = ensure_default_model()
    assert d == target and Qwen3Config.from_file(d).num_hidden_layers == 4
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == d and (d / "model.safetensors").stat().st_mtime_ns == stamp  # not remade
    assert os.listdir(tmp_path / "cache") == ["default-tiny-4l"]


def test_default_model_refuses_foreign_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3LAB_CACHE", str(tmp_path))
    default_model_dir().mkdir(parents=True)
    (default_model_dir() / "half.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a complete qwen3lab model"):
        ensure_default_model()


@pytest.mark.slow
def test_real_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3LAB_CACHE", str(tmp_path))
    d = ensure_default_model()
    assert d == tmp_path / "default-qwen3-0.6b-4l"
    cfg = Qwen3Config.from_file(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.torch_dtype) == (1024, 4, 128, 16, 8, 3072, 151936, "bfloat16")
    w = load_weights(d, cfg, dtype=torch.bfloat16)
    assert w["lm_head.weight"] is w["model.embed_tokens.weight"] and len(w) == 2 + 4 * 11 + 1


# ---- nothing lost on bad input (issue: `make-model DIR --shard-size abc` deleted model.safetensors) ----------
def _snapshot(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_bad_shard_size_leaves_an_existing_checkpoint_byte_identical(tmp_path):
    from click.testing import CliRunner

    from qwen3lab.cli import main

    d = make_model(tmp_path / "m", "tiny", dtype="float32", seed=3)
    before = _snapshot(d)
    res = CliRunner().invoke(main, ["make-model", str(d), "--preset", "tiny", "--shard-size", "abc"])
    assert res.exit_code == 2 and "shard size 'abc' not understood" in res.output, res.output
    assert _snapshot(d) == before  # nothing deleted, nothing half-written, no temp dir left
    fresh = tmp_path / "fresh"
    res = CliRunner().invoke(main, ["make-model", str(fresh), "--preset", "tiny", "--shard-size", "-5MB"])
    assert res.exit_code == 2 and not fresh.exists(), res.output  # refused before the dir is even made


def test_a_write_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import qwen3lab.checkpoint_save as W  # where save_checkpoint looks save_file up

    d = make_model(tmp_path / "m", "tiny", dtype="float32", seed=3)
    before = _snapshot(d)
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first is already on disk (in the temp dir)
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    real_save = W.save_file
    monkeypatch.setattr(W, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        make_model(d, "tiny", dtype="float32", seed=4, shard_size="4MB")
    assert len(calls) == 2 and _snapshot(d) == before
