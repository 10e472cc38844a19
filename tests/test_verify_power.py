"""Detection power (verify/power.py): the ladder search, and one search on a tiny model checked by hand.

Hand reasoning for the model case: ffn_down's weight x (1 + eps) in layer 0 scales layers.0.mlp_out (a linear
map of its input, which the bug does not touch) by exactly (1 + eps), so that tap's relative error against the
oracle is eps, plus float32 rounding (~1e-6), and no tap before it moves. At float32's threshold (1e-4
relative) a rung of 3e-5 must pass and 3e-4 must fail, at layers.0.mlp_out; so on the ladder
(3e-6, 3e-5, 3e-4, 3e-3, 3e-2) the smallest bug caught is 3e-4.
"""

from __future__ import annotations

import math

import pytest

from qwen3lab.verify.power import LADDER, plant, smallest_caught
from qwen3lab.verify.tolerances import DTYPE_DEFAULTS


@pytest.mark.parametrize("threshold", [None, *LADDER, 0.0])
def test_bisection_finds_the_first_caught_rung_in_few_runs(threshold):
    """A detector that catches every rung >= threshold: the answer is the first such rung (brute force says
    which), found in at most log2(rungs) + 2 runs, and every rung it tried is labelled as the detector said."""
    caught = (lambda e: False) if threshold is None else (lambda e: e >= threshold)
    got, tried = smallest_caught(LADDER, caught)
    want = next((r for r in LADDER if caught(r)), None)
    assert got == want, (threshold, got, want, tried)
    assert len(tried) <= math.ceil(math.log2(len(LADDER))) + 2, tried
    assert all(v == caught(k) for k, v in tried.items())


def test_plant_leaves_the_clean_model_untouched():
    import numpy as np

    w = {"model.layers.0.mlp.down_proj.weight": np.ones((2, 2))}
    w2, f2 = plant(w, "ffn_down", 0.5)
    assert f2 == 1 and np.all(w2["model.layers.0.mlp.down_proj.weight"] == 1.5)
    assert np.all(w["model.layers.0.mlp.down_proj.weight"] == 1)
    w3, f3 = plant(w, "rms_eps", 9.0)
    assert w3 is w and f3 == pytest.approx(10)
    assert plant(w, None, 0.0) == (w, 1.0)


@pytest.mark.slow
def test_tiny_float32_search_matches_hand_reasoning(tmp_path, one_torch_thread):
    from qwen3lab.config import Qwen3Config
    from qwen3lab.make_model import make_model
    from qwen3lab.models.numpy_ref import NumpyBackend
    from qwen3lab.models.torch_model import TorchBackend
    from qwen3lab.verify import verify
    from qwen3lab.verify.power import detection_power
    from qwen3lab.weights import load_weights

    assert DTYPE_DEFAULTS["float32"].rel_max == 1e-4  # the hand reasoning's threshold (module docstring)
    path = make_model(tmp_path / "tiny", preset="tiny", seed=3)
    ids = [5, 17, 30, 2, 99, 41]
    ladder = (3e-6, 3e-5, 3e-4, 3e-3, 3e-2)
    (row,) = detection_power(path, ids, dtypes=["float32"], ladder=ladder, bugs=["ffn_down"])
    assert row.clean_ok, row
    assert row.smallest["ffn_down"] == 3e-4, row.tried

    import torch

    cfg = Qwen3Config.from_file(path)
    w = load_weights(path, cfg, dtype=torch.float32)
    ref = NumpyBackend(w, cfg)
    for eps, should_fail in ((3e-4, True), (3e-5, False)):  # one rung above and one below the threshold found
        wb, _ = plant(w, "ffn_down", eps)
        rep = verify(ref, TorchBackend(cfg, wb, dtype="float32"), ids)
        res = {r.name: r for r in rep.results}
        m = res["layers.0.mlp_out"].metrics
        assert abs(m.relative_error - eps) < 1e-5, (eps, m.relative_error)  # the bug's size, as reasoned
        assert rep.overall_success is (not should_fail), rep.sentence()
        if should_fail:
            assert rep.first_divergence.name == "layers.0.mlp_out", rep.sentence()


def test_rms_eps_plant_moves_attn_in_as_hand_computed(tmp_path, one_torch_thread):
    """Every RMSNorm's eps x f in the candidate's modules: input_layernorm's output row r is the clean one times
    sqrt((ms_r + eps) / (ms_r + f * eps)), ms_r = mean(embed_r ** 2), so attn_in's relative error follows from
    the embedding alone (float64, so nothing else moves it)."""
    import numpy as np
    import torch

    from qwen3lab.config import Qwen3Config
    from qwen3lab.make_model import make_model
    from qwen3lab.models.numpy_ref import NumpyBackend
    from qwen3lab.verify.power import _torch
    from qwen3lab.weights import load_weights

    path = make_model(tmp_path / "tiny", preset="tiny", seed=4, dtype="float32")
    cfg = Qwen3Config.from_file(path)
    w = load_weights(path, cfg, dtype=torch.float32)
    ids, f = [5, 17, 30, 2], 1e4
    ref = NumpyBackend(w, cfg).run(ids, taps="all").taps
    got = _torch(cfg, w, f, dtype="float64").run(ids, taps="all").taps
    ms = (ref["embed"] ** 2).mean(axis=-1, keepdims=True)  # [T, 1]
    eps = cfg.rms_norm_eps
    want = ref["layers.0.attn_in"] * np.sqrt((ms + eps) / (ms + f * eps))
    np.testing.assert_allclose(got["layers.0.attn_in"], want, rtol=1e-9, atol=1e-12)
    assert np.abs(got["layers.0.attn_in"] - ref["layers.0.attn_in"]).max() > 1e-6  # the bug did move it
    np.testing.assert_allclose(got["embed"], ref["embed"], rtol=0, atol=0)
