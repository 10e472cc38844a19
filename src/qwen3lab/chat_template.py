"""The chat-template sandbox: Jinja2 the way transformers renders chat templates, with limits.

transformers' environment (sandboxed, trim_blocks/lstrip_blocks, loopcontrols, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, the {% generation %} tag), plus budgets a template
from a checkpoint cannot exceed: its size before compiling, loop steps, items made by range() and `*`,
big powers, output size and wall time per render. A template that breaks one raises TemplateLimitError.
`render(template, variables)` is the one entry point (tokenizer.py's apply_chat_template uses it).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark assistant text): renders its
    body unchanged, as transformers does when no assistant mask is asked for."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, &, ' which would change tool schemas in the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


# Limits on what a chat template may cost. Real templates are a few KB (Qwen3's: 4 KB) and render a few KB per
# message, so each limit is far above any real one; past them a hostile or broken template is refused with a
# one-line error instead of exhausting memory or time (a 100 MB template aborted the process with signal 6).
MAX_TEMPLATE_CHARS = 1_000_000  # checked before compiling
MAX_RENDER_ITEMS = 1_000_000  # elements produced by range() and by `*` on a string / list, per render
MAX_LOOP_STEPS = 1_000_000  # {% for %} iterations, all loops of a render together (nested loops multiply)
MAX_RENDER_SECONDS = 10.0  # checked at each loop step and output chunk: a loop whose body is slow work
MAX_RENDER_CHARS = 50_000_000  # the rendered prompt
MAX_POW_BITS = 4096  # int ** int results; 10 ** 10 ** 10 would otherwise compute for ever


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A chat template went past one of the limits above."""


_LOOP = "_qwen3lab_loop"  # the name every {% for %}'s iterable is passed through (_ChatSandbox._parse)


class _RenderBudget:
    """What one render may still produce and iterate; a fresh one per render (passed in as `range`, shadowing
    the global, and as _LOOP)."""

    def __init__(self):
        self.items = MAX_RENDER_ITEMS
        self.steps = MAX_LOOP_STEPS
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took more than {MAX_RENDER_SECONDS:g} s")

    def loop(self, iterable):
        for x in iterable:
            self.steps -= 1
            if self.steps < 0:
                raise TemplateLimitError(f"the template's loops go past {MAX_LOOP_STEPS:,} iterations")
            self.check_time()
            yield x

    def take(self, n: int, what: str) -> None:
        self.items -= n
        if self.items < 0:
            raise TemplateLimitError(f"{what} goes past the {MAX_RENDER_ITEMS:,} elements a render may produce")

    def range(self, *args):
        r = range(*args)  # a TypeError for non-int arguments, like Python's
        self.take(len(r), f"range{args}")
        return r


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox plus bounds on `*` and `**`, the operators that blow up from a few characters."""

    intercepted_binops = frozenset(["*", "**"])  # also stops compile-time constant folding of them

    def _parse(self, source, name, filename):
        # Every loop's iterable goes through the render budget: a loop over a long string nested in another
        # runs for ever without producing anything, and nothing else in jinja would notice.
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(jinja2.nodes.For):
            node.iter = jinja2.nodes.Call(jinja2.nodes.Name(_LOOP, "load"), [node.iter], [], None, None)
        return tree

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > 0:
                budget = context.get("range")
                cost = len(seq) * n
                if cost > MAX_RENDER_ITEMS:
                    raise TemplateLimitError(f"a sequence repeated {n} times goes past {MAX_RENDER_ITEMS:,} elements")
                if isinstance(getattr(budget, "__self__", None), _RenderBudget):
                    budget.__self__.take(cost, f"a sequence repeated {n} times")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * left.bit_length() > MAX_POW_BITS:
                raise TemplateLimitError(f"{left} ** {right} has more than {MAX_POW_BITS} bits")
        return super().call_binop(context, operator, left, right)


class _NoLoader(jinja2.BaseLoader):
    """include / import / extends: a chat template is one string, there is nothing else to load (without a
    loader jinja says only "no loader for this environment specified", a TypeError)."""

    def get_source(self, environment, template):
        raise jinja2.TemplateNotFound(template, f"{template!r} cannot be loaded: a chat template is one file, "
                                                f"include / import / extends are not available")


@lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols],
                       loader=_NoLoader())
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _render_raw(template: str, variables: dict[str, Any]) -> str:
    """The template rendered within the limits above (a fresh budget each render)."""
    budget = _RenderBudget()
    out: list[str] = []
    size = 0
    for chunk in _compile_template(template).generate({**variables, "range": budget.range, _LOOP: budget.loop}):
        size += len(chunk)
        budget.check_time()
        if size > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"the rendered prompt goes past {MAX_RENDER_CHARS:,} characters")
        out.append(chunk)
    return "".join(out)


def _at_line(e: BaseException) -> str:
    """" (line N)": the template line an exception came from (jinja rewrites its traceback to frames of
    "<template>"), or "" when unknown."""
    line = getattr(e, "lineno", None)
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if isinstance(line, int) else ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def plain(v: Any) -> Any:
    """Copy of template input as plain JSON-like data, so the template cannot touch the caller's objects."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return str(v)


def render(template: str, variables: dict[str, Any], where: str) -> str:
    """Render a chat template; whatever it does wrong (syntax, an exception it raises or causes, a limit it
    passes) is one TokenizerError naming `where` (the template's file) and, where known, the line."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TokenizerError(f"{where} is {len(template):,} characters; the limit is "
                             f"{MAX_TEMPLATE_CHARS:,} (real templates are a few thousand)")
    try:
        return _render_raw(template, variables)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where} syntax error line {e.lineno}: {_one_line(e.message or e)}") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{where} raised: {_one_line(e)}{_at_line(e)}") from None
    except SyntaxError as e:  # Python refused the code jinja made of it (its line numbers are that code's)
        raise TokenizerError(f"{where} cannot be compiled: {_one_line(e.msg)}") from None
    except Exception as e:  # noqa: BLE001 - the template is the user's code: any error it makes is its own
        raise TokenizerError(f"{where} raised {type(e).__name__}: {_one_line(e)}{_at_line(e)}") from None
