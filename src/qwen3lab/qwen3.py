"""`Qwen3ForCausalLM`: the user-facing engine — a checkpoint dir in, text or token ids out.

    m = Qwen3ForCausalLM.from_pretrained("./qwen3-demo", dtype="bfloat16")
    r = m.generate("你好，世界", max_steps=50, temperature=0.7, top_p=0.9, seed=0,
                   stream=lambda tok, text: print(text, end="", flush=True))
    r.token_ids, r.text, r.tokens_per_s

    tasks = [m.new_task("Hello", max_new_tokens=8), m.new_task([9707, 11], temperature=1.0, seed=1)]
    while tasks:
        m.batch_infer_one_round(tasks)          # one packed forward for all, one new token each
        tasks = [t for t in tasks if not t.finished]

Notable: stop = eos ids (tokenizer's generation_config + config.json) plus `stop` (ids and/or strings);
ndev > 1 is refused with a clear error: tensor parallelism is not implemented yet (a single process runs on
one device), and without that many CUDA devices it could not run anyway.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .config import Qwen3Config
from .engine.generate import GenerateResult, generate
from .engine.runner import batch_infer_one_round
from .engine.sampler import SamplingParams
from .engine.task import InferTask
from .errors import InputError
from .models.torch_model import Qwen3CausalLM
from .runspec import RunSpec


def _speed_up(model: Qwen3CausalLM, spec: RunSpec) -> Qwen3CausalLM:
    """qwen3lab.fast (fused projections, kernels, quantised weights) when the spec runs the fast path."""
    if spec.fast:
        from .fast import optimize

        optimize(model, quant=spec.quant, group_size=spec.group_size)
    return model


def _spec(device, dtype, quant, fast: bool, ndev: int = 1, group_size: int | None = None) -> RunSpec:
    # fast=True means the fast path wherever it exists (the CPU); quantised weights need it (runspec.py)
    return RunSpec.make(device, dtype, quant, fast=None if fast else False, ndev=ndev, group_size=group_size)


class Qwen3ForCausalLM:
    """Our torch model + tokenizer + engine. `.model` is the nn.Module (Qwen3CausalLM)."""

    def __init__(self, model: Qwen3CausalLM, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "bfloat16", ndev: int = 1, quant: str | None = None,
                        fast: bool = True, group_size: int | None = None,
                        spec: RunSpec | None = None) -> Qwen3ForCausalLM:
        """Load a HF-layout checkpoint dir (config.json, *.safetensors, tokenizer files).

        dtype "int8" / "int4" means bfloat16 activations with those weights (quant="int8" / "int4" with float32
        or bfloat16 activations; int4's group_size 32 or 128, default 128). fast (CPU only): fused projections
        and the kernels of qwen3lab.fast; fast=False keeps the plain eager model. spec: a RunSpec made by the
        caller (runspec.py) instead of device / dtype / ndev / quant / fast / group_size."""
        from .api import resolve_model_path
        from .tokenizer import Tokenizer
        from .weights import load_weights

        spec = spec or _spec(device, dtype, quant, fast, ndev, group_size)
        path = resolve_model_path(path)
        cfg = Qwen3Config.from_file(path)
        weights = load_weights(path, cfg, dtype=spec.torch_dtype, device=spec.device, release_pages=spec.fast)
        model = Qwen3CausalLM.from_weights(cfg, weights, device=spec.device, dtype=spec.torch_dtype)
        del weights
        return cls(_speed_up(model, spec), Tokenizer.from_dir(path))

    @classmethod
    def from_weights(cls, cfg: Qwen3Config, weights, tokenizer=None, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "float32", quant: str | None = None,
                     fast: bool = True, group_size: int | None = None) -> Qwen3ForCausalLM:
        """From a {hf_name: tensor} dict (e.g. random_init.random_weights) instead of a directory."""
        spec = _spec(device, dtype, quant, fast, group_size=group_size)
        model = Qwen3CausalLM.from_weights(cfg, weights, device=spec.device, dtype=spec.torch_dtype)
        return cls(_speed_up(model, spec), tokenizer)

    @property
    def config(self) -> Qwen3Config:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> str:
        """The activation dtype, or the weight format ("int8", "int4") for quantised weights."""
        return getattr(self.model, "quant", None) or str(self.model.dtype).removeprefix("torch.")

    @property
    def eos_token_ids(self) -> list[int]:
        ids = list(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_token_ids if i not in ids]
        return ids

    # ---- inputs ------------------------------------------------------------------------------------
    def encode(self, prompt_or_ids) -> list[int]:
        """Token ids of a prompt: a str is tokenized as is (no chat template); ids are passed through."""
        if isinstance(prompt_or_ids, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer and this model has none; pass token ids")
            return self.tokenizer.encode(prompt_or_ids)
        if isinstance(prompt_or_ids, (np.ndarray, torch.Tensor)):
            if prompt_or_ids.ndim != 1:
                raise InputError(f"token ids must be a flat sequence, got shape {tuple(prompt_or_ids.shape)}")
            prompt_or_ids = prompt_or_ids.tolist()
        if not isinstance(prompt_or_ids, Sequence):
            raise InputError(f"prompt must be a str or a sequence of token ids, got {type(prompt_or_ids).__name__}")
        return list(prompt_or_ids)

    def _stops(self, stop) -> tuple[list[int], list[str]]:
        if stop is None:
            items = []
        elif isinstance(stop, (str, int)):
            items = [stop]
        else:
            items = list(stop)
        is_id = lambda s: isinstance(s, numbers.Integral) and not isinstance(s, bool)
        bad = [s for s in items if not (is_id(s) or isinstance(s, str))]
        if bad:
            raise InputError(f"stop must be token ids (int) and/or strings, got {bad[0]!r}")
        return self.eos_token_ids + [int(s) for s in items if is_id(s)], [s for s in items if isinstance(s, str)]

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, prompt_or_ids, max_steps: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=None,
                 stream: Callable[[int, str], None] | None = None) -> GenerateResult:
        """Generate up to max_steps tokens. temperature 0 = greedy. stop: token ids and/or strings (eos ids
        always stop). stream(token_id, text_delta) is called for each token as it is made.
        Returns .token_ids, .text, .tokens_per_s (decode rate), .finish_reason, .prefill_s."""
        stop_ids, stop_strings = self._stops(stop)
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        return generate(self.model, self.encode(prompt_or_ids), max_steps=max_steps, sampling=sampling,
                        stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=self.tokenizer, stream=stream)

    def new_task(self, prompt_or_ids, max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Iterable[int] | int | None = None) -> InferTask:
        """An InferTask for batch_infer_one_round, with its own sampling settings; eos ids stop it."""
        ids, strs = self._stops(stop)
        if strs:
            raise InputError("InferTask stops on token ids only; stop strings are handled by generate()")
        return InferTask(self.encode(prompt_or_ids), SamplingParams(temperature, top_k, top_p, seed),
                         stop_ids=frozenset(ids), max_new_tokens=max_new_tokens)

    def batch_infer_one_round(self, tasks: Sequence[InferTask]) -> list[int]:
        """One round for a batch: prefill tasks without a cache, decode the rest, all in one forward; the
        next token of each task is appended to it and returned."""
        return batch_infer_one_round(self.model, tasks)

    def __repr__(self) -> str:
        c = self.config
        return (f"Qwen3ForCausalLM({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"dtype={self.dtype}, device={self.device})")
