"""Fuzz and regression tests for every file a user hands qwen3lab (issue 13): config.json, safetensors files
and their index, tap dumps, `tiny --weights` files, tokenizer files.

Each case ends in the right typed error naming the file (and the tensor / key where there is one) or in a
correct load. FIFOs are read in one subprocess under a timeout, so a reader that blocks fails the test
instead of hanging the suite."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import event, given
from hypothesis import strategies as st

import qwen3lab
from fuzz_settings import fuzz
from qwen3lab.checkpoint_files import INDEX_FILE, SINGLE_FILE
from qwen3lab.checkpoint_save import save_checkpoint
from qwen3lab.cli import main
from qwen3lab.config import Qwen3Config, load_config
from qwen3lab.errors import ConfigError, DumpError, TokenizerError, WeightsError
from qwen3lab.jsonio import LIMITS
from qwen3lab.shapes import expected_shapes
from qwen3lab.taps import DUMP_DTYPES, read_dump, write_dump
from qwen3lab.tiny.config import tiny_config
from qwen3lab.tiny.weights import TENSOR_DTYPES, checkpoint_tensors, init_weights, read_weights, write_weights
from qwen3lab.tokenizer import Tokenizer
from qwen3lab.weights import load_weights

pytestmark = pytest.mark.slow

# every dtype safetensors 0.8 knows, with its bits per element
ST_DTYPES = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
             "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
             "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64}
NESTED = "[" * 100_000 + "]" * 100_000
HUGE_INT = '{"vocab_size": 1' + "0" * 5000 + "}"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


# ---- shared files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def base(tmp_path_factory, cfg):
    """A single-file and a sharded checkpoint of the tiny config, their tensors, and a tiny weights dict."""
    root = tmp_path_factory.mktemp("base")
    weights = init_weights(cfg, "arange")
    tensors = {k: torch.from_numpy(v).float() for k, v in weights.items()}
    single = save_checkpoint(root / "single", cfg, tensors, dtype="float32")
    sharded = save_checkpoint(root / "sharded", cfg, tensors, dtype="float32", shard_size=1500)
    assert (sharded / INDEX_FILE).exists()
    return {"single": single, "sharded": sharded, "weights": weights,
            "loaded": load_weights(single, cfg), "bytes": (single / SINGLE_FILE).read_bytes()}


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, n: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + body


def _raw_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes]], meta=None) -> Path:
    """A safetensors file written byte by byte, so any dtype safetensors knows can be put in it."""
    header, body = ({"__metadata__": meta} if meta else {}), b""
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    path.write_bytes(_join(header, body))
    return path


def _raises(exc, fn, *needles) -> str:
    """The message of the `exc` fn raises; every needle (file, tensor, key) must appear in it."""
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not named in: {msg}"
    return msg


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    return HFTokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).to_str()


# ---- /dev/zero, directories, oversized, deeply nested, huge integers ---------------------------------
def _tok_dir(tmp_path: Path) -> Path:
    (tmp_path / "tokenizer.json").write_text(_tokenizer_json())
    return tmp_path


# target -> (file it puts at a path in tmp_path, the call reading it, error type, size limit or None)
TARGETS = {
    "config": ("config.json", lambda d, cfg: load_config(d), ConfigError, LIMITS["config"]),
    "index": (INDEX_FILE, lambda d, cfg: load_weights(d, cfg), WeightsError, LIMITS["index"]),
    "tiny_json": ("w.json", lambda d, cfg: read_weights(d / "w.json", cfg), WeightsError, LIMITS["tiny_weights"]),
    "tokenizer_config": ("tokenizer_config.json", lambda d, cfg: Tokenizer.from_dir(_tok_dir(d)), TokenizerError,
                         LIMITS["config"]),
    "generation_config": ("generation_config.json", lambda d, cfg: Tokenizer.from_dir(_tok_dir(d)),
                          TokenizerError, LIMITS["config"]),
    "tokenizer_json": ("tokenizer.json", lambda d, cfg: Tokenizer.from_dir(d), TokenizerError,
                       LIMITS["tokenizer"]),
    "safetensors": (SINGLE_FILE, lambda d, cfg: load_weights(d, cfg), WeightsError, None),
    "dump": ("taps.safetensors", lambda d, cfg: read_dump(d / "taps.safetensors"), DumpError, None),
    "tiny_npz": ("w.npz", lambda d, cfg: read_weights(d / "w.npz", cfg), WeightsError, None),
    "tiny_safetensors": ("w.safetensors", lambda d, cfg: read_weights(d / "w.safetensors", cfg), WeightsError,
                         None),
}
JSON_TARGETS = ["config", "index", "tiny_json", "tokenizer_config", "generation_config"]


def _place(kind: str, path: Path, limit: int | None) -> str:
    """Put a bad file of this kind at path; the word its error must contain."""
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
        return "character device"
    if kind == "directory":
        path.mkdir()
        return "directory"
    if kind == "oversized":
        with open(path, "wb") as f:
            f.truncate(limit + 1)  # sparse: refused by its size before a byte is read
        return "limit"
    if kind == "nested":
        path.write_text(NESTED)
        return "nested"
    if kind == "huge_int":
        path.write_text(HUGE_INT)
        return "digits"
    if kind == "not_utf8":
        path.write_bytes(b'{"a": "\xff\xfe"}')
        return "UTF-8"
    raise AssertionError(kind)


BAD_FILES = [(t, k) for t in TARGETS for k in ("dev_zero", "directory")]
BAD_FILES += [(t, "oversized") for t in TARGETS if TARGETS[t][3] is not None]
BAD_FILES += [(t, k) for t in [*JSON_TARGETS, "tokenizer_json"] for k in ("nested", "huge_int", "not_utf8")]


@pytest.mark.parametrize("target,kind", BAD_FILES)
def test_bad_file_is_refused_naming_it(tmp_path, cfg, target, kind):
    name, call, exc, limit = TARGETS[target]
    word = _place(kind, tmp_path / name, limit)
    if target == "tokenizer_json" and kind in ("nested", "huge_int"):
        word = "not a valid tokenizer.json"  # the tokenizers library parses it (and refuses both)
    _raises(exc, lambda: call(tmp_path, cfg), tmp_path / name, word)


def test_dev_zero_given_directly(tmp_path, cfg):
    # the case: /dev/zero as config (MemoryError before); also as every other file argument
    _raises(ConfigError, lambda: Qwen3Config.from_file("/dev/zero"), "/dev/zero", "character device")
    _raises(DumpError, lambda: read_dump("/dev/zero"), "/dev/zero", "character device")
    _raises(WeightsError, lambda: load_weights("/dev/zero", cfg), "/dev/zero")


# ---- the CLI answers with one error line (exit 2) ---------------------------------------------------
def _cli_error(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, (res.output, res.exception)
    return lines[0]


@pytest.mark.parametrize("content,word", [(NESTED, "nested"), (HUGE_INT, "digits"), ("/dev/zero", "device")])
def test_cli_params_bad_config(tmp_path, content, word):
    f = tmp_path / "config.json"
    if content == "/dev/zero":
        f.symlink_to(content)
    else:
        f.write_text(content)
    line = _cli_error("params", "--config", f)
    assert str(f) in line and word in line, line


def test_cli_tiny_weights_bad_files(tmp_path):
    f = tmp_path / "w.json"
    f.write_text(NESTED)
    assert "nested" in _cli_error("tiny", "--weights", f)
    st_file = _raw_safetensors(tmp_path / "w.safetensors", [("model.norm.weight", "F8_E4M3", [8], b"\0" * 8)])
    line = _cli_error("tiny", "--weights", st_file)
    assert "model.norm.weight" in line and "F8_E4M3" in line, line


# ---- safetensors headers ----------------------------------------------------------------------------
@fuzz(25)
@given(data=st.binary(max_size=64), prefix=st.sampled_from([None, 0, 8, 64, 2**40, 2**64 - 1]))
def test_random_safetensors_bytes(tmp_path_factory, cfg, data, prefix):
    f = tmp_path_factory.mktemp("rnd") / "model.safetensors"
    f.write_bytes(data if prefix is None else struct.pack("<Q", prefix) + data)
    _raises(WeightsError, lambda: load_weights(f, cfg), f)


TENSOR_MUTATIONS = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99), st.sampled_from([*ST_DTYPES, "X9", "", "f32", 4])),
    st.tuples(st.just("shape"), st.integers(0, 99),
              st.lists(st.integers(-2, 2**65), max_size=4) | st.lists(st.integers(1, 16), max_size=3) | json_values),
    st.tuples(st.just("entry"), st.integers(0, 99), json_values),
)
FILE_MUTATIONS = st.one_of(
    st.tuples(st.just("offsets"), st.integers(0, 99),
              st.lists(st.integers(-2, 2000), min_size=0, max_size=3) | json_values),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(-8, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 5000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("header"), json_values),
    st.tuples(st.just("metadata"), json_values),
)


def _mutate(data: bytes, m) -> tuple[bytes, str | None]:
    """The mutated file bytes, and the tensor the mutation is about (if its message must name one)."""
    header, body = _split(data)
    names = sorted(k for k in header if k != "__metadata__")
    kind = m[0]
    name = names[m[1] % len(names)] if kind in ("dtype", "shape", "entry", "offsets", "drop") else None
    if kind in ("dtype", "shape"):
        header[name] = {**header[name], kind: m[2]}
    elif kind == "entry":
        header[name] = m[2]
    elif kind == "offsets":
        header[name] = {**header[name], "data_offsets": m[2]}
        name = None  # a moved span can surface as a gap at a neighbour first
    elif kind == "drop":
        del header[name]
        name = None
    elif kind == "length":
        n = len(json.dumps(header).encode())
        return _join(header, body, n=max(0, m[1] if m[1] > 8 else n + m[1])), None
    elif kind == "truncate":
        return data[: m[1] % len(data)], None
    elif kind == "append":
        return data + m[1], None
    elif kind == "header":
        header = m[1]
    else:
        header["__metadata__"] = m[1]
    return _join(header, body), name


def _refused_or_same(path: Path, cfg, base, name: str | None, also: str = "") -> None:
    """load_weights(path) either refuses, naming the path (and the culprit tensor `name` and `also` when given),
    or loads exactly the original checkpoint's tensors (a mutation that keeps the file valid)."""
    try:
        got = load_weights(path, cfg)
    except WeightsError as e:
        event("refused")
        assert str(path) in str(e), str(e)
        if name is not None:
            assert repr(name) in str(e) and also in str(e), str(e)
        return
    event("loaded")
    _same(got, base["loaded"])


@fuzz(60)
@given(m=TENSOR_MUTATIONS | FILE_MUTATIONS)
def test_mutated_safetensors_header(tmp_path_factory, cfg, base, m):
    f = tmp_path_factory.mktemp("mut") / SINGLE_FILE
    data, name = _mutate(base["bytes"], m)
    f.write_bytes(data)
    _refused_or_same(f, cfg, base, name)


# ---- the index of a sharded checkpoint --------------------------------------------------------------
SHARD_NAMES = st.sampled_from(["", ".", "./", "../model.safetensors", "/etc/passwd", "a\0b", "x" * 300,
                               "sub/../../x", "nope.safetensors", "config.json", INDEX_FILE,
                               "model-00002-of-00002.safetensors"]) | st.text(max_size=12)


@fuzz(40)
@given(kind=st.sampled_from(["top", "weight_map", "entry", "entry_name", "add", "same"]), value=json_values,
       shard=SHARD_NAMES, pick=st.integers(0, 99))
def test_mutated_index(tmp_path_factory, cfg, base, kind, value, shard, pick):
    import shutil

    d = tmp_path_factory.mktemp("idx") / "ck"
    shutil.copytree(base["sharded"], d)
    index = json.loads((d / INDEX_FILE).read_text())
    wm = index["weight_map"]
    name = sorted(wm)[pick % len(wm)]
    must_name = None
    if kind == "top":
        index = value
    elif kind == "weight_map":
        index["weight_map"] = value
    elif kind == "entry":
        wm[name] = value
        must_name = name if not isinstance(value, str) or not value else None
    elif kind == "entry_name":
        wm[name] = shard
        p = Path(shard.replace("\0", ""))
        if not shard or "\0" in shard or p.is_absolute() or ".." in p.parts or not p.parts:
            must_name = name
    elif kind == "same":  # the same shard, spelled differently: loads
        wm[name] = "./" + wm[name]
    else:
        wm["model.extra.weight"] = shard
    (d / INDEX_FILE).write_text(json.dumps(index))
    _refused_or_same(d, cfg, base, must_name, also=INDEX_FILE)


def test_index_regressions(tmp_path, cfg, base):
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(base["sharded"], d)
    idx = d / INDEX_FILE
    index = json.loads(idx.read_text())
    name = sorted(index["weight_map"])[0]
    for value, word in [("../" + SINGLE_FILE, "outside"), (".", "not a shard file name"), (["x"], "shard file name"),
                        ("missing.safetensors", "absent")]:
        idx.write_text(json.dumps({"weight_map": {**index["weight_map"], name: value}}))
        _raises(WeightsError, lambda: load_weights(d, cfg), idx, repr(name), word)
    for bad in ([1, 2], {"weight_map": [1]}, {"weight_map": "x"}, {"weight_map": {}}, {}):
        idx.write_text(json.dumps(bad))
        _raises(WeightsError, lambda: load_weights(d, cfg), idx, "weight_map")


def test_safetensors_header_regressions(tmp_path, cfg):
    """Each header fault the issue lists gives a WeightsError naming the file and the tensor."""
    f = tmp_path / "x.safetensors"
    good = [("a", "F32", [2], b"\0" * 8), ("b", "F32", [1], b"\0" * 4)]
    cases = [
        ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "takes 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, "span 800"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "0 <= start <= end"),
        ({"a": [1, 2]}, "not an object"),
    ]
    for entry, word in cases:
        header = {**entry, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
        f.write_bytes(_join(header, b"\0" * 12))
        _raises(WeightsError, lambda: load_weights(f, cfg), f, "'a'", word)
    _raw_safetensors(f, good)
    data = f.read_bytes()
    f.write_bytes(data[:-3])  # truncated data
    _raises(WeightsError, lambda: load_weights(f, cfg), f, "truncated")
    f.write_bytes(struct.pack("<Q", 10**6) + data[8:])  # header length past the end of the file
    _raises(WeightsError, lambda: load_weights(f, cfg), f, "header")
    f.write_bytes(data[:5])  # not even the length prefix
    _raises(WeightsError, lambda: load_weights(f, cfg), f)
    f.write_bytes(_join([1, 2], b""))  # a header that is not an object
    _raises(WeightsError, lambda: load_weights(f, cfg), f)


@pytest.mark.parametrize("dtype", sorted(ST_DTYPES))
def test_checkpoint_tensor_dtype(tmp_path, cfg, base, dtype):
    """One tensor stored in any safetensors dtype: F32/BF16/F16 load, every other one is refused by name."""
    header, body = _split(base["bytes"])
    name = "model.norm.weight"
    e = header[name]
    old = e["data_offsets"][1] - e["data_offsets"][0]
    n = e["shape"][0] * ST_DTYPES[dtype] // 8
    # rebuild the file with this tensor's bytes resized for the new dtype
    entries = []
    for k in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
        s, t = header[k]["data_offsets"]
        if k == name:
            entries.append((k, dtype, e["shape"], (body[s:t] * 2)[:n] if n > old else body[s:s + n]))
        else:
            entries.append((k, header[k]["dtype"], header[k]["shape"], body[s:t]))
    f = _raw_safetensors(tmp_path / SINGLE_FILE, entries, meta={"format": "pt"})
    if dtype in ("F32", "BF16", "F16"):
        assert load_weights(f, cfg)[name].shape == (8,)
    else:
        _raises(WeightsError, lambda: load_weights(f, cfg), f, repr(name), dtype)


# ---- dumps ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dump_file(tmp_path_factory):
    taps = {"embed": np.arange(12, dtype=np.float32).reshape(3, 4), "layers.0.topk_idx": np.ones((3, 2), np.int64)}
    return write_dump(tmp_path_factory.mktemp("dump") / "taps.safetensors", taps, backend="numpy",
                      dtype="float32", input_ids=[1, 2, 3], positions=[0, 1, 2])


def _with_meta(src: Path, dst: Path, **meta) -> Path:
    header, body = _split(src.read_bytes())
    header["__metadata__"] = {**header["__metadata__"], **meta}
    dst.write_bytes(_join(header, body))
    return dst


@fuzz(40)
@given(key=st.sampled_from(["input_ids", "positions", "format"]),
       text=json_values.map(json.dumps) | st.text(max_size=20)
       | st.lists(st.integers(-5, 2**64), max_size=5).map(json.dumps))
def test_mutated_dump_metadata(tmp_path_factory, dump_file, key, text):
    f = _with_meta(dump_file, tmp_path_factory.mktemp("dm") / "taps.safetensors", **{key: text})
    try:
        taps, meta = read_dump(f)
    except DumpError as e:
        event("refused")
        assert str(f) in str(e) and key in str(e), str(e)
        return
    event("loaded")
    if key == "format":
        assert text == "qwen3lab.taps"
    else:
        v = json.loads(text)
        assert meta[key] == v and all(type(x) is int and 0 <= x < 2**63 for x in v)
    assert list(taps) == ["embed", "layers.0.topk_idx"]


@pytest.mark.parametrize("key", ["input_ids", "positions"])
@pytest.mark.parametrize("text,word", [
    (NESTED, "nested"), ("[1" + "0" * 5000 + "]", "digits"),
    ("[" + "1," * (LIMITS["dump_metadata"] // 2) + "1]", "limit"),
    ("[1.5]", "1.5"), ("[true]", "True"), ('["3"]', "'3'"), ("[-1]", "-1"), ('{"a": 1}', "dict"), ("[1", "malformed"),
])
def test_dump_metadata_regressions(tmp_path, dump_file, key, text, word):
    f = _with_meta(dump_file, tmp_path / "taps.safetensors", **{key: text})
    _raises(DumpError, lambda: read_dump(f), f, repr(key), word)


@pytest.mark.parametrize("dtype", sorted(ST_DTYPES))
def test_dump_tensor_dtype(tmp_path, dtype):
    """float8 and other dtypes NumPy cannot hold are refused naming the tensor (a traceback before)."""
    n = 8 * ST_DTYPES[dtype] // 8
    f = _raw_safetensors(tmp_path / "taps.safetensors", [("layers.0.q", dtype, [8], bytes(range(n)))],
                         meta={"format": "qwen3lab.taps"})
    if dtype in DUMP_DTYPES:
        taps, _ = read_dump(f)
        assert taps["layers.0.q"].shape == (8,)
    else:
        _raises(DumpError, lambda: read_dump(f), f, "'layers.0.q'", dtype)


def test_cli_verify_float8_dump(tmp_path):
    """The issue's example: a float8 tensor in a dump was a traceback; now one error line naming it."""
    from qwen3lab.make_model import make_model

    model = make_model(tmp_path / "m", preset="tiny", dtype="float32", seed=3)
    f = _raw_safetensors(tmp_path / "f8.safetensors", [("layers.0.q", "F8_E4M3", [8], bytes(8))],
                         meta={"format": "qwen3lab.taps"})
    line = _cli_error("verify", "--model-path", model, "--candidate", f"dump:{f}")
    assert str(f) in line and "'layers.0.q'" in line and "F8_E4M3" in line, line


def test_dump_garbage(tmp_path):
    f = tmp_path / "taps.safetensors"
    f.write_bytes(b"garbage, not a dump")
    _raises(DumpError, lambda: read_dump(f), f)
    _raises(DumpError, lambda: read_dump(tmp_path / "missing.safetensors"), "missing.safetensors", "not found")


# ---- tiny --weights -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory, cfg, base):
    return json.loads(write_weights(tmp_path_factory.mktemp("tj") / "w.json", base["weights"], cfg).read_text())


def _numeric_shape(v):
    """Shape of a rectangular nested list of float64-convertible JSON numbers, else None (the test's oracle)."""
    if not isinstance(v, list):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        try:
            float(v)
        except OverflowError:
            return None
        return ()
    shapes = {_numeric_shape(x) for x in v}
    if len(shapes) > 1 or None in shapes:
        return None
    return (len(v), *(shapes.pop() if shapes else ()))


NUMBERS = st.integers(-1000, 1000) | st.floats() | st.integers(-(10**400), 10**400)
LEAVES = NUMBERS | NUMBERS | st.none() | st.booleans() | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=2)


@fuzz(40)
@given(kind=st.sampled_from(["tensor", "leaf", "leaf", "leaf", "row", "top", "extra"]), value=json_values, leaf=LEAVES,
       pick=st.integers(0, 999))
def test_mutated_tiny_json(tmp_path_factory, cfg, base, tiny_json, kind, value, leaf, pick):
    d = json.loads(json.dumps(tiny_json))
    name = sorted(d)[pick % len(d)]
    if kind == "tensor":
        d[name] = value
    elif kind in ("leaf", "row"):
        rows = d[name] if isinstance(d[name][0], list) else [d[name]]
        row = rows[pick % len(rows)]
        if kind == "leaf":
            row[pick % len(row)] = leaf
        else:
            row.append(1.0)
    elif kind == "top":
        d = value
    else:
        d["model.extra.weight"] = [1.0]
        name = "model.extra.weight"
    f = tmp_path_factory.mktemp("tjm") / "w.json"
    f.write_text(json.dumps(d))
    want = {k: tuple(s) for k, s in expected_shapes(cfg).items()}
    valid = isinstance(d, dict) and set(d) == set(want) and all(_numeric_shape(d[k]) == want[k] for k in want)
    try:
        got = read_weights(f, cfg)
    except WeightsError as e:
        event("refused")
        assert not valid, str(e)
        assert str(f) in str(e), str(e)
        if isinstance(d, dict) and kind != "top":
            assert repr(name) in str(e) or name in str(e), (kind, str(e))
        return
    event("loaded")
    assert valid, (kind, name)
    for k in want:
        np.testing.assert_array_equal(got[k], np.array(d[k], dtype=np.float64))


@pytest.mark.parametrize("leaf", [True, None, "0.5", "NaN", [1.0], {"a": 1}, 10**400])
def test_tiny_json_leaf_regressions(tmp_path, cfg, tiny_json, leaf):
    """Values np.array(..., float64) would take silently (true -> 1.0, null -> NaN, "0.5" -> 0.5) are refused."""
    d = json.loads(json.dumps(tiny_json))
    d["model.norm.weight"][3] = leaf
    f = tmp_path / "w.json"
    f.write_text(json.dumps(d))
    _raises(WeightsError, lambda: read_weights(f, cfg), f, "'model.norm.weight'")


class _Evil:
    """Unpickling this would create a file: proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tiny_npz_never_unpickles(tmp_path, cfg):
    marker = tmp_path / "pwned"
    f = tmp_path / "w.npz"
    np.savez(f, **{"model.norm.weight": np.array([_Evil(marker)], dtype=object)})
    _raises(WeightsError, lambda: read_weights(f, cfg), f, "pickle")
    g = tmp_path / "p.npz"
    g.write_bytes(pickle.dumps({"model.norm.weight": _Evil(marker)}))
    _raises(WeightsError, lambda: read_weights(g, cfg), g, "pickle")
    assert not marker.exists()


@pytest.mark.parametrize("arr,word", [
    (np.ones(8, dtype=bool), "bool"), (np.ones(8, dtype=np.complex64), "complex"), (np.array(["a"] * 8), "<U1"),
])
def test_tiny_npz_dtypes(tmp_path, cfg, base, arr, word):
    weights = checkpoint_tensors(base["weights"], cfg)
    f = tmp_path / "w.npz"
    np.savez(f, **{**weights, "model.norm.weight": arr})
    _raises(WeightsError, lambda: read_weights(f, cfg), f, "'model.norm.weight'", word)


def test_tiny_npz_garbage(tmp_path, cfg):
    f = tmp_path / "w.npz"
    np.save(tmp_path / "a.npy", np.ones(3))
    (tmp_path / "a.npy").rename(f)
    _raises(WeightsError, lambda: read_weights(f, cfg), f, ".npy")
    for data in (b"", b"PK\x03\x04garbage", b"\x93NUMPY\x01\x00garbage", os.urandom(64)):
        f.write_bytes(data)
        _raises(WeightsError, lambda: read_weights(f, cfg), f)


@pytest.mark.parametrize("dtype", sorted(ST_DTYPES))
def test_tiny_safetensors_dtype(tmp_path, cfg, base, dtype):
    weights = checkpoint_tensors(base["weights"], cfg)
    n = 8 * ST_DTYPES[dtype] // 8
    entries = [(k, "F64", list(v.shape), v.astype("<f8").tobytes()) for k, v in weights.items()
               if k != "model.norm.weight"]
    entries.append(("model.norm.weight", dtype, [8], bytes(n)))
    f = _raw_safetensors(tmp_path / "w.safetensors", entries)
    if dtype in TENSOR_DTYPES:
        np.testing.assert_array_equal(read_weights(f, cfg)["model.norm.weight"], np.zeros(8))
    else:
        _raises(WeightsError, lambda: read_weights(f, cfg), f, "'model.norm.weight'", dtype)


# ---- FIFOs: never opened, never block (one subprocess, under a timeout; last in the module) ----------------
FIFO_SCRIPT = r'''
import json, os, sys, traceback
from pathlib import Path
import numpy as np, torch
from click.testing import CliRunner
from qwen3lab.cli import main
from qwen3lab.config import Qwen3Config, load_config
from qwen3lab.errors import Qwen3LabError
from qwen3lab.taps import read_dump
from qwen3lab.tiny.config import tiny_config
from qwen3lab.tiny.weights import init_weights, read_weights
from qwen3lab.tokenizer import Tokenizer
from qwen3lab.checkpoint_save import save_checkpoint
from qwen3lab.weights import load_weights

root, tokjson = Path(sys.argv[1]), sys.argv[2]
cfg = tiny_config()
tensors = {k: torch.from_numpy(v).float() for k, v in init_weights(cfg, "arange").items()}

def fifo(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path

def ckpt(name, **kw):
    return save_checkpoint(root / name, cfg, tensors, dtype="float32", **kw)

def tokdir(name):
    d = root / name
    d.mkdir()
    (d / "tokenizer.json").write_text(tokjson)
    return d

def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    if r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output:
        raise Qwen3LabError(lines[0])
    raise RuntimeError(f"exit {r.exit_code}: {r.output!r} {r.exception!r}")

def single_fifo():
    d = ckpt("s1"); (d / "model.safetensors").unlink(); fifo(d / "model.safetensors")
    return load_weights(d, cfg)

def index_fifo():
    d = ckpt("s2", shard_size=1500); (d / "model.safetensors.index.json").unlink()
    fifo(d / "model.safetensors.index.json")
    return load_weights(d, cfg)

def shard_fifo():
    d = ckpt("s3", shard_size=1500); s = sorted(d.glob("model-*.safetensors"))[0]; s.unlink(); fifo(s)
    return load_weights(d, cfg)

def tok_fifo(name):
    d = tokdir("t_" + name); fifo(d / name)
    return Tokenizer.from_dir(d)

CASES = {
    "config_dir": lambda: load_config(fifo(root / "c1" / "config.json").parent),
    "config_file": lambda: Qwen3Config.from_file(fifo(root / "c2" / "config.json")),
    "weights_single": single_fifo,
    "weights_file": lambda: load_weights(fifo(root / "w" / "x.safetensors"), cfg),
    "weights_index": index_fifo,
    "weights_shard": shard_fifo,
    "dump": lambda: read_dump(fifo(root / "d" / "taps.safetensors")),
    "tiny_json": lambda: read_weights(fifo(root / "tj" / "w.json"), cfg),
    "tiny_npz": lambda: read_weights(fifo(root / "tn" / "w.npz"), cfg),
    "tiny_safetensors": lambda: read_weights(fifo(root / "ts" / "w.safetensors"), cfg),
    "tokenizer_json": lambda: Tokenizer.from_dir(fifo(root / "tk" / "tokenizer.json").parent),
    "tokenizer_config": lambda: tok_fifo("tokenizer_config.json"),
    "generation_config": lambda: tok_fifo("generation_config.json"),
    "chat_template": lambda: tok_fifo("chat_template.jinja"),
    "cli_params": lambda: cli("params", "--config", fifo(root / "p" / "config.json")),
    "cli_tiny_weights": lambda: cli("tiny", "--weights", fifo(root / "tw" / "w.json")),
}
for name, fn in CASES.items():
    print("START", name, flush=True)
    try:
        fn()
        out = {"case": name, "error": None, "msg": "loaded"}
    except Qwen3LabError as e:
        out = {"case": name, "error": type(e).__name__, "msg": str(e)}
    except Exception as e:
        out = {"case": name, "error": "traceback", "msg": traceback.format_exc()}
    print(json.dumps(out), flush=True)
'''

FIFO_CASES = {  # case -> (error type, what the message must name besides "FIFO")
    "config_dir": ("ConfigError", "config.json"), "config_file": ("ConfigError", "config.json"),
    "weights_single": ("WeightsError", "model.safetensors"), "weights_file": ("WeightsError", "x.safetensors"),
    "weights_index": ("WeightsError", INDEX_FILE), "weights_shard": ("WeightsError", "model-00001-of-"),
    "dump": ("DumpError", "taps.safetensors"), "tiny_json": ("WeightsError", "w.json"),
    "tiny_npz": ("WeightsError", "w.npz"), "tiny_safetensors": ("WeightsError", "w.safetensors"),
    "tokenizer_json": ("TokenizerError", "tokenizer.json"),
    "tokenizer_config": ("TokenizerError", "tokenizer_config.json"),
    "generation_config": ("TokenizerError", "generation_config.json"),
    "chat_template": ("TokenizerError", "chat_template.jinja"),
    "cli_params": ("Qwen3LabError", "config.json"), "cli_tiny_weights": ("Qwen3LabError", "w.json"),
}


@pytest.fixture(scope="module", autouse=True)
def fifo_proc(tmp_path_factory):
    """The FIFO cases' subprocess, started with the module's first test so that it runs (mostly importing
    torch) beside the other tests; its results are read by the FIFO tests at the end of the module."""
    root = tmp_path_factory.mktemp("fifo")
    env = {**os.environ, "PYTHONPATH": str(Path(qwen3lab.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", FIFO_SCRIPT, str(root), _tokenizer_json()], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def fifo_results(fifo_proc):
    try:
        out, _ = fifo_proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a reader blocked: the case after the last START without a result fails
        fifo_proc.kill()
        out, _ = fifo_proc.communicate()
    results = {}
    for line in out.splitlines():
        if line.startswith("START "):
            results[line.split()[1]] = {"error": "hang", "msg": "blocked on the FIFO (timed out)"}
        elif line.startswith("{"):
            d = json.loads(line)
            results[d["case"]] = d
    return results


@pytest.mark.parametrize("case", list(FIFO_CASES))
def test_fifo_is_refused_without_blocking(fifo_results, case):
    assert case in fifo_results, f"{case} never ran (an earlier case blocked?)"
    r = fifo_results[case]
    err, name = FIFO_CASES[case]
    assert r["error"] == err, r
    assert name in r["msg"] and "FIFO" in r["msg"], r["msg"]
