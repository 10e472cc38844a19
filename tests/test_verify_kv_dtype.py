"""Issue 15 item 4: block-format labels, an unknown label is an error listing the known ones, and a KV cache in
float16 (llama.cpp's default) loosens only the taps after the cache. The f16-KV "port" is the oracle's code in
float32 with K and V rounded to float16 before attention; its error is measured here against float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3lab.errors import Qwen3LabError
from qwen3lab.make_model import make_model
from qwen3lab.models import numpy_ref
from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.taps import write_dump
from qwen3lab.verify import verify
from qwen3lab.verify.tolerances import DTYPE_DEFAULTS, KV_DEFAULTS, for_tap, tolerance_for

IDS = [5, 17, 300, 2, 99, 41, 7, 8, 200, 3, 11, 60]


def test_labels_and_unknown_label():
    assert tolerance_for("q8_0") == DTYPE_DEFAULTS["q8_0"]
    assert tolerance_for("Q4_K_M").name == "q4_k"
    with pytest.raises(Qwen3LabError, match=r"unknown dtype 'q3_k'.*q8_0.*q4_0"):
        tolerance_for("q3_k")
    with pytest.raises(Qwen3LabError, match="unknown KV-cache dtype 'q5_1'.*float16"):
        tolerance_for("float32", kv_dtype="q5_1")


def test_kv_tolerance_reaches_the_taps_after_the_cache_only():
    tol = tolerance_for("float32", kv_dtype="f16")
    f32, kv = DTYPE_DEFAULTS["float32"], KV_DEFAULTS["float16"]
    assert for_tap(tol, "layers.0.k_rot").rel_max == f32.rel_max  # before the cache
    assert for_tap(tol, "layers.0.probs").rel_max == kv.rel_max
    assert for_tap(tol, "layers.1.q").rel_max == kv.rel_max and for_tap(tol, "logits").rel_max == kv.rel_max
    # isolated: every op ran on the reference's inputs; only the cache readers carry the cache's rounding
    assert for_tap(tol, "layers.1.q", grafted=True).rel_max == f32.rel_max
    assert for_tap(tol, "layers.1.attn", grafted=True).rel_max == kv.rel_max
    assert tolerance_for("bfloat16", kv_dtype="float16").kv is None  # the compute is already looser


def _f16_kv_port(model: Path, path: Path, bug=None) -> Path:
    b = NumpyBackend.from_pretrained(model, dtype="float32")
    if bug:
        bug(b.weights)
    orig = numpy_ref.attention

    def f16(x):
        return torch.from_numpy(np.ascontiguousarray(x)).half().float().numpy()

    numpy_ref.attention = lambda q, k, v, *a, **kw: orig(q, f16(k), f16(v), *a, **kw)
    try:
        taps = b.run(IDS, taps="all").taps
    finally:
        numpy_ref.attention = orig
    return write_dump(path, taps, backend="f16-kv port", dtype="float32", input_ids=IDS,
                      extra={"kv_dtype": "float16"})


def test_f16_kv_port_passes_with_its_kv_dtype_and_a_real_bug_still_fails(tmp_path):
    model = make_model(tmp_path / "tiny", preset="tiny", vocab_size=512, seed=2)
    clean = _f16_kv_port(model, tmp_path / "clean.safetensors")
    strict = verify("numpy", f"dump:{clean}", model_path=model, kv_dtype="float32")
    assert not strict.overall_success, "the f16 cache's rounding should exceed float32's 1e-4 here"
    assert strict.first_divergence.site in ("probs", "attn", "attn_out"), strict.sentence()
    rep = verify("numpy", f"dump:{clean}", model_path=model)  # kv_dtype from the dump's metadata
    assert rep.overall_success, rep.sentence()
    assert "float16 KV cache" in rep.tolerance.name

    def q_norm_ones(w):
        w["model.layers.0.self_attn.q_norm.weight"][:] = 1.0

    buggy = _f16_kv_port(model, tmp_path / "bug.safetensors", q_norm_ones)
    rep = verify("numpy", f"dump:{buggy}", model_path=model)
    assert rep.first_divergence.name == "layers.0.q_norm", rep.sentence()


@pytest.mark.slow  # loads the torch model (~2 s)
def test_band_thresholds_come_from_the_references_own_spread(tmp_path, one_torch_thread):
    """A bfloat16 dump (our torch model's taps) with one tap 5% off: inside bfloat16's one-size 0.08, outside
    the band measured from the reference's own bfloat16 spread at that tap; the clean dump passes both."""
    from qwen3lab.loading import load

    model = make_model(tmp_path / "tiny", preset="tiny", vocab_size=512, seed=2)
    taps = load(model, backend="torch", dtype="bfloat16").run(np.asarray(IDS), taps="all").taps
    taps = {k: np.asarray(v, dtype=np.float32) for k, v in taps.items()}
    clean = write_dump(tmp_path / "c.safetensors", taps, backend="p", dtype="bfloat16", input_ids=IDS)
    off = write_dump(tmp_path / "o.safetensors", dict(taps, **{"layers.1.mlp_out": taps["layers.1.mlp_out"] * 1.05}),
                     backend="p", dtype="bfloat16", input_ids=IDS)
    assert verify("numpy", f"dump:{off}", model_path=model).overall_success  # 0.05 < 0.08: missed without a band
    rep = verify("numpy", f"dump:{off}", model_path=model, band=True)
    assert rep.first_divergence.name == "layers.1.mlp_out", rep.sentence()
    assert any(n.startswith("--band:") for n in rep.notes), rep.notes
    band = rep.tolerance.bands["layers.1.mlp_out"]
    assert DTYPE_DEFAULTS["float32"].rel_max <= band.rel_max < 0.05, band
    ok = verify("numpy", f"dump:{clean}", model_path=model, band=True)
    assert ok.overall_success, ok.sentence()
