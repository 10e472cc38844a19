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
from .errors import InputError, Qwen3LabError
from .models.torch_model import Qwen3CausalLM, dtype_and_quant


class MultiDeviceError(Qwen3LabError, NotImplementedError):
    """ndev > 1: tensor parallelism is not implemented."""


def _check_device(device: str | torch.device, ndev: int) -> torch.device:
    if isinstance(ndev, bool) or not isinstance(ndev, int) or ndev < 1:
        raise InputError(f"ndev must be an integer >= 1, got {ndev!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"invalid device {device!r}: {e}") from None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and n_cuda == 0:
        raise InputError(f"device {device!r} asked for, but no CUDA device is available (torch {torch.__version__})")
    if ndev > 1:
        if n_cuda < ndev:
            raise MultiDeviceError(f"ndev={ndev} needs {ndev} CUDA devices; this machine has {n_cuda}. Use ndev=1.")
        raise MultiDeviceError(f"ndev={ndev}: tensor parallelism across devices is not implemented yet; "
                               f"use ndev=1 (one device)")
    return dev


def _speed_up(model: Qwen3CausalLM, fast: bool, quant: str | None) -> Qwen3CausalLM:
    """qwen3lab.fast on CPU when asked; quantisation needs it (its kernels are CPU ones)."""
    if quant is not None and (not fast or model.device.type != "cpu"):
        raise InputError(f"quant={quant!r} needs fast=True on a CPU device (got fast={fast}, device {model.device})")
    if fast and model.device.type == "cpu":
        from .fast import optimize

        optimize(model, quant=quant)
    return model


class Qwen3ForCausalLM:
    """Our torch model + tokenizer + engine. `.model` is the nn.Module (Qwen3CausalLM)."""

    def __init__(self, model: Qwen3CausalLM, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "bfloat16", ndev: int = 1, quant: str | None = None,
                        fast: bool = True) -> Qwen3ForCausalLM:
        """Load a HF-layout checkpoint dir (config.json, *.safetensors, tokenizer files).

        dtype "int8" means bfloat16 activations with quant="int8" weights. fast (CPU only): fused projections
        and the streaming kernels of qwen3lab.fast; fast=False keeps the plain eager model."""
        from .api import resolve_model_path
        from .tokenizer import Tokenizer
        from .weights import load_weights

        dev = _check_device(device, ndev)
        dt, quant = dtype_and_quant(dtype, quant)
        path = resolve_model_path(path)
        cfg = Qwen3Config.from_file(path)
        weights = load_weights(path, cfg, dtype=dt, device=dev, release_pages=fast and dev.type == "cpu")
        model = Qwen3CausalLM.from_weights(cfg, weights, device=dev, dtype=dt)
        del weights
        return cls(_speed_up(model, fast, quant), Tokenizer.from_dir(path))

    @classmethod
    def from_weights(cls, cfg: Qwen3Config, weights, tokenizer=None, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "float32", quant: str | None = None,
                     fast: bool = True) -> Qwen3ForCausalLM:
        """From a {hf_name: tensor} dict (e.g. random_init.random_weights) instead of a directory."""
        dev = _check_device(device, 1)
        dt, quant = dtype_and_quant(dtype, quant)
        model = Qwen3CausalLM.from_weights(cfg, weights, device=dev, dtype=dt)
        return cls(_speed_up(model, fast, quant), tokenizer)

    @property
    def config(self) -> Qwen3Config:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> str:
        """The activation dtype, or "int8" for int8 weights (bfloat16 activations)."""
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
