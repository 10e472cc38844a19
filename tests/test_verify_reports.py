"""verify's reports (terminal, JSON schema, self-contained HTML opened in headless Chromium) and the
command function's exit codes."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from qwen3lab.make_model import make_model
from qwen3lab.verify import verify
from qwen3lab.verify.command import run_verify_command
from qwen3lab.verify.report_html import render_html
from qwen3lab.verify.report_json import to_dict
from qwen3lab.verify.report_terminal import render

IDS = [5, 17, 300, 2, 99, 41, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    yield
TOP_KEYS = ["model_path", "test_input", "input_ids", "reference", "candidate", "dtype", "overall_success",
            "total_layers_tested", "layers_passed", "layers_failed", "first_divergence", "culprit", "layer_results"]
TAP_KEYS = ["name", "shape", "cosine_similarity", "mse", "relative_error", "max_abs_error", "max_abs_location",
            "passed", "origin"]

# A user plugin: the oracle with the attention residual dropped (runs each op on grafted inputs).
PLUGIN = '''
from qwen3lab.models import numpy_ref
from qwen3lab.models.numpy_ref import NumpyBackend


class Port:
    def __init__(self, model_path):
        self.b = NumpyBackend.from_pretrained(model_path, dtype="float32")
        self.dtype = "float32"

    def run(self, input_ids, graft=None):
        orig = numpy_ref.tap

        def tap(name, x):
            if name.endswith(".resid_mid"):
                x = self._last_attn_out  # the residual x + attn_out lost its x
            if name.endswith(".attn_out"):
                x = self._last_attn_out = orig(name, x)
                return x
            return orig(name, x)

        numpy_ref.tap = tap
        try:
            return self.b.run(input_ids, taps="all", graft=graft).taps
        finally:
            numpy_ref.tap = orig
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", vocab_size=512, seed=2)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("plug") / "port.py"
    p.write_text(PLUGIN)
    return f"{p}:Port"


@pytest.fixture(scope="module")
def failing(model_dir, plugin):
    return verify("numpy", plugin, IDS, model_path=model_dir)


def test_plugin_culprit_is_the_dropped_residual(failing):
    assert failing.culprit.name == "layers.0.resid_mid" == failing.first_divergence.name, failing.sentence()


def test_terminal_report_rows_and_sentence(failing):
    con = Console(record=True, width=120)
    render(failing, con)
    out = con.export_text()
    for row in ("embed", "layers.0", "layers.1", "head"):
        assert f"\n{row} " in out
    assert "FAIL: first divergence at layers.0.resid_mid" in " ".join(out.split())
    assert "Culprit: layers.0.resid_mid" in out.replace("\n", " ")
    con = Console(record=True, width=120)
    render(failing, con, rows="sublayer")
    out = con.export_text()
    assert "layers.0 attn" in out and "layers.0 mlp" in out
    con = Console(record=True, width=160)
    render(failing, con, rows="all")
    assert "layers.1.k_rot" in con.export_text()


def test_json_schema(failing, model_dir):
    d = json.loads(json.dumps(to_dict(failing), allow_nan=False))
    assert all(k in d for k in TOP_KEYS)
    assert d["model_path"] == str(model_dir) and d["input_ids"] == IDS and d["dtype"] == "float32"
    assert d["overall_success"] is False and d["first_divergence"] == d["culprit"] == "layers.0.resid_mid"
    assert (d["total_layers_tested"], d["layers_passed"], d["layers_failed"]) == (2, 0, 2)
    lr = d["layer_results"]
    assert [x["layer_index"] for x in lr] == [-1, 0, 1, 2] and [x["layer_name"] for x in lr][1] == "layers.0"
    taps = {t["name"]: t for x in lr for t in x["taps"]}
    assert all(k in t for t in taps.values() for k in TAP_KEYS)
    rm = taps["layers.0.resid_mid"]
    assert rm["passed"] is False and rm["origin"] == "op" and rm["shape"] == [7, 64]
    assert set(rm["max_abs_location"]) == {"token", "channel"}
    assert taps["layers.0.mlp_in"]["origin"] == "inherited" and taps["layers.0.q"]["origin"] is None
    assert taps["layers.0.q"]["passed"] is True and 0.99999 < taps["layers.0.q"]["cosine_similarity"] <= 1


class _Scan(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "tr":
            self.rows += 1
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//")):
                self.external.append(a[k])


def test_html_is_self_contained(failing):
    page = render_html(failing)
    s = _Scan()
    s.feed(page)
    assert s.external == [] and "<script" not in page and "@import" not in page
    assert len(s.imgs) == 2  # the heatmap and the divergent tap's error by token / channel
    for src in s.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert s.rows >= len(failing.results) + 1
    assert "layers.0.resid_mid" in page and "heatmap" in page.lower()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to open the HTML report in")
def test_html_opens_in_headless_chromium(failing, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(failing))
    shot = tmp_path / "shot.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=1200,1600"]
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=60, check=False)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, timeout=60, text=True).stdout
    assert "Culprit: layers.0.resid_mid" in dom and dom.count("data:image/png;base64,") == 2


def test_command_exit_codes_and_files(model_dir, plugin, tmp_path, capsys):
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    con = Console(record=True, width=100)
    code = run_verify_command(console=con, model_path=str(model_dir), ids="5,17,300,2", output=str(out),
                              html=str(page))
    assert code == 0, con.export_text()
    d = json.loads(out.read_text())
    assert d["overall_success"] is True and d["candidate"] == "torch (float32, cpu)"
    assert d["reference"] == "numpy (float64)" and page.read_text().startswith("<!DOCTYPE html>")
    assert run_verify_command(console=con, model_path=str(model_dir), candidate=plugin, ids="5,17,300,2") == 1
    assert run_verify_command(console=con, model_path=str(model_dir), candidate=plugin, ids="5,17,300,2",
                              rel_max=10.0, cos_min=0.0) == 0  # overridden tolerances accept anything
    assert run_verify_command(console=con, model_path=str(model_dir), ids="5,x") == 2
    assert run_verify_command(console=con, model_path=str(model_dir), taps="everything") == 2
    assert run_verify_command(console=con, model_path=str(tmp_path / "nope")) == 2
    assert run_verify_command(console=con, model_path=str(model_dir), frobnicate=True) == 2
    assert run_verify_command(console=con, model_path=str(model_dir), ids="5,17", decode_steps=5) == 2
    err = capsys.readouterr().err
    assert "expected comma-separated integers" in err and "--taps 'everything'" in err
    assert "unknown verify option(s): frobnicate" in err and "no such checkpoint directory" in err


@pytest.mark.slow
def test_command_self_test_on_small_models(tmp_path):
    from qwen3lab.fast import build
    from qwen3lab.verify.bugzoo import BUGS, KERNEL_BUGS
    from qwen3lab.verify.command import _self_test

    dense = make_model(tmp_path / "d", preset="tiny", vocab_size=10000)
    moe = make_model(tmp_path / "m", preset="tiny-moe", vocab_size=10000)
    con = Console(record=True, width=120)
    assert _self_test(con, dense, moe, power=False) == 0, con.export_text()  # power: test_verify_power.py
    text = con.export_text()
    ends = [line.split()[-1] for line in text.splitlines() if line.strip()]
    planted = len(BUGS) + (len(KERNEL_BUGS) if build.kernels() is not None else 0)  # kernel bugs need kernels
    assert ends.count("right") == planted and ends.count("pass") == 6 and "self-test passed" in text


def test_progress_bar_on_a_terminal(model_dir):
    import io

    from qwen3lab.verify.report_terminal import RichProgress

    con = Console(file=io.StringIO(), force_terminal=True, width=100)
    rep = verify("numpy", "numpy", IDS, model_path=model_dir, dtype="float32", progress=RichProgress(con, min_taps=1))
    out = con.file.getvalue()
    assert rep.overall_success and "reference" in out and "candidate" in out and "taps" in out
    quiet = Console(file=io.StringIO(), force_terminal=False)
    verify("numpy", "numpy", IDS, model_path=model_dir, dtype="float32", progress=RichProgress(quiet, min_taps=1))
    assert quiet.file.getvalue() == ""  # not a terminal: no bar
