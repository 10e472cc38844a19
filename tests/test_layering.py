"""The import layering of DESIGN.md, checked on the source: every `qwen3lab` import (at module top or inside a
function) goes to the same layer or a lower one, and the top-level parts import each other without a cycle.

    0 base      errors, checks, limits, jsonio, guards, config, shapes, rope, pages, weights, tokenizer, taps,
                runspec, presets, random_init, make_model, params, paths
    1 kernels   fast, dist
    2 models    models
    3 engine    engine, backends, loading, qwen3
    4 tools     verify, tiny, bench, serve
    5 surface   cli, api, the package itself (__init__, __main__)

A new top-level module or package must be given a layer here (the failure says so).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qwen3lab"

LAYERS = {
    0: {"errors", "checks", "limits", "jsonio", "guards", "config", "shapes", "rope", "pages", "weights", "tokenizer",
        "taps", "runspec", "presets", "random_init", "make_model", "params", "paths", "data", "config_fields",
        "chat_template", "memory_estimate", "checkpoint_files", "checkpoint_save"},
    1: {"fast", "dist"},
    2: {"models"},
    3: {"engine", "backends", "loading", "qwen3", "llm"},
    4: {"verify", "tiny", "bench", "serve"},
    5: {"cli", "api", "__init__", "__main__"},
}
LAYER_OF = {part: n for n, parts in LAYERS.items() for part in parts}
NAMES = {0: "base", 1: "kernels", 2: "models", 3: "engine", 4: "tools", 5: "surface"}


def _part(module: str) -> str:
    """qwen3lab.verify.runner -> verify; qwen3lab -> __init__."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported qwen3lab module) for every import in the file, relative ones resolved; `from pkg import
    name` counts as importing pkg.name (a submodule or an attribute: either way it lives in pkg.name's part)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1] if package[-1] == "__init__" else package
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod == "qwen3lab":  # from qwen3lab import x / from .. import pages: the part is x
                out += [(node.lineno, f"qwen3lab.{a.name}") for a in node.names]
            elif mod.startswith("qwen3lab."):
                out.append((node.lineno, mod))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("qwen3lab")]
    return out


def _graph() -> dict[str, dict[str, str]]:
    """part -> {imported part: where (file:line)}."""
    g: dict[str, dict[str, str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        src_part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, mod in _imports(path):
            g.setdefault(src_part, {}).setdefault(_part(mod), f"{rel}:{line}")
    return g


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    parts |= {p.name for p in SRC.iterdir() if p.is_dir() and p.name == "data"}
    missing = sorted(parts - set(LAYER_OF))
    assert not missing, f"give these a layer in tests/test_layering.py LAYERS (and CONTRIBUTING.md): {missing}"


def test_no_upward_import():
    bad = []
    for src, targets in _graph().items():
        for dst, where in targets.items():
            if dst in LAYER_OF and src in LAYER_OF and LAYER_OF[dst] > LAYER_OF[src]:
                bad.append(f"{where}: {src} ({NAMES[LAYER_OF[src]]}) imports {dst} ({NAMES[LAYER_OF[dst]]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycle_between_parts():
    g = {src: {d for d in targets if d != src} for src, targets in _graph().items()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(g.get(node, ())):
            cyc = visit(nxt, stack + [node])
            if cyc:
                return cyc
        done.add(node)
        return None

    for start in sorted(g):
        cyc = visit(start, [])
        assert cyc is None, "import cycle between parts: " + " -> ".join(cyc) + "\n" + "\n".join(
            f"  {a} -> {b} at {_graph()[a][b]}" for a, b in zip(cyc, cyc[1:], strict=False))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_listed_exist(layer):
    """A stale entry (a part renamed or removed) would hide a new one's missing layer."""
    present = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if p.is_dir()}
    future = {"dist", "serve", "__main__"}  # DESIGN.md's parts not written yet
    stale = sorted(LAYERS[layer] - present - future)
    assert not stale, f"layer {layer} lists parts that do not exist: {stale}"


def test_import_and_cli_startup_do_not_load_torch():
    """`import qwen3lab` and the CLI's option parsing (`qwen3lab --help`) stay light: torch (about a second to
    import) loads only when a command runs a model. This is what the function-local `torch` and model imports
    in paths.py, cli.py and the tools are for."""
    code = ("import sys, qwen3lab, qwen3lab.cli; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", f"importing qwen3lab loaded: {out.stdout.strip()[:500]}"
