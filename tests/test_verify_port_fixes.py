"""Issue 15 item 7: the MoE near-tie excuse stops at a failing router, isolated topk_weight is compared at the
graft's pinned ids. Hand-made tap dicts (no model run), checked against hand arithmetic."""

from __future__ import annotations

import numpy as np

from qwen3lab.config import Qwen3Config
from qwen3lab.verify.compare import Comparator
from qwen3lab.verify.tolerances import DTYPE_DEFAULTS

TOL = DTYPE_DEFAULTS["float32"]
E, K = 4, 2


def moe_cfg() -> Qwen3Config:
    return Qwen3Config.from_dict({
        "model_type": "qwen3_moe", "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16,
        "num_experts": E, "num_experts_per_tok": K, "moe_intermediate_size": 4})


def topk(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=-1)[:, :K]  # [T, K] best first


def test_swapped_router_rows_fail_topk_idx_even_at_close_logits():
    """Router rows 0 and 2 swapped: the candidate's logits are wrong by more than any tolerance, so its
    different choices cannot be called near ties (before the fix the excuse was 2x the candidate's own error)."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((7, E)) * 0.3
    cand = ref[:, [2, 1, 0, 3]]  # experts 0 and 2 exchanged
    comp = Comparator(moe_cfg(), TOL)
    r_logits = comp.compare("layers.0.router_logits", cand, ref)
    r_idx = comp.compare("layers.0.topk_idx", topk(cand), topk(ref))
    differ = int(np.sum([set(a) != set(b) for a, b in zip(topk(cand), topk(ref), strict=True)]))
    assert r_logits.status == "fail", r_logits.reasons
    assert differ > 0
    assert r_idx.status == "fail", (r_idx.reasons, r_idx.metrics.near_tie_tokens)
    assert not r_idx.metrics.near_tie_tokens


def test_near_tie_excuse_still_holds_within_the_tolerance():
    """Two experts 1e-6 apart in float32 noise of 1e-7 relative: a swap there is a near tie and passes."""
    ref = np.array([[1.0, 0.5, 0.5 + 1e-6, -1.0]])
    cand = ref.copy()
    cand[0, 1] += 2e-6  # now expert 1 wins the tie; error 2e-6 = 2e-6 relative to max |r| = 1 (< 1e-4)
    comp = Comparator(moe_cfg(), TOL)
    assert comp.compare("layers.0.router_logits", cand, ref).status == "pass"
    r = comp.compare("layers.0.topk_idx", topk(cand), topk(ref))
    assert set(topk(cand)[0]) != set(topk(ref)[0])
    assert r.status == "pass" and r.metrics.near_tie_tokens == 1, r.reasons


def test_isolated_topk_weight_is_scattered_at_the_grafted_ids():
    """Grafted run: the candidate recorded its own ids [0, 1] but the op after it consumed the reference's
    [2, 3] and gathered its weights there. Compared at the pinned ids the weights match exactly; scattered at
    the candidate's own ids they would look wrong (the mislabelled `op` of the issue)."""
    ref_idx, cand_idx = np.array([[2, 3]]), np.array([[0, 1]])
    w = np.array([[0.6, 0.4]])
    grafted = Comparator(moe_cfg(), TOL, grafted=True)
    grafted.compare("layers.0.topk_idx", cand_idx, ref_idx)
    assert grafted.compare("layers.0.topk_weight", w, w).status == "pass"
    plain = Comparator(moe_cfg(), TOL)
    plain.compare("layers.0.topk_idx", cand_idx, ref_idx)
    assert plain.compare("layers.0.topk_weight", w, w).status == "fail"


def test_piped_table_is_full_width_and_never_cut(tmp_path):
    """rich's piped default is 80 columns: names and numbers used to end in '…'. Piped, the table takes its
    full width; every tap name and every number is printed whole."""
    import io

    from rich.console import Console

    from qwen3lab.make_model import make_model
    from qwen3lab.verify import verify
    from qwen3lab.verify.report_terminal import render

    model = make_model(tmp_path / "tiny", preset="tiny", vocab_size=512, seed=2)
    rep = verify("numpy", "numpy", [5, 17, 300], model_path=model, mse_max=-0.0)  # everything passes
    buf = io.StringIO()
    render(rep, Console(file=buf, width=80), rows="all")
    out = buf.getvalue()
    assert "…" not in out, out
    for r in rep.results:
        assert f"\n{r.name} " in out, (r.name, out)
