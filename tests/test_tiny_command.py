"""`qwen3lab tiny` end to end: output layout, JSON, --save-model / --model, --weights, --compare."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from qwen3lab.errors import ConfigError, InputError
from qwen3lab.models import numpy_ref
from qwen3lab.tiny.run import run_tiny, run_tiny_command

IDS = [1, 3, 7, 2]
JSON_KEYS = {"config", "test_input", "final_logits", "predictions", "layer_statistics", "stability"}


def _command(**kw) -> tuple[int, str]:
    buf = io.StringIO()
    rc = run_tiny_command(out=buf, **kw)
    return rc, buf.getvalue()


def test_defaults_print_everything_at_80_columns(tmp_path):
    rc, text = _command(output=tmp_path / "r.json")
    assert rc == 0
    for header in ("Layer 0 forward pass", "Layer 1 forward pass", "Layer 0 attention", "Layer 1 MLP",
                   "Numerical stability", "Prediction"):
        assert header in text, header
    wide = [l for l in text.splitlines() if len(l) > 80]
    assert not wide, wide
    assert "..." not in text and "…" not in text
    # every DESIGN.md tap and the pre-softmax scores appear with a header line
    for site in ("attn_in", "q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot", "scores", "probs", "attn",
                 "attn_out", "resid_mid", "mlp_in", "gate", "up", "act", "mlp_out", "resid_post"):
        assert f"\nlayers.1.{site}  [" in text, site
    assert "\nlogits  [4, 10]" in text and "predicted next token:" in text and "top-3:" in text

    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == JSON_KEYS
    assert res["test_input"]["tokens"] == IDS
    assert res["config"]["hidden_size"] == 8 and res["config"]["num_hidden_layers"] == 2
    logits = np.array(res["final_logits"])
    assert logits.shape == (4, 10)
    pred = res["predictions"]
    assert pred["next_token"] == int(np.argmax(logits[-1]))
    p = np.exp(logits[-1] - logits[-1].max())
    p /= p.sum()
    assert pred["probability"] == pytest.approx(p.max())
    assert [t["token"] for t in pred["top3"]] == list(np.argsort(-p)[:3])
    assert set(res["layer_statistics"]) == {"embedding", "layer_0", "layer_1", "final"}
    q = res["layer_statistics"]["layer_0"]["q"]
    assert set(q) == {"shape", "mean", "std", "min", "max"} and q["shape"] == [4, 2, 4]
    assert res["stability"]["passed"] is True
    assert res["stability"]["taps"]["layers.0.probs"]["verdict"] == "ok"


def test_every_matrix_element_is_printed():
    """The q matrix of layer 0, head 1, printed at 4 decimals, holds the oracle's values."""
    res = run_tiny()
    rc, text = _command()
    block = text.split("\nlayers.0.q  [")[1].split("  head 1\n")[1]
    rows = [l.split() for l in block.splitlines()[1:5]]
    want = res.taps["layers.0.q"][:, 1, :]
    for t, row in enumerate(rows):
        assert row[0] == f"t{t}"
        assert [float(x) for x in row[1:]] == pytest.approx(want[t], abs=5e-5)


def test_wider_model_wraps_within_80_columns():
    rc, text = _command(d=16, nlayer=3, nh=4, nkvh=2, dh=4, di=32, dvoc=12, dctx=6, tokens="0,1,2,3")
    assert rc == 0
    assert not [l for l in text.splitlines() if len(l) > 80]
    assert "columns 0-7:" in text and "Layer 2 forward pass" in text


def test_explain_and_compare_in_the_command(tmp_path):
    rc, text = _command(explain=True, compare="torch", moe=True, output=tmp_path / "r.json")
    assert rc == 0
    assert "Hand-computed walkthrough" in text and "Difference matrices (candidate − oracle)" in text
    assert not [l for l in text.splitlines() if len(l) > 80]
    res = json.loads((tmp_path / "r.json").read_text())
    assert JSON_KEYS <= set(res)
    ex = res["explain"]
    assert ex["checks_passed"] == ex["checks_total"] and f"{ex['checks_total']}/{ex['checks_total']} checks passed" \
        in text
    assert res["compare"]["passed"] is True and res["compare"]["first_divergence"] is None


class _BrokenPort:
    """A 'port' of the tiny model whose SwiGLU uses ReLU: the NumPy oracle's code with one op swapped."""

    name = "broken-port"
    dtype = "float64"

    def __init__(self, cfg, weights):
        self.cfg = cfg
        self.inner = numpy_ref.NumpyBackend(weights, cfg)

    def run(self, input_ids, taps=None, graft=None):
        real = numpy_ref.silu
        numpy_ref.silu = lambda x: np.maximum(x, 0)
        try:
            return self.inner.run(input_ids, taps=taps, graft=graft)
        finally:
            numpy_ref.silu = real


def test_compare_names_the_first_differing_tap():
    from qwen3lab.tiny.config import tiny_config
    from qwen3lab.tiny.weights import init_weights

    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    res = run_tiny(candidate=_BrokenPort(cfg, w))
    c = res.comparison
    assert not c.passed and not res.ok
    assert c.first_divergence == "layers.0.act"
    assert c.culprit == "layers.0.act"
    assert "First differing tap: layers.0.act" in c.text
    assert np.allclose(c.diffs["layers.0.gate"], 0) and not np.allclose(c.diffs["layers.0.act"], 0)


def test_torch_compare_in_bfloat16_shows_differences():
    res = run_tiny(compare="torch", dtype="bfloat16")
    c = res.comparison
    assert "bfloat16" in c.report.candidate
    assert np.abs(c.diffs["logits"]).max() > 1e-4  # bf16 rounding is visible in the printed matrices


# ---- checkpoints ---------------------------------------------------------------------------------------
@pytest.mark.hf
@pytest.mark.parametrize("moe", [False, True])
def test_save_model_loads_everywhere(tmp_path, moe):
    import torch
    import transformers

    import qwen3lab
    from qwen3lab.api import load

    out = tmp_path / "tiny-model"
    rc, text = _command(save_model=out, moe=moe)
    assert rc == 0 and f"wrote checkpoint {out}" in text
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    ref = run_tiny(moe=moe)

    oracle = load(out, backend="numpy")
    np.testing.assert_allclose(oracle.run(IDS).logits, ref.logits, rtol=0, atol=1e-12)
    ours = qwen3lab.api.load(out, backend="torch", dtype="float32")
    np.testing.assert_allclose(ours.run(IDS).logits, ref.logits, atol=1e-5)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([IDS])).logits[0].numpy()
    err = np.abs(hf_logits - ref.logits).max()
    assert err < 1e-5, f"HF vs tiny oracle: max |diff| {err:.3g}"

    again = run_tiny(model=out)  # --model DIR: tiny mode on the checkpoint
    np.testing.assert_array_equal(again.logits, ref.logits)
    assert again.cfg.is_moe == moe


def test_model_dir_with_tied_embeddings(tmp_path):
    """A checkpoint without lm_head (tied) runs in tiny mode; the walkthrough's logit uses the embedding."""
    import torch

    from qwen3lab.checkpoint_save import save_checkpoint
    from qwen3lab.tiny.config import tiny_config
    from qwen3lab.tiny.weights import checkpoint_tensors, init_weights

    cfg = tiny_config().replace(tie_word_embeddings=True)
    w = init_weights(cfg, "random", 1)
    assert "lm_head.weight" not in checkpoint_tensors(w, cfg)
    save_checkpoint(tmp_path / "tied", cfg, {k: torch.from_numpy(v).float() for k, v in
                                             checkpoint_tensors(w, cfg).items()}, dtype=torch.float32)
    res = run_tiny(model=tmp_path / "tied", explain=True)
    assert res.ok and res.cfg.tie_word_embeddings
    np.testing.assert_allclose(res.logits, res.taps["final_norm"] @ w["model.embed_tokens.weight"].T, atol=1e-12)
    path = tmp_path / "w.npz"
    rc, _ = _command(model=tmp_path / "tied", save_weights=path)
    with np.load(path) as z:
        assert "lm_head.weight" not in z.files


def test_model_flag_checks(tmp_path):
    from qwen3lab.checkpoint_save import save_checkpoint
    from qwen3lab.presets import preset_config

    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(preset_config("qwen3-0.6b").to_hf_dict()))
    with pytest.raises(ConfigError, match=r"hidden_size is 1024; tiny mode .* at most 512"):
        run_tiny(model=big)
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "config.json").write_text(json.dumps(preset_config("tiny").to_hf_dict()))
    with pytest.raises(ConfigError, match="vocab_size is 151936"):
        run_tiny(model=vocab)

    small = tmp_path / "small"
    _command(save_model=small)
    with pytest.raises(InputError, match=r"--d 16 contradicts .*hidden_size = 8"):
        run_tiny(model=small, d=16)
    with pytest.raises(InputError, match="--moe given but .* is a dense model"):
        run_tiny(model=small, moe=True)
    assert run_tiny(model=small, d=8).cfg.hidden_size == 8
    assert save_checkpoint  # the writer --save-model goes through


def test_save_weights_then_weights_reproduces_the_run(tmp_path):
    for fmt in ("safetensors", "npz", "json"):
        path = tmp_path / f"w.{fmt}"
        rc1, t1 = _command(init="arange", save_weights=path)
        rc2, t2 = _command(weights=path)
        assert rc1 == rc2 == 0
        body = lambda t: t.split("Embedding\n", 1)[1]  # noqa: E731 - the header names the weights source
        assert body(t1) == body(t2), fmt


def test_nan_weight_fails_the_command(tmp_path):
    from qwen3lab.tiny.config import tiny_config
    from qwen3lab.tiny.weights import init_weights, write_weights

    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    w["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    path = write_weights(tmp_path / "w.json", w, cfg)
    rc, text = _command(weights=path, output=tmp_path / "r.json")
    assert rc == 1
    assert "FAIL layers.1.up: " in text and "the first in dataflow order is layers.1.up" in text
    res = json.loads((tmp_path / "r.json").read_text())  # strict JSON even with NaNs in the run
    assert res["stability"]["first_failure"] == "layers.1.up"


def test_nan_in_a_checkpoint_reaches_the_stability_check(tmp_path):
    """Other commands refuse a checkpoint with NaN; tiny mode runs it so the stability table shows where it goes."""
    from qwen3lab.tiny.config import tiny_config
    from qwen3lab.tiny.run import save_model
    from qwen3lab.tiny.weights import init_weights

    cfg = tiny_config()
    w = init_weights(cfg, "random", 0)
    w["model.layers.0.self_attn.v_proj.weight"][3, 1] = np.inf
    save_model(tmp_path / "m", cfg, w)
    res = run_tiny(model=tmp_path / "m")
    assert not res.ok and res.stability.failures()[0].name == "layers.0.v"


def test_bad_flags_raise_typed_errors():
    with pytest.raises(InputError, match="--compare 'hf' is not supported"):
        run_tiny(compare="hf")
    with pytest.raises(InputError, match="--experts/--topk need --moe"):
        run_tiny(experts=8)
    with pytest.raises(ConfigError, match="--nh must be a positive integer"):
        run_tiny(nh=0)
    with pytest.raises(ConfigError, match="not divisible"):
        run_tiny(nh=3, nkvh=2)
