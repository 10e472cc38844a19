"""Fuzz of the writing commands' options (issue 13): verify, tiny, bench, make-model, params.

Every bad output path or size must be refused before any heavy work (so each case is fast): exit code 2, one
`error:` line naming the option, and every file already in the output location byte-identical. Valid values
succeed and write their file in place of the old one, leaving no temporary file. Plus a regression test for
each example of the issue's table in this part, and the empty torchinductor dir left in TMPDIR.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import assume, given
from hypothesis import strategies as st

from fuzz_settings import deadline, fuzz
from qwen3lab import guards
from qwen3lab.cli import main
from qwen3lab.errors import InputError
from qwen3lab.make_model import make_model

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_torch_thread):
    return make_model(tmp_path_factory.mktemp("m") / "tiny", preset="tiny", dtype="float32", seed=1)


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The output location the fuzz writes into: a file, a dir, a file inside the dir."""
    root = tmp_path_factory.mktemp("place")
    (root / "old.json").write_bytes(b'{"keep": "me"}\n')
    (root / "sub").mkdir()
    (root / "sub" / "inner.png").write_bytes(b"\x89PNG not really")
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under root: file bytes, None for a directory."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}




def invoke(args, seconds: int = 60):
    with deadline(seconds):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(res, *names: str) -> str:
    """Exit 2 and one error line (ours `error:` or click's `Error:`) naming one of `names`; no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if re.match(r"(error|Error): ", ln)]
    assert len(lines) == 1, res.output
    assert any(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


# ---- output paths ------------------------------------------------------------------------------------
# (command words, output option, extra args, extension the writer takes)
FILE_OUTPUTS = [
    (["verify"], "--output", ["--model-path", "{model}"], ".json"),
    (["verify"], "--html", ["--model-path", "{model}"], ".html"),
    (["verify"], "--jsonl", ["--model-path", "{model}"], ".jsonl"),
    (["verify"], "--save-baseline", ["--model-path", "{model}"], ".json"),
    (["verify"], "--export-reference", ["--model-path", "{model}"], ".safetensors"),
    (["tiny"], "--output", [], ".json"),
    (["tiny"], "--save-weights", [], ".safetensors"),
    (["bench", "attention"], "--json", ["--preset", "tiny", "--no-hf"], ".json"),
    (["bench", "attention"], "--plot", ["--preset", "tiny", "--no-hf"], ".png"),
    (["bench", "moe"], "--json", ["--preset", "tiny-moe", "--no-hf"], ".json"),
    (["bench", "moe"], "--plot", ["--preset", "tiny-moe", "--no-hf"], ".svg"),
    (["bench", "generate"], "--json", ["--model", "{model}", "--no-hf"], ".json"),
    (["bench", "generate"], "--plot", ["--model", "{model}", "--no-hf"], ".pdf"),
]
BAD_KINDS = ["missing_dir", "file_as_dir", "dir_as_file", "deep_missing"]
names = st.text(alphabet=string.ascii_letters + string.digits + "_ .", min_size=1, max_size=12).filter(
    lambda s: s.strip(". ") != "" and not s.startswith("-"))


def bad_path(place: Path, kind: str, name: str, ext: str) -> Path:
    return {"missing_dir": place / "no-such-dir" / f"{name}{ext}",
            "deep_missing": place / "a" / "b" / "c" / f"{name}{ext}",
            "file_as_dir": place / "old.json" / f"{name}{ext}",
            "dir_as_file": place / "sub"}[kind]


def command(words, option, extra, model, value):
    return [*words, *[a.format(model=model) for a in extra], option, value]


@fuzz(50)
@given(case=st.sampled_from(FILE_OUTPUTS), kind=st.sampled_from(BAD_KINDS), name=names)
def test_bad_output_file_is_refused_before_work(model_dir, place, case, kind, name):
    words, option, extra, ext = case
    before = snapshot(place)
    t = time.perf_counter()
    res = invoke(command(words, option, extra, model_dir, bad_path(place, kind, name, ext)))
    assert_refused(res, option)
    assert time.perf_counter() - t < 10, "refused only after running"
    assert snapshot(place) == before


PLOT_CASES = [c for c in FILE_OUTPUTS if c[1] == "--plot"] + [c for c in FILE_OUTPUTS if c[1] == "--save-weights"]
odd_ext = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=0, max_size=5).map(
    lambda s: f".{s}" if s else "")


@fuzz(25)
@given(case=st.sampled_from(PLOT_CASES), ext=odd_ext, name=names)
def test_output_extension_the_writer_cannot_write_is_refused(model_dir, place, case, ext, name):
    words, option, extra, _ = case
    assume(ext not in {".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".webp",
                       ".gif", ".pgf", ".raw", ".rgba", ".avif", ".json", ".npz", ".safetensors"})
    assume(not name.endswith("."))
    before = snapshot(place)
    line = assert_refused(invoke(command(words, option, extra, model_dir, place / f"{name}{ext}")), option)
    assert "extension" in line
    assert snapshot(place) == before


DIR_OUTPUTS = [(["tiny"], "--save-model", []), (["make-model"], "OUT_DIR", [])]


@fuzz(15)
@given(case=st.sampled_from(DIR_OUTPUTS), kind=st.sampled_from(["file", "under_file", "foreign"]), name=names)
def test_bad_output_dir_is_refused(place, case, kind, name):
    words, option, extra = case
    target = {"file": place / "old.json", "under_file": place / "old.json" / name, "foreign": place / "sub"}[kind]
    before = snapshot(place)
    args = [*words, *extra, target] if option == "OUT_DIR" else [*words, *extra, option, target]
    assert_refused(invoke(args), option, str(target))  # make-model names its OUT_DIR by the path
    assert snapshot(place) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: nothing is unwritable to test")
@pytest.mark.parametrize("case", FILE_OUTPUTS[:4], ids=lambda c: f"{' '.join(c[0])} {c[1]}")
def test_unwritable_dir_is_refused(model_dir, tmp_path, case):
    words, option, extra, ext = case
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / f"x{ext}").write_bytes(b"old")
    ro.chmod(0o555)
    try:
        assert_refused(invoke(command(words, option, extra, model_dir, ro / f"x{ext}")), option)
        assert (ro / f"x{ext}").read_bytes() == b"old"
    finally:
        ro.chmod(0o755)


# ---- valid outputs: written, replacing the old file, no temporary left --------------------------------
@pytest.mark.parametrize("ext", [".json", ".npz", ".safetensors"])
def test_tiny_save_weights_replaces_the_file(tmp_path, ext):
    target = tmp_path / f"w{ext}"
    target.write_bytes(b"old")
    res = invoke(["tiny", "--init", "arange", "--save-weights", target, "--output", tmp_path / "r.json"])
    assert res.exit_code == 0, res.output
    assert target.read_bytes() != b"old" and target.stat().st_size > 100
    assert json.loads((tmp_path / "r.json").read_text())["test_input"]["tokens"] == [1, 3, 7, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, "r.json"])
    again = invoke(["tiny", "--weights", target])  # what was written reads back
    assert again.exit_code == 0, again.output


@fuzz(12)
@given(name=names, nlayer=st.integers(1, 3), d=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**32))
def test_tiny_valid_sizes_write_their_report(tmp_path_factory, name, nlayer, d, seed):
    assume(not name.endswith("."))
    out = tmp_path_factory.mktemp("ok") / f"{name}.json"
    res = invoke(["tiny", "--nlayer", nlayer, "--d", d, "--seed", seed, "--output", out])
    assert res.exit_code == 0, res.output
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (nlayer, d)
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_tiny_save_model_overwrites_its_own_checkpoint_only(tmp_path):
    out = tmp_path / "ckpt"
    assert invoke(["tiny", "--save-model", out]).exit_code == 0
    assert invoke(["tiny", "--save-model", out, "--seed", 5]).exit_code == 0  # a tiny checkpoint: replaced
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}


def test_verify_writes_both_reports(model_dir, tmp_path):
    (tmp_path / "r.json").write_text("old")
    res = invoke(["verify", "--model-path", model_dir, "--candidate", "numpy", "--output", tmp_path / "r.json",
                  "--html", tmp_path / "r.html", "--layers", "0-1"], seconds=120)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["overall_success"] is True
    assert (tmp_path / "r.html").read_text().startswith("<!")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]


# ---- numbers: negative, zero, huge, non-numeric ------------------------------------------------------------
# (command, option, what else it needs, names its error may use, which kinds must be refused)
ALL = {"negative", "zero", "huge", "text"}
NUMERIC = [
    (["tiny"], "--nlayer", [], ("num_hidden_layers",), ALL),
    (["tiny"], "--d", [], ("hidden_size",), ALL),
    (["tiny"], "--nh", [], ("num_attention_heads",), ALL),
    (["tiny"], "--nkvh", [], ("num_key_value_heads",), ALL),
    (["tiny"], "--dh", [], ("head_dim",), ALL),
    (["tiny"], "--di", [], ("intermediate_size",), ALL),
    (["tiny"], "--dvoc", [], ("vocab_size",), ALL),
    (["tiny"], "--dctx", [], ("max_position_embeddings", "context"), {"negative", "zero", "text"}),
    (["tiny", "--moe"], "--experts", [], ("num_experts",), ALL),
    (["tiny", "--moe"], "--topk", [], ("num_experts_per_tok",), ALL),
    (["tiny"], "--precision", [], (), {"negative", "huge", "text"}),
    (["bench", "attention"], "--seqlens", ["--preset", "tiny", "--no-hf"], (), ALL),
    (["bench", "attention"], "--past", ["--preset", "tiny", "--no-hf", "--seqlens", "4"], (), {"negative", "huge",
                                                                                                 "text"}),
    (["bench", "attention"], "--decode-past", ["--preset", "tiny", "--no-hf"], (), {"negative", "huge", "text"}),
    (["bench", "attention"], "--decode-repeat", ["--preset", "tiny", "--no-hf"], (), ALL),
    (["bench", "attention"], "--runs", ["--preset", "tiny", "--no-hf"], (), {"negative", "zero", "text"}),
    (["bench", "attention"], "--warmups", ["--preset", "tiny", "--no-hf"], (), {"negative", "text"}),
    (["bench", "attention"], "--threads", ["--preset", "tiny", "--no-hf"], (), {"negative", "zero", "text"}),
    (["bench", "moe"], "--prefill-tokens", ["--preset", "tiny-moe", "--no-hf"], (), {"negative", "huge", "text"}),
    (["bench", "generate"], "--decode-prompt-len", ["--model", "{model}", "--no-hf"], (), ALL),
    (["bench", "generate"], "--new-tokens", ["--model", "{model}", "--no-hf"], (), ALL),
    (["bench", "generate"], "--prompt-lens", ["--model", "{model}", "--no-hf"], (), ALL),
    (["bench", "generate"], "--batch", ["--model", "{model}", "--no-hf"], (), ALL),
    (["make-model", "{out}"], "--layers", [], ("layers",), ALL),
    (["make-model", "{out}"], "--shard-size", [], ("shard size",), {"negative", "zero", "text"}),
    (["params", "--preset", "tiny"], "--context", [], ("context",), {"negative", "zero", "text"}),
    (["params", "--preset", "tiny"], "--batch", [], ("batch",), {"negative", "zero", "text"}),
    (["verify", "--model-path", "{model}"], "--layers", [], (), {"negative", "huge", "text"}),
]
VALUES = {
    "negative": st.integers(-(10**30), -1).map(str),
    "zero": st.sampled_from(["0", "00", "-0"]),
    "huge": st.integers(10**12, 10**40).map(str),  # past any memory or size limit
    "text": st.sampled_from(["abc", "1.5", "1e3", "0x10", "--", "1,,x", "½", "nan", "-inf", "7-"]),
}


@fuzz(100)
@given(case=st.sampled_from(NUMERIC), kind=st.sampled_from(sorted(ALL)), data=st.data())
def test_bad_number_is_refused_before_work(model_dir, tmp_path_factory, case, kind, data):
    words, option, extra, aliases, refused = case
    assume(kind in refused)
    value = data.draw(VALUES[kind], label="value")
    assume(not (option == "--shard-size" and value in ("1.5", "1e3")))  # bytes, as a float: a valid size
    if option == "--layers" and words[0] == "verify" and kind == "huge":
        value = f"0-{value}"
    out = tmp_path_factory.mktemp("mm") / "out"
    args = [a.format(model=model_dir, out=out) for a in [*words, *extra]]
    res = invoke([*args, f"{option}={value}"])
    assert_refused(res, option, *aliases)
    assert not out.exists()


# ---- the issue's examples --------------------------------------------------------------------------------------
def test_verify_bad_output_fails_at_once_naming_the_path(model_dir, place):
    before = snapshot(place)
    for opt in ("--output", "--html"):
        t = time.perf_counter()
        line = assert_refused(invoke(["verify", "--model-path", model_dir, opt, place / "nope" / "r.json"]), opt)
        assert time.perf_counter() - t < 1.0
        assert str(place / "nope") in line
        t = time.perf_counter()
        assert_refused(invoke(["verify", "--model-path", model_dir, opt, place / "old.json" / "r.json"]), opt)
        assert time.perf_counter() - t < 1.0
    assert snapshot(place) == before


def test_verify_layers_past_the_model(model_dir):
    t = time.perf_counter()
    line = assert_refused(invoke(["verify", "--model-path", model_dir, "--layers", "0-100000000000"]), "--layers")
    assert time.perf_counter() - t < 1.0 and "layers 0..1" in line


def test_tiny_save_paths_under_a_missing_dir_or_a_file(place):
    before = snapshot(place)
    for opt, name in (("--save-weights", "w.json"), ("--save-model", "m"), ("--output", "r.json")):
        assert_refused(invoke(["tiny", opt, place / "nope" / name]), opt)
        assert_refused(invoke(["tiny", opt, place / "old.json" / name]), opt)
    assert snapshot(place) == before


def test_tiny_huge_nlayer_is_refused_at_once():
    t = time.perf_counter()
    line = assert_refused(invoke(["tiny", "--nlayer", "1000000"], seconds=20), "--nlayer")
    assert "parameters" in line and time.perf_counter() - t < 5


def test_make_model_235b_refused_with_the_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(guards, "available_bytes", lambda: 21 * 10**9)
    line = assert_refused(invoke(["make-model", tmp_path / "big", "--preset", "qwen3-235b-a22b"], seconds=30),
                          "--preset qwen3-235b-a22b")
    assert "needs ~473 GB" in line and "21 GB available" in line
    assert not (tmp_path / "big").exists()


def test_bench_attention_huge_seqlens_refused_with_the_figure():
    line = assert_refused(invoke(["bench", "attention", "--seqlens", "99999999999", "--past", "0", "--no-hf"]),
                          "--seqlens 99999999999")
    assert "needs ~" in line and "available" in line


def test_bench_generate_negative_decode_prompt_len(model_dir):
    assert_refused(invoke(["bench", "generate", "--model", model_dir, "--decode-prompt-len", "-1"]),
                   "--decode-prompt-len")


def test_bench_plot_odd_extension(place):
    line = assert_refused(invoke(["bench", "attention", "--plot", place / "x.xyz"]), "--plot")
    assert ".png" in line


# ---- the one writer ------------------------------------------------------------------------------------------
def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "r.json"
    target.write_bytes(b"old")

    def half(tmp: Path):
        tmp.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        guards.write_atomic(target, half)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    guards.write_text_atomic(target, "new")
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) != "0o600"


def test_write_atomic_through_a_symlink_replaces_the_file_not_the_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    guards.write_text_atomic(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_output_onto_a_device_is_refused():
    with pytest.raises(InputError, match="--json /dev/null: exists and is not a regular file"):
        guards.check_output_file("/dev/null", "--json")


# ---- TMPDIR stays clean -----------------------------------------------------------------------------------------
def test_a_run_writes_its_report_and_leaves_nothing_in_tmpdir(tmp_path):
    # in a subprocess: torch makes $TMPDIR/torchinductor_$USER when a command builds a torch module (here the
    # candidate of --compare torch), and the CLI removes it at exit
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    (out / "r.json").write_text("old")
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(SRC)}
    args = ["tiny", "--compare", "torch", "--output", str(out / "r.json")]
    code = f"import sys; from qwen3lab.cli import main; sys.argv = ['qwen3lab', *{args!r}]; main()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert list(tmp.iterdir()) == []
    assert json.loads((out / "r.json").read_text())["compare"]["passed"] is True
    assert [p.name for p in out.iterdir()] == ["r.json"]


def test_bench_writes_json_and_plot_in_place_of_the_old(tmp_path):
    from qwen3lab.bench.plot import plot_report
    from qwen3lab.bench.report import emit_json, make_record, make_report
    from qwen3lab.bench.settings import resolve_device

    rec = make_record("attention", "qwen3lab", "decode", "4 req", resolve_device("cpu"), "float32",
                        tok_per_s=10.0, latency_ms=2.0)
    report = make_report("attention", resolve_device("cpu"), {}, [rec])
    for name in ("b.json", "b.png", "b.svg"):
        (tmp_path / name).write_text("old")
    emit_json(report, tmp_path / "b.json")
    plot_report(report, tmp_path / "b.png")
    plot_report(report, tmp_path / "b.svg")
    assert json.loads((tmp_path / "b.json").read_text())["results"] == [rec]
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG" and b"<svg" in (tmp_path / "b.svg").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "b.png", "b.svg"]
