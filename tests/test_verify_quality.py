"""--text: KL / top-1 / top-k / perplexity figures, against hand arithmetic, and over a text end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwen3lab.errors import InputError
from qwen3lab.verify.quality import text_quality


def test_figures_by_hand():
    # 3 tokens, vocab 2: positions 0 and 1 predict ids[1] = 1 and ids[2] = 0
    ref = np.array([[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]])  # p = (1/2, 1/2), (3/4, 1/4)
    cand = np.array([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, 0.0]])  # q = (3/4, 1/4), (3/4, 1/4)
    q = text_quality(ref, cand, [7, 1, 0])
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert q.positions == 2
    assert abs(q.kl_mean - kl0 / 2) < 1e-12 and abs(q.kl_max - kl0) < 1e-12
    assert q.top1_agreement == 1.0  # argmax ties resolve to token 0 on both sides at position 0
    nll_p = -(math.log(0.5) + math.log(0.75)) / 2
    nll_q = -(math.log(0.25) + math.log(0.75)) / 2
    assert abs(q.ppl_reference - math.exp(nll_p)) < 1e-12 and abs(q.ppl_candidate - math.exp(nll_q)) < 1e-12
    with pytest.raises(InputError, match="T >= 2"):
        text_quality(ref[:1], cand[:1], [7])


@pytest.mark.slow  # a 31 MB checkpoint with the real vocabulary
def test_text_over_a_model_numpy_vs_itself_and_a_scaled_port(tmp_path, capsys):
    from qwen3lab.make_model import make_model
    from qwen3lab.verify.command import run_verify_command

    model = make_model(tmp_path / "tiny", preset="tiny", seed=2)  # the real vocabulary: the text's ids fit
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog.")
    plug = tmp_path / "port.py"
    plug.write_text("from qwen3lab.models.numpy_ref import NumpyBackend\n\n\nclass Port:\n"
                    "    def __init__(self, model_path, scale='1'):\n"
                    "        self.b = NumpyBackend.from_pretrained(model_path)\n"
                    "        self.b.weights['model.norm.weight'] *= float(scale)\n\n"
                    "    def run(self, input_ids, graft=None):\n"
                    "        return self.b.run(input_ids, taps='all').taps\n")
    assert run_verify_command(model_path=str(model), candidate="numpy", text=str(tmp_path / "t.txt")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "KL divergence mean 0," in out and "top-1 agreement 100.0%" in out and "(ratio 1.0000)" in out, out
    assert run_verify_command(model_path=str(model), candidate=f"{plug}:Port", candidate_opt=["scale=3"],
                              text=str(tmp_path / "t.txt")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(ratio 1.0000)" not in out and "KL divergence mean 0," not in out, out
