"""KV-cache taps (`layers.i.k_cache` / `v_cache`, [S, Hkv, Dh]): compared when a dump holds them.

A NumPy "port" (the oracle's code in float32) writes its taps plus its KV cache as a port with a float16 cache
would hold it (its k_rot / v rows rounded to float16), prefill and decode steps. The reference's cache taps are
derived from its own k_rot / v rows, so:
- the cache taps are compared (not dropped as unknown), and pass at the float16 KV-cache tolerance;
- at float32's bar (no kv_dtype) the first failing tap is layers.0.k_cache: the cache's own rounding, named
  where it happens, before any tap that reads the cache;
- a cache that stores a wrong position (its rows shifted by one) fails at k_cache even though every other tap
  is the port's correct value.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen3lab.models.numpy_ref import NumpyBackend
from qwen3lab.taps import split_name, tap_sites, write_dump
from qwen3lab.verify.runner import verify

pytestmark = pytest.mark.slow

IDS = [5, 17, 300, 2, 99, 41]
STEPS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from qwen3lab.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", vocab_size=512, seed=3)


def _port_dump(model, path, shift_cache: bool = False):
    """Taps of a float32 run (prefill, then each decode step as a full run's last row) plus the cache."""
    b = NumpyBackend.from_pretrained(model, dtype="float32")
    P = len(IDS) - STEPS
    names = tap_sites(b.cfg)
    taps = dict(b.run(IDS[:P], taps=names).taps)
    full = b.run(IDS, taps=names).taps
    for j in range(STEPS):
        for name, arr in full.items():
            taps[f"step{j}.{name}"] = np.asarray(arr)[P + j:P + j + 1]
    for i in range(b.cfg.num_hidden_layers):
        for site, src in (("k_cache", "k_rot"), ("v_cache", "v")):
            rows = np.asarray(full[f"layers.{i}.{src}"]).astype(np.float16).astype(np.float32)  # [T, Hkv, Dh]
            if shift_cache:
                rows = np.roll(rows, 1, axis=0)  # each position's keys stored one slot late
            taps[f"layers.{i}.{site}"] = rows[:P]
            for j in range(STEPS):
                taps[f"step{j}.layers.{i}.{site}"] = rows[:P + j + 1]
    return write_dump(path, taps, backend="numpy port, f16 cache", dtype="float32", input_ids=IDS,
                      extra={"kv_dtype": "float16"})


def test_cache_taps_are_compared_and_pass_at_the_cache_tolerance(model, tmp_path):
    dump = _port_dump(model, tmp_path / "port.safetensors")
    rep = verify("numpy", f"dump:{dump}", IDS, model_path=model, decode_steps=STEPS)
    cache = [r for r in rep.results if split_name(r.name)[2] in ("k_cache", "v_cache")]
    assert len(cache) == 2 * 2 * (STEPS + 1), [r.name for r in cache]  # 2 layers, k and v, prefill + 2 steps
    assert all(r.status == "pass" for r in cache), [(r.name, r.status, r.reasons) for r in cache]
    # the float16 rounding is really there (an identical cache would say nothing about the comparison)
    worst = max(r.metrics.relative_error for r in cache)
    assert 1e-5 < worst < 2e-3, worst
    assert rep.overall_success, rep.sentence()


def test_float32_bar_names_the_cache_rounding_first(model, tmp_path):
    dump = _port_dump(model, tmp_path / "port.safetensors")
    rep = verify("numpy", f"dump:{dump}", IDS, model_path=model, decode_steps=STEPS, kv_dtype="float32")
    assert rep.first_divergence is not None and rep.first_divergence.name == "layers.0.k_cache", rep.sentence()


def test_a_cache_at_the_wrong_position_fails_at_k_cache(model, tmp_path):
    dump = _port_dump(model, tmp_path / "port.safetensors", shift_cache=True)
    rep = verify("numpy", f"dump:{dump}", IDS, model_path=model, decode_steps=STEPS)
    failing = [r.name for r in rep.results if r.passed is False]
    assert rep.first_divergence.name == "layers.0.k_cache", rep.sentence()
    assert set(failing) <= {r.name for r in rep.results if split_name(r.name)[2] in ("k_cache", "v_cache")}, failing
