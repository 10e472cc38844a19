"""qwen3lab: run, verify layer by layer, show and measure Qwen3 (dense and MoE) models."""

import importlib

from .api import load
from .config import Qwen3Config, load_config
from .errors import (
    ConfigError,
    DumpError,
    InputError,
    NumericsError,
    Qwen3LabError,
    TokenizerError,
    WeightsError,
)
from .runspec import MultiDeviceError, RunSpec

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the torch model (and torch) only when it is used keeps `import qwen3lab` light.
    if name == "Qwen3ForCausalLM":
        from .qwen3 import Qwen3ForCausalLM

        return Qwen3ForCausalLM
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .engine.sampler import SamplingParams

        return SamplingParams
    if name == "verify":
        # the verify subpackage is itself callable: qwen3lab.verify(reference, candidate, input_ids, ...)
        return importlib.import_module(".verify", __name__)
    raise AttributeError(f"module 'qwen3lab' has no attribute {name!r}")


__all__ = [
    "ConfigError", "DumpError", "InputError", "LLM", "MultiDeviceError", "NumericsError", "Qwen3Config",
    "Qwen3ForCausalLM", "Qwen3LabError", "RunSpec", "SamplingParams", "TokenizerError", "WeightsError", "load",
    "load_config", "verify", "__version__",
]
