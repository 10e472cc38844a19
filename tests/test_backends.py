"""backends/: the shared tap / weight check every adapter uses, and the PREFIX: registry.

Expected shapes are written out by hand from the tiny config's sizes (DESIGN.md tap table), not taken from
the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen3lab.backends import ADAPTERS, adapter_for
from qwen3lab.backends.check import TapCheck, check_weight_shapes, why_not_a_tap
from qwen3lab.errors import WeightsError
from qwen3lab.presets import preset_config
from qwen3lab.shapes import expected_shapes


@pytest.fixture(scope="module")
def cfg():
    return preset_config("tiny")


def test_tap_check_strips_a_batch_of_one_and_notes_wrong_shapes_and_names(cfg):
    Hq, Dh, D = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    chk = TapCheck(cfg, "port")
    good = np.zeros((1, 5, Hq, Dh))  # a torch-style batch of one
    assert chk.one("layers.0.q", good, 5).shape == (5, Hq, Dh)
    flat = np.zeros((5, Hq * Dh))  # heads not split: kept (compare says shape_mismatch) and noted
    assert chk.one("layers.0.attn", flat, 5).shape == (5, Hq * Dh)
    assert chk.one("Qcur-0", np.zeros(3), 5) is None  # not a tap: dropped with the reason
    assert chk.one(f"layers.{cfg.num_hidden_layers}.q", good, 5) is None
    assert chk.one("layers.0.router_logits", np.zeros((5, 4)), 5) is None  # a MoE site in a dense layer
    assert chk.one("embed", np.zeros((5, D)), 5).shape == (5, D)
    text = "\n".join(chk.lines())
    print(text)
    assert f"[T, Hq, Dh] = [5, {Hq}, {Dh}]" in text and f"layers.0.attn [5, {Hq * Dh}]" in text
    assert "not compared, not a tap name (give a name map with --map): Qcur-0" in text
    assert f"layer {cfg.num_hidden_layers} does not exist" in text
    assert "not a tap of dense layer 0: layers.0.router_logits" in text
    assert "embed" not in text and "layers.0.q " not in text


def test_tap_check_decode_step_shapes(cfg):
    """7 ids, 2 of them decode steps: prefill T = 5; step j has one row attending over 5 + j + 1 positions."""
    Hq = cfg.num_attention_heads
    chk = TapCheck(cfg, "port")
    assert chk.expected("layers.0.probs", 7, 2) == (Hq, 5, 5)
    assert chk.expected("step1.layers.0.probs", 7, 2) == (Hq, 1, 7)
    assert chk.expected("step0.logits", 7, 2) == (1, cfg.vocab_size)
    assert chk.expected("step2.logits", 7, 2) is None  # no such step in this run
    assert chk.one("step0.layers.0.probs", np.zeros((Hq, 1, 5)), 7, 2).shape == (Hq, 1, 5)
    assert "step0.layers.0.probs" in "".join(chk.lines())  # 5 positions where 6 were attended


def test_weight_check_names_the_tensor(cfg):
    want = expected_shapes(cfg, include_lm_head=not cfg.tie_word_embeddings)
    check_weight_shapes(cfg, want, "m")  # the config's own shapes pass
    bad = {**want, "model.layers.1.mlp.down_proj.weight": (3, 3)}
    with pytest.raises(WeightsError, match=r"m: tensor 'model.layers.1.mlp.down_proj.weight' has shape \[3, 3\]"):
        check_weight_shapes(cfg, bad, "m")
    with pytest.raises(WeightsError, match="missing tensor 'model.norm.weight'"):
        check_weight_shapes(cfg, {k: v for k, v in want.items() if k != "model.norm.weight"}, "m")
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.9.x.weight'"):
        check_weight_shapes(cfg, {**want, "model.layers.9.x.weight": (1,)}, "m")


def test_weight_check_takes_fused_experts():
    """transformers 5 keeps MoE experts fused: [E, 2*MI, D] and [E, D, MI] per layer."""
    cfg = preset_config("tiny-moe")
    E, MI, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    shapes = {k: v for k, v in expected_shapes(cfg).items() if ".mlp.experts." not in k}
    for i in range(cfg.num_hidden_layers):
        shapes[f"model.layers.{i}.mlp.experts.gate_up_proj"] = (E, 2 * MI, D)
        shapes[f"model.layers.{i}.mlp.experts.down_proj"] = (E, D, MI)
    check_weight_shapes(cfg, shapes, "hf")
    shapes["model.layers.0.mlp.experts.down_proj"] = (E, MI, D)  # transposed
    with pytest.raises(WeightsError, match=rf"down_proj' has shape \[{E}, {MI}, {D}\], expected \[{E}, {D}, {MI}\]"):
        check_weight_shapes(cfg, shapes, "hf")


def test_registry(cfg, monkeypatch):
    assert adapter_for("dump:x.safetensors")[0] == "x.safetensors"
    assert adapter_for("mymod:MyPort") is None and adapter_for("torch") is None  # plugin / built-in
    assert adapter_for("llama.cpp")[0] == "" and adapter_for("llama.cpp:m.gguf")[0] == "m.gguf"
    monkeypatch.setitem(ADAPTERS, "oracle", "qwen3lab.backends.check:why_not_a_tap")
    assert adapter_for("oracle:anything")[1] is why_not_a_tap


def test_a_registered_adapter_is_a_verify_candidate(cfg, monkeypatch, tmp_path):
    """A spec with a registered prefix goes to its opener (the llama.cpp adapter's path), its notes to the report."""
    import sys
    import types

    from qwen3lab.make_model import make_model
    from qwen3lab.models.numpy_ref import NumpyBackend
    from qwen3lab.verify import verify

    path = make_model(tmp_path / "m", preset="tiny", dtype="float32")
    mod = types.ModuleType("qwen3lab_test_adapter")

    class Echo:  # the oracle itself, with one stray tensor, through the shared check
        name, dtype = "echo", "float64"

        def __init__(self, cfg):
            self.cfg, self.inner, self.check = cfg, NumpyBackend.from_pretrained(path), TapCheck(cfg, "echo")

        def run(self, input_ids, taps=None, graft=None):
            res = self.inner.run(input_ids, taps=taps, graft=graft)
            res.taps = self.check.all({**res.taps, "stray": np.zeros(1)}, len(input_ids))
            return res

    mod.open_echo = lambda rest, *, cfg, **_: Echo(cfg)
    monkeypatch.setitem(sys.modules, "qwen3lab_test_adapter", mod)
    monkeypatch.setitem(ADAPTERS, "echo", "qwen3lab_test_adapter:open_echo")
    rep = verify("numpy", "echo:whatever", [1, 2, 3], model_path=path)
    assert rep.overall_success, rep.sentence()
    assert any("echo: 1 tensor(s) not compared, not a tap name" in n and "stray" in n for n in rep.notes), rep.notes


PLUGIN = '''
import numpy as np
from qwen3lab.models.numpy_ref import NumpyBackend


class Port:  # the oracle with torch-style batched taps, one tap flattened, one stray tensor
    def __init__(self, model_path):
        self.b = NumpyBackend.from_pretrained(model_path)

    def run(self, input_ids, graft=None):
        taps = {k: v[None] for k, v in self.b.run(input_ids, taps="all", graft=graft).taps.items()}
        taps["layers.0.attn"] = taps["layers.0.attn"].reshape(len(input_ids), -1)
        taps["scratch"] = np.zeros(3)
        return taps
'''


def test_a_plugins_taps_go_through_the_shared_check(tmp_path):
    """Batch of one removed (those taps pass), the flattened tap compared as shape_mismatch with a note naming
    its canonical shape, the stray tensor dropped with a note."""
    from qwen3lab.make_model import make_model
    from qwen3lab.verify import verify

    path = make_model(tmp_path / "m", preset="tiny", dtype="float32")
    (tmp_path / "port.py").write_text(PLUGIN)
    rep = verify("numpy", f"{tmp_path / 'port.py'}:Port", [1, 2, 3], model_path=path, isolate=False)
    res = {r.name: r for r in rep.results}
    bad = [r.name for r in rep.results if not r.passed]
    assert bad == ["layers.0.attn"] and res["layers.0.attn"].status == "shape_mismatch", rep.sentence()
    notes = " | ".join(rep.notes)
    print(notes)
    assert "not compared, not a tap name (give a name map with --map): scratch" in notes
    assert "layers.0.attn [3, " in notes and "expected [T, Hq, Dh] = [3, " in notes


def test_bf16_numpy_conversions_match_torch():
    """backends.gguf's bf16 <-> float32 for GGUF bytes and ggml nodes round exactly as torch does (nearest even)."""
    import torch

    from qwen3lab.backends.gguf import bf16_to_f32, f32_to_bf16

    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3
    t = torch.from_numpy(x).bfloat16()
    np.testing.assert_array_equal(f32_to_bf16(x), t.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(x)), t.float().numpy())
