"""Adapters that make something outside our one forward yield taps: transformers, tap dumps, user plugins.

Each adapter is one small file with one job, and every one of them hands verify its taps through the same
check (check.py: tap names, a batch of one removed, canonical shapes; and weight names / shapes for an
adapter that holds a model of its own):

| file | adapter | spec |
|---|---|---|
| hf.py | transformers' Qwen3 / Qwen3-MoE through forward hooks (the peer reference; extra `[hf]`) | `hf` (loading.py) |
| dump.py | a safetensors tap dump written by a port in any language, with its isolated twin | `dump:FILE` |
| namemap.py + maps/ | a port's own tensor names and layouts -> canonical taps (`--map FILE` / `--map llama.cpp`) | |
| plugin.py | a user's Python class | `module:Class`, `file.py:Class` |
| llama_cpp.py + gguf.py | llama.cpp itself (llama-cpp-python, `make peer`); GGUFs | `llama.cpp:MODEL.gguf` |
| check.py | the shared tap / weight check | |
| dtypes.py | dtype labels (torch's, ggml's, short forms) -> one canonical label | |

Our own models (models/numpy_ref.py, models/torch_model.py) call taps.tap() themselves and need no adapter;
`qwen3lab.load` (loading.py) names them and `hf`.

The registry: a spec `PREFIX:REST` whose PREFIX is in ADAPTERS is opened by that adapter's opener, given as
"module:function" so that nothing is imported before it is used (transformers, llama-cpp-python). A bare
`PREFIX` is the same as `PREFIX:` (rest ""):

    opener(rest, *, cfg, model_path, device, dtype, role, options, name_map, isolated) -> backend

returning an object with .cfg, .name, .dtype and run(input_ids, taps=None, graft=None) -> RunResult (optional:
run_decode, supports_graft, fixed_input_ids, kv_dtype, problems(config_file, dtype) -> [str],
uncompared(names, decode_steps, layers) -> [str]); it passes its taps through check.TapCheck. Any other spec
with a colon is a plugin (plugin.py). A new adapter is one file here and one entry below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

ADAPTERS: dict[str, str] = {
    "dump": "qwen3lab.backends.dump:open_dump",
    "llama.cpp": "qwen3lab.backends.llama_cpp:open_llama_cpp",
}


def register(prefix: str, opener: str) -> None:
    """Add an adapter for specs `prefix:...` ("module:function" of its opener; see the module docstring)."""
    assert ":" in opener and prefix and ":" not in prefix, (prefix, opener)
    ADAPTERS[prefix] = opener


def adapter_for(spec: str) -> tuple[str, Callable] | None:
    """(the part after the prefix, the opener) for a registered `PREFIX:REST` or `PREFIX`; None for any other."""
    prefix, _, rest = spec.partition(":")
    if prefix not in ADAPTERS:
        return None
    module, _, fn = ADAPTERS[prefix].partition(":")
    return rest, getattr(importlib.import_module(module), fn)


__all__ = ["ADAPTERS", "adapter_for", "register"]
