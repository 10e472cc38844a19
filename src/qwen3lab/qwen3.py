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
ndev > 1 runs tensor parallel (models/tp.py, models/tp_run.py): ndev local ranks
spawned here, or the world torchrun launched; `.model` is then the rank-0 TPModel
(close() stops the ranks). Every argument is checked here, at
the boundary, with an InputError naming it: paths str / os.PathLike, prompts a str or integer ids (bytes is
neither), step counts integers >= 1, stream a callable, a batch of distinct InferTasks (one task twice would
feed its cache twice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .checks import check_int, shorten
from .config import Qwen3Config
from .dist.group import launched
from .engine.generate import GenerateResult, generate, stop_string_list
from .engine.runner import batch_infer_one_round, check_ids, check_prompt
from .engine.sampler import SamplingParams
from .engine.task import InferTask, is_id, token_id_list
from .errors import InputError
from .fast import optimize
from .models.torch_model import Qwen3LMHeadModel
from .models.tp_run import TPModel, join_launched, start_local
from .paths import check_path, resolve_model_path
from .runspec import RunSpec
from .tokenizer import Tokenizer
from .weights import load_weights


def _speed_up(model: Qwen3LMHeadModel, spec: RunSpec) -> Qwen3LMHeadModel:
    """qwen3lab.fast (fused projections, kernels, quantised weights) when the spec runs the fast path."""
    if spec.fast:

        optimize(model, quant=spec.quant, group_size=spec.group_size)
    return model


def _tensor_parallel(path, spec: RunSpec):
    """ndev ranks: spawned here (rank 0 is this process), or the world torchrun launched (ranks > 0 follow
    rank 0 inside this call and then exit the process). models/tp_run.py."""
    start = join_launched if launched() else start_local
    return start(path, spec.ndev, device=spec.device, dtype=spec.torch_dtype)


def _spec(device, dtype, quant, fast: bool, ndev: int = 1, group_size: int | None = None) -> RunSpec:
    if not isinstance(fast, bool):
        raise InputError(f"fast must be True or False, got {shorten(fast)} ({type(fast).__name__})")
    # fast=True means the fast path wherever it exists (the CPU); quantised weights need it (runspec.py)
    return RunSpec.make(device, dtype, quant, fast=None if fast else False, ndev=ndev, group_size=group_size)


class Qwen3ForCausalLM:
    """Our torch model + tokenizer + engine. `.model` is the nn.Module (Qwen3LMHeadModel)."""

    def __init__(self, model: Qwen3LMHeadModel, tokenizer=None):

        if not isinstance(model, (Qwen3LMHeadModel, TPModel)):
            raise InputError(f"model must be a Qwen3LMHeadModel (qwen3lab.models.torch_model), got "
                             f"{type(model).__name__} {shorten(model)}; load a checkpoint with from_pretrained")
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise InputError(f"tokenizer must be a qwen3lab Tokenizer or None, got {type(tokenizer).__name__} "
                             f"{shorten(tokenizer)}")
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

        if spec is not None and not isinstance(spec, RunSpec):
            raise InputError(f"spec must be a RunSpec or None, got {type(spec).__name__} {shorten(spec)}")
        if path is not None:  # None: the default model; a wrong type is named as `path` before the spec's errors
            check_path(path)
        spec = spec or _spec(device, dtype, quant, fast, ndev, group_size)
        path = resolve_model_path(path)
        if spec.ndev > 1:
            return cls(_tensor_parallel(path, spec), Tokenizer.from_dir(path))
        cfg = Qwen3Config.from_file(path)
        weights = load_weights(path, cfg, dtype=spec.torch_dtype, device=spec.device, release_pages=spec.fast)
        model = Qwen3LMHeadModel.from_weights(cfg, weights, device=spec.device, dtype=spec.torch_dtype)
        del weights
        return cls(_speed_up(model, spec), Tokenizer.from_dir(path))

    @classmethod
    def from_weights(cls, cfg: Qwen3Config, weights, tokenizer=None, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "float32", quant: str | None = None,
                     fast: bool = True, group_size: int | None = None) -> Qwen3ForCausalLM:
        """From a {hf_name: tensor} dict (e.g. random_init.random_weights) instead of a directory."""
        if not isinstance(cfg, Qwen3Config):
            raise InputError(f"cfg must be a Qwen3Config, got {type(cfg).__name__} {shorten(cfg)}")
        if not isinstance(weights, Mapping):
            raise InputError(f"weights must be a dict {{hf_name: tensor}}, got {type(weights).__name__} "
                             f"{shorten(weights)}")
        spec = _spec(device, dtype, quant, fast, group_size=group_size)
        model = Qwen3LMHeadModel.from_weights(cfg, weights, device=spec.device, dtype=spec.torch_dtype)
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
        """Token ids of a prompt: a str is tokenized as is (no chat template); ids (a sequence of ints, a 1-D
        numpy array or tensor) are passed through. bytes is refused: is it text or ids? Say which."""
        if isinstance(prompt_or_ids, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer and this model has none; pass token ids")
            return self.tokenizer.encode(prompt_or_ids)
        return token_id_list(prompt_or_ids, "prompt")

    def _stops(self, stop) -> tuple[list[int], list[str]]:
        """eos ids + the stop ids given, and the stop strings given; a stop id must be in the vocabulary
        (one past it could never be generated)."""
        if stop is None:
            items = []
        elif isinstance(stop, str) or is_id(stop):
            items = [stop]
        elif isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
            raise InputError(f"stop must be token ids (int) and/or strings, got {type(stop).__name__} "
                             f"{shorten(stop)}")
        else:
            items = list(stop)
        bad = [s for s in items if not (is_id(s) or isinstance(s, str))]
        if bad:
            raise InputError(f"stop must be token ids (int) and/or strings, got {shorten(bad[0])}")
        ids = [int(s) for s in items if is_id(s)]
        check_ids(ids, self.config, "stop")
        return self.eos_token_ids + ids, stop_string_list([s for s in items if isinstance(s, str)])

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
        if max_new_tokens is not None:
            max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
        ids, strs = self._stops(stop)
        if strs:
            raise InputError("InferTask stops on token ids only; stop strings are handled by generate()")
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        prompt = self.encode(prompt_or_ids)
        check_prompt(prompt, self.config)  # now, not at the first round: the caller still knows which prompt
        return InferTask(prompt, sampling, stop_ids=frozenset(ids), max_new_tokens=max_new_tokens)

    def batch_infer_one_round(self, tasks: Sequence[InferTask]) -> list[int]:
        """One round for a batch: prefill tasks without a cache, decode the rest, all in one forward; the
        next token of each task is appended to it and returned. Each task may appear once; every task is
        checked before anything runs."""
        return batch_infer_one_round(self.model, tasks)

    def __repr__(self) -> str:
        c = self.config
        return (f"Qwen3ForCausalLM({c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"dtype={self.dtype}, device={self.device})")
