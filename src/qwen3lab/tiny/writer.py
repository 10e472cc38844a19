"""How an `--explain` walkthrough is written and checked: the numbers printed as they go into a formula and come
out of it, each result held against the oracle (Writer.check), and the three formulas several steps print
(RMSNorm at one channel, a dot product, a projection's bias)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

TOL = 1e-9  # |scalar - oracle| <= TOL * max(1, |oracle|): both are float64, only the summation order differs


@dataclass
class Check:
    label: str
    ours: float
    oracle: float
    passed: bool

    def to_json(self) -> dict:
        def j(v):
            return v if math.isfinite(v) else None
        return {"label": self.label, "scalar": j(self.ours), "oracle": j(self.oracle), "passed": self.passed}


@dataclass
class Walkthrough:
    layer: int
    token: int
    channel: int
    head: int
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.passed == len(self.checks)

    def text(self) -> str:
        return "\n".join(self.lines)

    def to_json(self) -> dict:
        return {"layer": self.layer, "token": self.token, "channel": self.channel, "head": self.head,
                "checks_passed": self.passed, "checks_total": len(self.checks),
                "checks": [c.to_json() for c in self.checks]}


class Writer:
    def __init__(self, w: Walkthrough, p: int, width: int):
        self.w, self.p, self.width = w, p, width

    def n(self, v: float) -> str:
        """A number as it goes into a formula: parenthesised when negative so '+ (-0.1)' reads right."""
        if math.isnan(v) or math.isinf(v):
            return str(v)
        s = f"{v:.{self.p}f}"
        return f"({s})" if v < 0 else s

    def v(self, v: float) -> str:
        """A number in a list: no parentheses needed."""
        return f"{v:.{self.p}f}" if math.isfinite(v) else str(v)

    def r(self, v: float) -> str:
        """A result: two more digits than the inputs."""
        return f"{v:.{self.p + 2}f}" if math.isfinite(v) else str(v)

    def say(self, text: str, indent: str = "   ") -> None:
        # formulas wrap at ' + ' so a 16-term sum stays inside the terminal
        for para in text.split("\n"):
            self.w.lines.extend(textwrap.wrap(para, self.width, initial_indent=indent,
                                              subsequent_indent=indent + "    ", break_long_words=False,
                                              break_on_hyphens=False) or [""])

    def head(self, text: str) -> None:
        self.w.lines.append("")
        self.say(text, indent="")

    def check(self, label: str, ours: float, oracle: float) -> None:
        ok = (math.isnan(ours) and math.isnan(oracle)) or abs(ours - oracle) <= TOL * max(1.0, abs(oracle))
        self.w.checks.append(Check(label, float(ours), float(oracle), bool(ok)))
        diff = abs(ours - oracle) if math.isfinite(ours) and math.isfinite(oracle) else float("nan")
        self.say(f"check {label}: oracle {self.r(oracle)}, |diff| {diff:.1e}  {'✓' if ok else '✗ MISMATCH'}")


def rmsnorm_explained(o: Writer, x: list[float], w: list[float], eps: float, c: int, sym: str, out: str
                       ) -> float:
    n = len(x)
    ss, sq = 0.0, []
    for v in x:
        ss += v * v
        sq.append(f"{o.n(v)}²")
    ms = ss / n
    rms = math.sqrt(ms + eps)
    o.say(f"ms = ({' + '.join(sq)}) / {n} = {o.r(ms)}")
    o.say(f"rms = sqrt(ms + eps) = sqrt({o.r(ms)} + {eps:g}) = {o.r(rms)}")
    y = x[c] / rms * w[c]
    o.say(f"{out}[{c}] = {sym}{c} / rms · weight[{c}] = {o.n(x[c])} / {o.r(rms)} · {o.n(w[c])} = {o.r(y)}")
    return y


def dot_explained(o: Writer, a: list[float], b: list[float], out: str) -> float:
    acc, terms = 0.0, []
    for u, v in zip(a, b, strict=True):
        acc += u * v
        terms.append(f"{o.n(u)}·{o.n(v)}")
    o.say(f"{out} = {' + '.join(terms)} = {o.r(acc)}")
    return acc


def bias_explained(o: Writer, W: dict, name: str, row: int, acc: float, out: str) -> float:
    """Add the projection's bias (attention_bias models) and say so."""
    if name not in W:
        return acc
    b = W[name][row]
    o.say(f"{out} + bias[{row}] = {o.r(acc)} + {o.n(b)} = {o.r(acc + b)}")
    return acc + b
