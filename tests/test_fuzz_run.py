"""Fuzz suite, runtime guards (issue 13): sampling parameters (SamplingParams and the generate / chat options),
device strings, prompts that are not UTF-8, chat templates (malicious ones and generated jinja), an over-long
chat message, and verify plugins that raise. Every case ends in a correct success or one clear error naming the
option / template / plugin; never a traceback, a NaN probability or a hang (each risky case runs under a
deadline).

The CLI cases point --model at a directory that does not exist: a value the options accept then fails on that
directory, which proves the options were checked before anything loaded (and keeps each case in milliseconds).
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import textwrap

import jinja2
import pytest
import torch
from click.testing import CliRunner
from hypothesis import assume, example, given
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fuzz_settings import deadline, fuzz
from qwen3lab.chat_template import MAX_TEMPLATE_CHARS
from qwen3lab.cli import main
from qwen3lab.engine.sampler import MIN_TEMPERATURE, SamplingParams, sample
from qwen3lab.errors import InputError, Qwen3LabError, TokenizerError
from qwen3lab.make_model import make_model
from qwen3lab.runspec import RunSpec, available_devices
from qwen3lab.tokenizer import Tokenizer
from qwen3lab.verify import verify

pytestmark = pytest.mark.slow

MISSING = "/nonexistent/qwen3lab-fuzz-model"  # --model: the load fails here, after the options were checked




def run_cli(*args, input=None):
    with deadline():
        return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=True)


def assert_clean_failure(res, *names):
    """Exit 2, one `error:` line naming each of names, no traceback and nothing loaded."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "loading " not in res.output, res.output
    for n in names:
        assert n in res.output, (n, res.output)


# ---- values as any caller might pass them -----------------------------------------------------------------
ANY = (st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True) | st.integers() |
       st.integers(min_value=2**60, max_value=2**80) | st.booleans() | st.none() | st.text(max_size=8) |
       st.sampled_from([1e-300, 5e-324, 1e308, -0.0, 0.0, 1e-2, 0.0099999, 2**64 - 1, 2**64, -1, 10**400]))


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    if not _real(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int past float64
        return False


# what each parameter accepts, restated from the issue (not from the code under test)
VALID = {
    "temperature": lambda v: _finite(v) and (v == 0 or v >= MIN_TEMPERATURE),
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "top_p": lambda v: _real(v) and 0 < v <= 1,
    "seed": lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**64 - 1,
}
DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None}


def check_sampling_value(name, value, make):
    ok = VALID[name](value)
    try:
        p = make(**{**DEFAULTS, name: value})
    except InputError as e:
        assert not ok, f"{name}={value!r} refused: {e}"
        assert "\n" not in str(e) and len(str(e)) < 300, str(e)
        return str(e)
    assert ok, f"{name}={value!r} accepted: {p}"
    assert getattr(p, name) == (float(value) if name in ("temperature", "top_p") else value)
    # an accepted setting samples a real token from finite probabilities (1e-300 gave NaN before)
    logits = torch.linspace(-30.0, 30.0, 50)
    g = torch.Generator().manual_seed(0 if p.seed is None else p.seed)
    assert 0 <= sample(logits, p, g) < 50
    return None


@pytest.mark.parametrize("name", list(VALID))
@fuzz(40)
@given(value=ANY)
def test_sampling_params_from_python(name, value):
    msg = check_sampling_value(name, value, SamplingParams)
    if msg is not None:
        assert msg.startswith(name + " "), msg  # Python's name: temperature, not --temperature


@pytest.mark.parametrize("name", ["temperature", "seed"])
@fuzz(10)
@given(value=ANY)
def test_sampling_params_from_the_cli_spelling(name, value):
    msg = check_sampling_value(name, value, lambda **kw: SamplingParams.make(**kw, cli=True))
    if msg is not None:
        assert msg.startswith(f"--{name} "), msg


@pytest.mark.parametrize("t", [MIN_TEMPERATURE, 0.05, 1.0, 1e6, 1e30, 1e38, 1e300])
def test_accepted_temperatures_give_finite_probabilities(t):
    # float32 logits / temperature: small ones must not overflow, huge ones (inf in float32) must not give NaN
    from qwen3lab.engine.sampler import filter_logits

    logits = torch.tensor([-1e4, -3.0, 0.0, 2.5, 1e4])
    probs = torch.softmax(filter_logits(logits, t), dim=-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5, probs


# ---- the same through the command line --------------------------------------------------------------------
def _click_float(s):
    try:
        return float(s)
    except ValueError:
        return None


def _click_int(s):
    try:
        return int(s)
    except ValueError:
        return None


CLI_TEXT = (st.floats(allow_nan=True, allow_infinity=True).map(repr) | st.integers().map(str) |
            st.integers(min_value=2**62, max_value=2**72).map(str) |
            st.sampled_from(["1e-300", "nan", "-inf", "2**70", "0x10", "1_000", " 3 ", "", "abc", "0.0099", "1e-2",
                             "18446744073709551615", "18446744073709551616", "-1", "true"]) |
            st.text(alphabet="0123456789.-+eE_ x", max_size=10))
CLI_OPTS = {"--temperature": ("temperature", _click_float), "--top-p": ("top_p", _click_float),
            "--top-k": ("top_k", _click_int), "--seed": ("seed", _click_int), "--max-steps": ("max_steps", _click_int)}


@pytest.mark.parametrize("opt", list(CLI_OPTS))
@fuzz(20)
@given(text=CLI_TEXT, command=st.sampled_from(["generate", "chat"]))
def test_sampling_options_fail_before_any_model_loads(opt, text, command, tmp_path):
    name, parse = CLI_OPTS[opt]
    assume(not text.startswith("-") or parse(text) is not None)  # "-x" alone is read as an option, not a value
    value = parse(text)
    valid = value is not None and (value >= 1 if name == "max_steps" else VALID[name](value))
    args = [command, "--model", MISSING, opt, text] + (["hi"] if command == "generate" else [])
    res = run_cli(*args, input="/exit\n")
    if valid:  # the options passed; the missing model directory is what stops it
        assert_clean_failure(res, "no such checkpoint directory")
    else:  # refused by click (not a number) or by SamplingParams (out of range): either names the option
        assert_clean_failure(res, opt)


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "1e-300"], "--temperature must be 0 (greedy) or a finite number >= 0.01, got 1e-300"),
    (["--seed", str(2**70)], "--seed must be an integer in 0..2**64-1"),
    (["--seed", "-1"], "--seed must be an integer in 0..2**64-1"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--device", "meta"], "--device 'meta'"),
    (["--device", "mps"], "--device 'mps'"),
    (["--device", "bogus"], "invalid --device 'bogus'"),
    (["--device", "cuda:7"], "--device 'cuda:7'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_issue_examples_are_one_line_errors(command, args, needle):
    if args[:2] == ["--device", "mps"] and "mps" in available_devices():
        pytest.skip("this machine has MPS")
    res = run_cli(command, "--model", MISSING, *args, *(["hi"] if command == "generate" else []))
    assert_clean_failure(res, needle)
    if args[0] == "--device":
        assert f"this machine offers {', '.join(available_devices())}" in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_device_cuda_without_cuda(command):
    res = run_cli(command, "--model", MISSING, "--device", "cuda", *(["hi"] if command == "generate" else []))
    assert_clean_failure(res, "--device 'cuda'", "no CUDA device is available", "this machine offers cpu")


# ---- device strings ---------------------------------------------------------------------------------------
DEVICES = (st.sampled_from(["cpu", "cpu:0", "cpu:1", "cuda", "cuda:0", "cuda:1", "cuda:-1", "meta", "mps", "xpu",
                            "hip", "bogus", "", " cpu", "CPU", "cuda:99999999999999999999", "cpu:", "lazy"]) |
           st.text(max_size=12) | st.from_regex(r"(cpu|cuda|mps|meta|xpu)(:[0-9]{1,3})?", fullmatch=True))


def _device_ok(d: str) -> bool:
    have = available_devices()
    if d in ("cpu", "cpu:0") or d in have:
        return True
    return d == "cuda" and any(h.startswith("cuda:") for h in have)


@fuzz(60)
@given(device=DEVICES, cli=st.booleans())
def test_device_strings(device, cli):
    try:
        spec = RunSpec.make(device, "float32", fast=False, cli=cli)
    except InputError as e:
        assert not _device_ok(device), f"{device!r} refused: {e}"
        msg = str(e)
        assert ("--device" if cli else "device") in msg and "this machine offers" in msg and "\n" not in msg, msg
        return
    assert _device_ok(device), f"{device!r} accepted as {spec.device}"
    assert torch.device(spec.device).type in ("cpu", "cuda", "mps")


@pytest.mark.parametrize("device", [None, 1.5, True, b"cpu", ["cpu"], object()])
def test_device_of_the_wrong_type(device):
    with pytest.raises(InputError, match="device must be a device name like 'cpu' or 'cuda:0', got .*machine offers"):
        RunSpec.make(device)


# ---- prompts that are not UTF-8 ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,byte", [("a\udcffb", "byte 0xff at character 1"), ("\udcc3(", "byte 0xc3"),
                                         ("ok \ud800", "U+D800")])
def test_generate_prompt_not_utf8(prompt, byte):
    res = run_cli("generate", "--model", MISSING, prompt)
    assert_clean_failure(res, "PROMPT is not valid UTF-8", byte)


def test_generate_bytes_argv_not_utf8():
    # the real thing: a command line carrying raw bytes (Python decodes argv with surrogateescape)
    code = "import sys; from qwen3lab.cli import main; sys.argv[0] = 'qwen3lab'; main()"
    p = subprocess.run([sys.executable, "-c", code, "generate", "--model", MISSING, b"caf\xe9"], capture_output=True,
                       timeout=60, env={"PYTHONPATH": "src", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode == 2 and "PROMPT is not valid UTF-8: byte 0xe9 at character 3" in err, err
    assert "Traceback" not in err


def test_stop_and_system_not_utf8():
    assert_clean_failure(run_cli("generate", "--model", MISSING, "--stop", "\udcff", "hi"), "--stop is not valid UTF-8")
    assert_clean_failure(run_cli("chat", "--model", MISSING, "--system", "\udcfe"), "--system is not valid UTF-8")


# ---- chat templates ---------------------------------------------------------------------------------------
SOURCE = "/models/fuzz/chat_template.jinja"
MSGS = [{"role": "user", "content": "hi"}]


def small_tokenizer_json() -> str:
    """A two-word tokenizer.json: the template tests render text and need no real vocabulary (the bundled one
    takes a second or two to parse on a slow machine)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    return HFTokenizer(WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()


@functools.lru_cache(maxsize=1)
def small_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(small_tokenizer_json())


def tok_with(template: str) -> Tokenizer:
    return Tokenizer(small_tokenizer(), {"chat_template": template, "eos_token": "<|im_end|>"},
                     chat_template_source=SOURCE)


MALICIOUS = {
    "zero division": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "include": ("{% include 'other.jinja' %}", "cannot be loaded"),
    "extends": ("{% extends 'base.jinja' %}", "cannot be loaded"),
    "import": ("{% import 'macros.jinja' as m %}", "cannot be loaded"),
    "from import": ("{% from 'm.jinja' import f %}", "cannot be loaded"),
    "huge range": ("{% for i in range(10**12) %}{{ i }}{% endfor %}", "elements a render may produce"),
    "nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                      "elements a render may produce"),
    "string bomb": ("{{ 'x' * 10**10 }}", "repeated"),
    "list bomb": ("{% set a = [0] * 10**9 %}", "repeated"),
    "nested string loops": ("{% for a in 'ab' * 400000 %}{% for b in 'cd' * 400000 %}{% endfor %}{% endfor %}",
                            "elements a render may produce"),
    "nested loops over a literal": ("{% set s = '" + "ab" * 300_000 + "' %}{% for a in s %}{% for b in s %}{% endfor %}"
                                    "{% endfor %}", "loops go past 1,000,000 iterations"),
    "loop over a joined range": ("{% for c in range(200000) | join %}{% endfor %}",  # 1,088,890 characters
                                 "loops go past 1,000,000 iterations"),
    "power": ("{{ 2 ** 10000000 }}", "bits"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    "dunder": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "raised"),
    "undefined": ("{{ nope.attr }}", "'nope' is undefined"),
    "type error": ("{{ messages[0].content / 2 }}", "TypeError"),
    "raise_exception": ("{{ raise_exception('Only user and assistant roles are supported!') }}",
                        "Only user and assistant roles are supported!"),
    "syntax": ("{% for %}", "syntax error line 1"),
    "unclosed": ("{% if true %}x", "syntax error"),
    "deep nesting": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "RecursionError"),
    "deep blocks": ("{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30, "cannot be compiled: too many statically"),
    "bad filter": ("{{ 'a' | nosuchfilter }}", "nosuchfilter"),
    "over the size limit": ("x" * (MAX_TEMPLATE_CHARS + 1), "the limit is 1,000,000"),
}


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_templates_are_one_line_errors_naming_the_file(name):
    template, needle = MALICIOUS[name]
    with deadline(20), pytest.raises(TokenizerError) as e:
        tok_with(template).apply_chat_template(MSGS)
    msg = str(e.value)
    assert msg.startswith(f"{SOURCE}: chat_template") and needle in msg and "\n" not in msg, msg
    assert len(msg) < 600, msg


def test_a_slow_loop_body_is_stopped_by_the_render_deadline(monkeypatch):
    # within every count limit, but each step is a megabyte of work: the wall clock ends it (here after 0.5 s)
    monkeypatch.setattr("qwen3lab.chat_template.MAX_RENDER_SECONDS", 0.5)
    t = ("{% set big = range(150000) | join %}{% for i in range(999) %}{% for j in range(999) %}"
         "{% set x = big | upper %}{% endfor %}{% endfor %}")
    with deadline(20), pytest.raises(TokenizerError, match=re.escape(f"{SOURCE}: chat_template raised: rendering "
                                                                     f"took more than 0.5 s")):
        tok_with(t).apply_chat_template(MSGS)


def test_the_sandbox_holds():
    # unsafe attributes read as undefined (empty), as in transformers; nothing of Python's objects leaks
    t = "[{{ '{0.__class__}'.format(messages) }}][{{ messages.__class__ }}][{{ range.__self__ }}]"
    assert tok_with(t).apply_chat_template(MSGS) == "[][][]"


def test_a_100mb_template_is_refused_before_compiling():
    # it aborted the process with signal 6: run it in a child so a regression fails this test, not the suite
    code = textwrap.dedent(f"""
        from qwen3lab.errors import TokenizerError
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordLevel
        from qwen3lab.tokenizer import Tokenizer
        hf = HFTokenizer(WordLevel({{"hi": 0, "[UNK]": 1}}, unk_token="[UNK]"))
        t = Tokenizer(hf, {{"chat_template": "{{{{ x }}}}\\n  " * 10_000_000}}, chat_template_source="{SOURCE}")
        try:
            t.apply_chat_template([{{"role": "user", "content": "hi"}}])
        except TokenizerError as e:
            print(e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": "src", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{SOURCE}: chat_template is 100,000,000 characters; the limit is 1,000,000" in p.stdout, p.stdout


def test_template_file_error_names_the_jinja_file(tmp_path):
    d = tmp_path / "with-template"
    d.mkdir()
    (d / "tokenizer.json").write_text(small_tokenizer_json())
    (d / "chat_template.jinja").write_text("line one\n{{ (messages | length) // 0 }}\n")
    with pytest.raises(TokenizerError, match=re.escape(f"{d / 'chat_template.jinja'}: chat_template raised "
                                                       f"ZeroDivisionError: integer division or modulo by zero "
                                                       f"(line 2)")):
        Tokenizer.from_dir(d).apply_chat_template(MSGS)


# generated jinja: small pieces that each may or may not fail, combined at random
EXPRS = st.sampled_from([
    "1", "0", "-3", "2.5", "'s'", "''", "none", "true", "[1, 2]", "{'a': 1}", "messages", "messages[0]",
    "messages[0]['content']", "messages[5]", "messages[0].role", "tools", "add_generation_prompt", "enable_thinking",
    "eos_token", "x", "loop", "range(3)", "range(2000000)", "namespace(a=1)", "'%s' % 1", "1 / 0", "1 // 0",
    "[] | first", "'a' * 3", "'a' * 2000000", "2 ** 8", "2 ** 100000", "messages | length", "(messages | tojson)",
    "'{}'.format(1)", "raise_exception('bad role')", "strftime_now('%Y')", "messages.__class__", "x.y.z",
    "'abc'[1:]", "[1, 2][7]", "{'a': 1}['b']", "'a' ~ 1", "1 + 's'", "messages * 3",
])
OPS = st.sampled_from(["+", "-", "*", "/", "~", "and", "or", "==", "in", "%", "**"])


@st.composite
def jinja_snippets(draw, depth=0):
    expr = draw(EXPRS)
    if draw(st.booleans()):
        expr = f"{expr} {draw(OPS)} {draw(EXPRS)}"
    kind = draw(st.sampled_from(["out", "if", "for", "set", "text", "bad"] if depth < 2 else ["out", "text"]))
    if kind == "out":
        return f"{{{{ {expr} }}}}"
    if kind == "text":
        return draw(st.text(alphabet="ab {}%#\n", max_size=6))
    if kind == "set":
        return f"{{% set v = {expr} %}}{{{{ v }}}}"
    inner = draw(jinja_snippets(depth=depth + 1))
    if kind == "if":
        return f"{{% if {expr} %}}{inner}{{% else %}}e{{% endif %}}"
    if kind == "for":
        return f"{{% for item in {expr} %}}{inner}{{{{ item }}}}{{% endfor %}}"
    return draw(st.sampled_from(["{% endfor %}", "{{", "{% if %}", "{{ 1 +  }}", "{% raw %}"])) + inner


def reference_render(template: str) -> str:
    """transformers' setup, without qwen3lab's limits; only called on what qwen3lab rendered within them."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    env.globals["strftime_now"] = lambda f: "YEAR"
    return env.from_string(template).render(messages=MSGS, tools=None, documents=None, add_generation_prompt=True,
                                            eos_token="<|im_end|>", enable_thinking=True)


@fuzz(80)
@given(parts=st.lists(jinja_snippets(), min_size=1, max_size=4))
@example(parts=["{% for i in range(2000000) %}{% endfor %}"])
@example(parts=["{{ 'a' * 2000000 }}"])
def test_generated_templates(parts):
    template = "".join(parts)
    assume("strftime_now" not in template)  # the date differs between the two renders
    with deadline(20):
        try:
            out = tok_with(template).apply_chat_template(MSGS)
        except TokenizerError as e:
            msg = str(e)
            assert msg.startswith(f"{SOURCE}: chat_template") and "\n" not in msg and len(msg) < 600, msg
            return
        assert out == reference_render(template), template


# ---- the chat session ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, one_torch_thread):
    """A tiny random checkpoint with a 64-token context, so one long message goes past it."""
    d = make_model(tmp_path_factory.mktemp("fz") / "tiny", preset="tiny", dtype="float32", seed=5)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _prompt_tokens(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt (\d+) tokens", output)]


def _read_line_without_echo(*args, **kwargs) -> str:
    """click.prompt as a terminal session sees it. CliRunner's own prompt echoes each line into its strict UTF-8
    output, which a line of raw bytes cannot pass; a real terminal does not echo through the program."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def test_chat_refuses_one_message_and_the_session_goes_on(chat_model, monkeypatch):
    # a line of bad UTF-8 and a line past the context are each refused; the history is intact afterwards
    monkeypatch.setattr("click.prompt", _read_line_without_echo)
    long = "word " * 200
    res = run_cli("chat", "--model", chat_model, "--no-fast", "--dtype", "float32", "--max-steps", "2",
                  input=b"hi\ncaf\xe9\n" + long.encode() + b"\nagain\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("error:") == 2 and res.output.count("Not sent; the history is kept") == 2, res.output
    assert "this line is not valid UTF-8: byte 0xe9 at character 3" in res.output, res.output
    assert "has 222 tokens: at or past the context length 64" in res.output, res.output
    first, last = _prompt_tokens(res.output)  # two replies: neither refused line was sent
    tok = Tokenizer.bundled()  # the tokenizer make_model wrote
    alone = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": "again"}])))
    assert last > first and last > alone + 5, (first, last, alone)  # "hi" and its reply are still in the history


# ---- verify plugins that raise ------------------------------------------------------------------------------
PLUGIN = '''
from qwen3lab.models.numpy_ref import NumpyBackend


class Good:
    dtype = "float32"

    def __init__(self, model_path):
        self.b = NumpyBackend.from_pretrained(model_path, dtype="float32")

    def run(self, input_ids, graft=None):
        return self.b.run(input_ids, taps="all", graft=graft).taps


class RunRaises(Good):
    def run(self, input_ids, graft=None):
        raise ZeroDivisionError("the port divided by zero\\non two lines")


class InitRaises(Good):
    def __init__(self, model_path):
        raise KeyError("weights")


class DtypeRaises(Good):
    @property
    def dtype(self):
        raise RuntimeError("no dtype today")


class DecodeRaises(Good):
    def run_decode(self, input_ids, decode_steps, graft=None):
        raise ValueError("decode is broken")
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    p = tmp_path_factory.mktemp("plug") / "port.py"
    p.write_text(PLUGIN)
    return p


@pytest.mark.parametrize("cls,kw,needle", [
    ("RunRaises", {}, "the candidate raised ZeroDivisionError: the port divided by zero on two lines"),
    ("InitRaises", {}, "the candidate raised KeyError: 'weights'"),
    ("DtypeRaises", {}, "the candidate raised RuntimeError: no dtype today"),
    ("DecodeRaises", {"decode_steps": 1}, "the candidate raised ValueError: decode is broken"),
])
def test_plugin_exceptions_are_one_line(chat_model, plugin, cls, kw, needle):
    with pytest.raises(Qwen3LabError) as e:
        verify("numpy", f"{plugin}:{cls}", [1, 2, 3], model_path=chat_model, **kw)
    msg = str(e.value)
    assert needle in msg and f"{plugin}:{cls}" in msg and "\n" not in msg, msg


def test_plugin_as_reference_is_named_so(chat_model, plugin):
    with pytest.raises(Qwen3LabError, match="the reference raised ZeroDivisionError"):
        verify(f"{plugin}:RunRaises", "numpy", [1, 2, 3], model_path=chat_model)


def test_plugin_exception_from_the_cli(chat_model, plugin):
    res = run_cli("verify", "--model-path", chat_model, "--candidate", f"{plugin}:RunRaises", "--ids", "1,2,3")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "error: the candidate raised ZeroDivisionError: the port divided by zero" in res.output, res.output
