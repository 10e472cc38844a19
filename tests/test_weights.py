"""weights.py: round trips against random_init and raw safetensors reads, sharding, every bad-input case with its
message, and the fused MoE layout against transformers' own in-memory parameters."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen3lab.checkpoint_save import parse_size, save_checkpoint
from qwen3lab.config import Qwen3Config
from qwen3lab.errors import InputError, NumericsError, WeightsError
from qwen3lab.make_model import make_model
from qwen3lab.presets import preset_config
from qwen3lab.random_init import random_weights
from qwen3lab.shapes import expected_shapes
from qwen3lab.weights import check_finite, load_weights

SMALL = {"vocab_size": 1024}  # a small embedding keeps these tests fast; the real vocab is tested elsewhere


def _diff(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (with max abs diff), for a readable failure message."""
    out = [f"only in first: {n}" for n in a if n not in b] + [f"only in second: {n}" for n in b if n not in a]
    for n in a:
        if n in b:
            x, y = a[n].float(), b[n].float()
            if x.shape != y.shape:
                out.append(f"{n}: shape {list(x.shape)} vs {list(y.shape)}")
            elif not torch.equal(x, y):
                out.append(f"{n}: max abs diff {(x - y).abs().max().item():.3g}")
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints made once per module; tests copy before breaking them."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "tiny": make_model(root / "tiny", "tiny", dtype="bfloat16", seed=3, **SMALL),
        "tiny32": make_model(root / "tiny32", "tiny", dtype="float32", seed=3, **SMALL),
        "moe": make_model(root / "moe", "tiny-moe", dtype="float32", seed=5, **SMALL),
    }


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    """Load a safetensors file raw, let edit() change the dict, write it back."""
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---- round trips ----------------------------------------------------------------------------------
def test_roundtrip_bf16_file(made):
    cfg = Qwen3Config.from_file(made["tiny"])
    assert cfg.tie_word_embeddings and cfg.torch_dtype == "bfloat16"
    ref = random_weights(preset_config("tiny", **SMALL), seed=3, dtype=torch.bfloat16)  # independent of the file
    w = load_weights(made["tiny"], cfg, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in w.values())
    d = _diff({n: w[n] for n in ref}, ref)
    assert not d, d
    # tied: lm_head IS the embedding tensor, not a copy
    assert w["lm_head.weight"] is w["model.embed_tokens.weight"]
    # the file holds exactly the expected names (tied lm_head not stored), in bfloat16
    raw = load_file(made["tiny"] / "model.safetensors")
    assert set(raw) == set(expected_shapes(cfg)) and "lm_head.weight" not in raw
    assert {t.dtype for t in raw.values()} == {torch.bfloat16}


def test_roundtrip_dtypes(made):
    cfg = Qwen3Config.from_file(made["tiny32"])
    raw = load_file(made["tiny32"] / "model.safetensors")
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = load_weights(made["tiny32"], cfg, dtype=dt)
        d = _diff({n: w[n] for n in raw}, {n: t.to(dt) for n, t in raw.items()})
        assert not d, (dt, d)
        assert {t.dtype for t in w.values()} == {dt}
    assert load_weights(made["tiny32"], cfg, dtype="bf16")["model.norm.weight"].dtype == torch.bfloat16


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has `path` memory-mapped (Linux /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[-1] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_same_dtype_keeps_mapped_tensor(made):
    # float32 file loaded as float32: the tensors are the file's mapped pages, not copies (no second copy of the
    # checkpoint in memory); converted ones are fresh memory. Mappings are copy-on-write: editing a loaded
    # tensor must not change the file.
    cfg = Qwen3Config.from_file(made["tiny32"])
    w = load_weights(made["tiny32"], cfg, dtype=torch.float32)
    ranges = _mapped_ranges(made["tiny32"] / "model.safetensors")
    inside = [n for n, t in w.items() if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    assert len(inside) == len(w), f"{len(w) - len(inside)} of {len(w)} tensors are copies, e.g. " \
        f"{sorted(set(w) - set(inside))[:3]}"
    w16 = load_weights(made["tiny32"], cfg, dtype=torch.bfloat16)
    ranges = _mapped_ranges(made["tiny32"] / "model.safetensors")
    assert not [n for n, t in w16.items() if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    before = load_file(made["tiny32"] / "model.safetensors")["model.norm.weight"].clone()
    w["model.norm.weight"].zero_()
    after = load_file(made["tiny32"] / "model.safetensors")["model.norm.weight"]
    assert torch.equal(before, after)


def test_moe_roundtrip(made):
    cfg = Qwen3Config.from_file(made["moe"])
    ref = random_weights(preset_config("tiny-moe", **SMALL), seed=5)
    w = load_weights(made["moe"], cfg)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in w and "model.layers.0.mlp.gate.weight" in w
    assert w["lm_head.weight"] is not w["model.embed_tokens.weight"]  # untied
    d = _diff(w, ref)
    assert not d, d


def test_sharded_equals_unsharded(made, tmp_path):
    cfg = Qwen3Config.from_file(made["moe"])
    tensors = load_weights(made["moe"], cfg)
    out = save_checkpoint(tmp_path / "sharded", cfg, tensors, dtype=torch.float32, shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", shards
    assert not (out / "model.safetensors").exists()
    sizes = 0
    for s in shards:
        with safe_open(out / s, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert index["metadata"]["total_size"] == sizes
    w = load_weights(out, cfg)
    d = _diff(w, tensors)
    assert not d, d
    # the index file itself is also accepted as the path
    assert not _diff(load_weights(out / "model.safetensors.index.json", cfg), tensors)


def test_tied_checkpoint_with_stored_lm_head_copy(made, tmp_path):
    ck = _copy(made["tiny32"], tmp_path)
    _rewrite(ck / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] * 1))
    cfg = Qwen3Config.from_file(ck)
    w = load_weights(ck, cfg)
    assert w["lm_head.weight"] is w["model.embed_tokens.weight"]


def test_parse_size():
    assert parse_size("200MB") == 200 * 10**6 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(4096) == 4096
    for bad in ("lots", "-1MB", 0, "12 parsecs"):
        with pytest.raises(InputError, match="shard size"):
            parse_size(bad)


# ---- bad inputs -------------------------------------------------------------------------------------
def _load_error(ck: Path, exc=WeightsError, **kw) -> str:
    cfg = Qwen3Config.from_file(ck)
    with pytest.raises(exc) as e:
        load_weights(ck, cfg, **kw)
    return str(e.value)


def test_missing_tensor(made, tmp_path):
    ck = _copy(made["tiny"], tmp_path)
    _rewrite(ck / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    msg = _load_error(ck)
    assert "missing tensor 'model.layers.1.self_attn.k_norm.weight' (expected shape [32])" in msg, msg
    assert str(ck) in msg, msg


def test_missing_untied_lm_head(made, tmp_path):
    ck = _copy(made["moe"], tmp_path)
    _rewrite(ck / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    assert "missing tensor 'lm_head.weight' (expected shape [1024, 64])" in _load_error(ck)


def test_unexpected_tensor(made, tmp_path):
    ck = _copy(made["tiny"], tmp_path)
    _rewrite(ck / "model.safetensors", lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(3)))
    msg = _load_error(ck)
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight' (shape [3])" in msg, msg
    assert str(ck / "model.safetensors") in msg and "strict=False" in msg, msg
    w = load_weights(ck, Qwen3Config.from_file(ck), strict=False)
    assert "model.layers.0.mlp.extra.weight" not in w


def test_wrong_shape(made, tmp_path):
    ck = _copy(made["tiny"], tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(ck / "model.safetensors", lambda t: t.__setitem__(q, torch.zeros(64, 64, dtype=torch.bfloat16)))
    msg = _load_error(ck)
    assert "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [64, 64], expected [128, 64]" in msg, msg
    assert str(ck / "model.safetensors") in msg, msg


@pytest.mark.parametrize("dtype,shown", [(torch.int32, "I32"), (torch.float64, "F64"), (torch.int8, "I8")])
def test_wrong_dtype(made, tmp_path, dtype, shown):
    ck = _copy(made["tiny"], tmp_path)
    _rewrite(ck / "model.safetensors", lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(dtype)))
    msg = _load_error(ck)
    assert f"tensor 'model.norm.weight' has dtype {shown}" in msg and "float32 (F32), bfloat16 (BF16)" in msg, msg


def test_truncated_file(made, tmp_path):
    ck = _copy(made["tiny"], tmp_path)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = _load_error(ck)
    assert f"{f}: truncated or corrupt safetensors file" in msg, msg


@pytest.mark.parametrize("how", ["garbage_header", "empty", "huge_length"])
def test_corrupt_header(made, tmp_path, how):
    ck = _copy(made["tiny"], tmp_path)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    if how == "garbage_header":
        f.write_bytes(data[:8] + b"\x00not json" + data[17:])
    elif how == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes((2**60).to_bytes(8, "little") + data[8:])
    msg = _load_error(ck)
    assert f"{f}: truncated or corrupt safetensors file" in msg, msg


def _sharded(made, tmp_path) -> Path:
    cfg = Qwen3Config.from_file(made["moe"])
    return save_checkpoint(tmp_path / "sh", cfg, load_weights(made["moe"], cfg), dtype="float32", shard_size="100KB")


def test_shard_absent(made, tmp_path):
    ck = _sharded(made, tmp_path)
    shutil.copy(made["moe"] / "config.json", ck / "config.json")
    (gone,) = ck.glob("model-00002-of-*.safetensors")
    gone.unlink()
    msg = _load_error(ck)
    assert "model.safetensors.index.json: shard model-00002-of-" in msg and "listed in the index" in msg, msg
    assert "but the file is absent" in msg and "for tensor 'model." in msg, msg


def test_index_malformed(made, tmp_path):
    ck = _sharded(made, tmp_path)
    idx = ck / "model.safetensors.index.json"
    idx.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors",}}')
    assert f"{idx}: malformed JSON at line 1" in _load_error(ck)
    idx.write_text('{"metadata": {}}')
    assert f"{idx}: no 'weight_map'" in _load_error(ck)
    idx.write_text('{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}')
    assert "points outside the checkpoint dir" in _load_error(ck)


def test_index_names_tensor_not_in_shard(made, tmp_path):
    ck = _sharded(made, tmp_path)
    idx = ck / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    first = d["weight_map"]["model.norm.weight"]
    other = next(s for s in d["weight_map"].values() if s != first)
    d["weight_map"]["model.norm.weight"] = other
    idx.write_text(json.dumps(d))
    msg = _load_error(ck)
    assert "tensor 'model.norm.weight' is listed for this shard" in msg and other in msg, msg


class _Payload:
    """Unpickling this would create a file: proof that a loader ran pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "consolidated.pth", "model.pt"])
def test_pickle_refused(tmp_path, fname):
    ck = tmp_path / "ck"
    ck.mkdir()
    cfg = preset_config("tiny", **SMALL)
    (ck / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    marker = tmp_path / "pwned"
    (ck / fname).write_bytes(pickle.dumps({"model.norm.weight": _Payload(marker)}))
    msg = _load_error(ck)
    assert f"only pickle weights found ({fname})" in msg, msg
    assert "can execute" in msg and "safe_serialization=True" in msg and "safetensors" in msg, msg
    assert not marker.exists(), "the pickle was unpickled"
    # the file path itself is refused too
    with pytest.raises(WeightsError, match="does not load pickles"):
        load_weights(ck / fname, cfg)
    assert not marker.exists()


def test_no_weights_and_no_dir(tmp_path):
    cfg = preset_config("tiny", **SMALL)
    with pytest.raises(WeightsError, match="no weights found"):
        load_weights(tmp_path, cfg)
    with pytest.raises(WeightsError, match="no such checkpoint"):
        load_weights(tmp_path / "nope", cfg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_weight(made, tmp_path, bad):
    ck = _copy(made["tiny"], tmp_path)

    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][5, 7] = bad

    _rewrite(ck / "model.safetensors", poison)
    msg = _load_error(ck, exc=NumericsError)
    kind = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    assert f"tensor 'model.layers.1.mlp.up_proj.weight' holds {kind} values (first at index [5, 7]" in msg, msg
    w = load_weights(ck, Qwen3Config.from_file(ck), check_finite=False)  # opt-out still loads
    with pytest.raises(NumericsError, match="up_proj"):
        check_finite(w)


def test_error_messages_are_weightserrors_not_crashes(made, tmp_path):
    # a config whose shapes differ from the checkpoint everywhere: first error names a tensor and both shapes
    cfg = preset_config("tiny", vocab_size=2048)
    with pytest.raises(WeightsError) as e:
        load_weights(made["tiny"], cfg)
    assert "'model.embed_tokens.weight' has shape [1024, 64], expected [2048, 64]" in str(e.value), str(e.value)


# ---- fused MoE layout (transformers 5) ------------------------------------------------------------------
def _fuse(tensors: dict, cfg) -> dict:
    """Per-expert tensors -> transformers-5 fused layout, built by hand: gate rows first, then up rows."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        E = cfg.num_experts
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]]) for e in range(E)]
        )  # [E, 2I, D]
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(E)])  # [E, D, I]
    return out


def test_fused_layout_by_hand(made, tmp_path):
    cfg = Qwen3Config.from_file(made["moe"])
    per_expert = load_weights(made["moe"], cfg)
    ck = _copy(made["moe"], tmp_path)
    save_file(_fuse(load_file(made["moe"] / "model.safetensors"), cfg), ck / "model.safetensors",
              metadata={"format": "pt"})
    d = _diff(load_weights(ck, cfg), per_expert)
    assert not d, d


@pytest.mark.hf
def test_fused_layout_from_transformers(made, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = Qwen3Config.from_file(made["moe"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(made["moe"], dtype=torch.float32)
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd, sorted(sd)[:20]  # HF 5 keeps experts fused
    ck = _copy(made["moe"], tmp_path)
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    d = _diff(load_weights(ck, cfg), load_weights(made["moe"], cfg))
    assert not d, d


def test_fused_layout_errors(made, tmp_path):
    cfg = Qwen3Config.from_file(made["moe"])
    ck = _copy(made["moe"], tmp_path)
    fused = _fuse(load_file(made["moe"] / "model.safetensors"), cfg)
    bad = dict(fused)
    down = "model.layers.1.mlp.experts.down_proj"
    bad[down] = bad[down].transpose(1, 2).contiguous()  # [E, I, D]: the wrong way round
    save_file(bad, ck / "model.safetensors", metadata={"format": "pt"})
    msg = _load_error(ck)
    assert "'model.layers.1.mlp.experts.down_proj' has shape [8, 32, 64], expected [8, 64, 32]" in msg, msg
    both = dict(fused)
    both["model.layers.0.mlp.experts.3.up_proj.weight"] = torch.zeros(32, 64)
    save_file(both, ck / "model.safetensors", metadata={"format": "pt"})
    assert "stores experts both fused" in _load_error(ck)


def test_check_finite_no_false_alarm_on_overflowing_sum():
    # the fast path sums each tensor; a float16 sum of large finite values overflows but the tensor is fine
    w = {"a": torch.full((64, 64), 6e4, dtype=torch.float16)}
    assert not torch.isfinite(w["a"].sum())
    check_finite(w)
    w["b"] = torch.tensor([1.0, float("-inf"), float("inf"), float("nan")])
    with pytest.raises(NumericsError, match=r"tensor 'b' holds 1 NaN and 2 Inf values \(first at index \[1\]: -inf\)"):
        check_finite(w, source="x")
