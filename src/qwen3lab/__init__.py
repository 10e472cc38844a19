"""qwen3lab: run, verify layer by layer, show and measure Qwen3 (dense and MoE) models."""

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

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DumpError", "InputError", "NumericsError", "Qwen3Config", "Qwen3LabError",
    "TokenizerError", "WeightsError", "load", "load_config", "__version__",
]
