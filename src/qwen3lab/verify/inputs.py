"""verify's inputs: the layer selection (--layers), the token ids (--ids / --test-input / a dump's own), the
reference's estimated memory (whether to stream), and the --map spec: checked before anything runs, with errors
that name the bad part."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..backends.namemap import NameMap
from ..errors import InputError
from ..models.base import check_input_ids
from ..taps import canonical_shape

DEFAULT_TEST_INPUT = "Hello, this is a test input"


def parse_layers(spec, num_layers: int) -> list[int] | None:
    """'0-4' / '0,2,5-7' / [1, 2] / None -> sorted layer indices (errors name the bad part). Each index and
    range end is checked against num_layers before a range is expanded, so '0-100000000000' is refused at once."""
    if spec is None or spec == "" or spec == "all":
        return None
    last = f"the model has layers 0..{num_layers - 1}"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if not isinstance(spec, str):
        try:
            items = [operator.index(i) for i in spec]
        except TypeError:
            raise InputError(f"--layers {_short(spec)}: expected a spec like 0-4 or a list of layer indices") from None
        bad = [i for i in items if not 0 <= i < num_layers]
        if bad:
            raise InputError(f"--layers: layer {_short(bad[0])} does not exist ({last})")
        return sorted(set(items))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            a, b = part.split("-", 1) if "-" in part else (part, part)
            lo, hi = int(a), int(b)
            if lo > hi:
                raise ValueError
        except ValueError:
            raise InputError(f"--layers {_short(spec)}: {_short(part)} is not a layer index or range like 0-4") \
                from None
        if lo < 0 or hi >= num_layers:  # the first index of the part that does not exist is named
            bad = lo if lo < 0 or lo >= num_layers else num_layers
            raise InputError(f"--layers {_short(spec)}: layer {_short(bad)} does not exist ({last})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _short(v) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def resolve_input_ids(input_ids, test_input: str | None, model_path, sides: Iterable, cfg) -> tuple:
    """(ids, text): explicit ids, else the text tokenized, else a dump's own ids, else the default text."""
    if input_ids is not None:
        if isinstance(input_ids, str):
            try:
                input_ids = [int(x) for x in input_ids.replace(" ", "").split(",") if x]
            except ValueError:
                raise InputError(f"--ids {input_ids!r}: expected comma-separated integers like 1,2,3") from None
        return check_input_ids(list(input_ids), cfg).tolist(), test_input
    if test_input is None:
        for s in sides:
            if s.fixed_input_ids is not None:
                return check_input_ids(s.fixed_input_ids, cfg).tolist(), None
        test_input = DEFAULT_TEST_INPUT
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_path) if model_path is not None else Tokenizer.bundled()
    return check_input_ids(tok.encode(test_input), cfg).tolist(), test_input


def estimate_bytes(cfg, names: list[str], T: int) -> int:
    total = 0
    for n in names:
        try:
            total += int(np.prod(canonical_shape(cfg, n, T))) * 8
        except KeyError:
            pass
    return total


def is_dump(spec) -> bool:
    return isinstance(spec, str) and spec.startswith("dump:")


def load_name_map(spec):
    """--map: None, a NameMap, or a file / built-in name to load."""
    if spec is None or not isinstance(spec, (str, Path)):
        return spec
    return NameMap.load(spec)


def parse_options(pairs) -> dict[str, str]:
    """--candidate-opt key=value (repeatable) -> {key: value}; values stay strings (the plugin converts)."""
    out: dict[str, str] = {}
    for p in pairs or ():
        key, eq, value = str(p).partition("=")
        if not eq or not key.strip().isidentifier():
            raise InputError(f"--candidate-opt {p!r}: expected key=value with key a Python identifier")
        out[key.strip()] = value
    return out
