"""`qwen3lab bench generate`: end to end on a checkpoint dir, ours vs HF `generate` in the same run.

Notable:
- ours is driven through `Qwen3ForCausalLM.batch_infer_one_round` (what `generate` runs, one packed
  forward per round, batch = several tasks); HF through `model.generate` with a streamer whose `put` marks
  each step. Both make exactly `new_tokens` tokens per sequence (eos ignored: ours' tasks have no stop ids,
  HF gets min_new_tokens), greedy, the same random prompts (token ids, no tokenizer in the timing).
- figures: prefill at batch 1 for each prompt length (TTFT = time to the first token; prefill tok/s =
  prompt tokens / TTFT); decode at each batch (tok/s = batch * (N - 1) / time from the first token to the
  last; latency = median inter-token (per-step) time, p90 too); peak memory of each phase; a `load` record
  with load time and its peak.
- roofline: the machine's bandwidth is measured in the same run (bandwidth.py: at the start and after each
  impl's runs; the fastest probe counts, all are in the JSON) and each decode figure is given as a fraction
  of bandwidth / (weights + KV cache + embedding rows read per step), the KV cache at the mean context of the
  decode (prompt + N/2).
- paired roofline: after each decode's timed runs, one more decode with a bandwidth probe read between every
  two steps (bandwidth.PairedProbe); `roofline_fraction_paired` is the median over its steps of each step's
  fraction of the roofline at the bandwidth read right around it, `paired_read_gbs` the median of those reads.
  It does not depend on which minute the separate probes fell in; llama.cpp's runs cannot be split by step
  and have only the fastest-probe figure.
- ours and HF are loaded one after the other, the first freed before the second, so each peak is its own.
- several dtypes (`--dtype bfloat16,float32,int8`): each in turn, ours then HF, every model freed before the
  next; records carry their dtype, so the ours-vs-HF ratio only ever pairs records of the same dtype.
- int8 / int4 (ours: bfloat16 activations + int8 / int4 weights on the fast CPU path): HF transformers has no
  CPU path for them, so HF is skipped there, with a one-line note; those rows have no ours-vs-HF ratio (read
  them against HF's bfloat16 rows, or llama.cpp's Q8_0 / Q4_0). Their roofline counts the bytes the kernels
  read: int8 1 byte per projection weight plus a float32 scale per row, int4 half a byte plus a float32
  scale per group of 128 (bandwidth.py).
- peer "llama.cpp" (`--peer llama.cpp`): llama.cpp's llama-bench on a GGUF of the same checkpoint, after ours
  and HF for each dtype (llama_cpp.py); skipped with one line when llama.cpp is not built (`make peer`).
- ours runs the fast CPU path (qwen3lab.fast) unless fast=False (`--no-fast`): the plain eager model, so the
  fast path's gain can be measured (run both, or `--compare` one report with the other).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import Qwen3Config
from ..engine.sampler import SamplingParams
from ..engine.task import InferTask
from ..errors import InputError
from ..fast import describe
from ..paths import resolve_model_path
from ..qwen3 import Qwen3ForCausalLM
from . import llama_cpp
from .bandwidth import PairedProbe, measure_bandwidth, paired_fraction, roofline_tok_per_s, step_bytes
from .choices import GENERATE_DTYPES
from .memory import PeakMemory, rss_bytes
from .modules import require_transformers
from .report import make_record
from .settings import check_counts, resolve_dtype
from .timing import Progress, clock, median, percentile, run_timed

DEFAULT_PROMPT_LENS = (128, 512)
DEFAULT_BATCHES = (1, 8)
DEFAULT_NEW_TOKENS = 64
DEFAULT_WARMUPS, DEFAULT_RUNS = 1, 3
FIRST_SPECIAL_ID = 151643  # Qwen3's special tokens start here: random prompts stay below it
HF_SKIPPED = {q: f"HF transformers has no CPU {q} path: the {q} rows are ours only, with no ours-vs-HF ratio "
                 f"(read them against HF's bfloat16 rows)" for q in ("int8", "int4")}


def random_prompts(cfg: Qwen3Config, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + length)
    hi = min(cfg.vocab_size, FIRST_SPECIAL_ID)
    return torch.randint(0, hi, (batch, length), generator=g).tolist()


# ---- ours ------------------------------------------------------------------------------------------
class OursGenerate:
    impl = "qwen3lab"

    def __init__(self, path: Path, device: torch.device, dtype: str, fast: bool = True, ndev: int = 1):

        # dtype "int8" / "int4": bfloat16 activations + those weights (fast path); fast=False: plain eager;
        # ndev > 1: tensor parallel (eager parallel leaves), weight_bytes then rank 0's share
        self.lm = Qwen3ForCausalLM.from_pretrained(path, device=device, dtype=dtype, fast=fast and ndev == 1,
                                                   ndev=ndev)
        self.ndev = ndev
        self.cfg = self.lm.config

    def weight_bytes(self) -> int:
        seen, n = set(), 0
        for p in getattr(self.lm.model, "local", self.lm.model).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        return n

    def generate(self, prompts: list[list[int]], new_tokens: int, mark) -> list[list[int]]:

        # no stop ids: every run makes exactly new_tokens tokens, whatever a random model samples
        tasks = [InferTask(list(p), SamplingParams(), stop_ids=frozenset(), max_new_tokens=new_tokens)
                 for p in prompts]
        live = tasks
        while live:
            self.lm.batch_infer_one_round(live)
            mark()
            live = [t for t in live if not t.finished]
        return [t.generated for t in tasks]

    def rank_stats(self) -> list[dict]:
        """ndev > 1: per rank peak RSS and time in collectives (models/tp_run.py); [] for one rank."""
        return self.lm.model.rank_stats() if self.ndev > 1 else []

    def close(self) -> None:
        if self.ndev > 1:
            self.lm.model.close()
        del self.lm


# ---- HF --------------------------------------------------------------------------------------------
class _StepMarks:
    """A transformers streamer: generate calls put() with the prompt, then once per generated step."""

    def __init__(self, mark):
        self.mark, self.calls = mark, 0

    def put(self, value) -> None:
        if self.calls:
            self.mark()
        self.calls += 1

    def end(self) -> None:
        pass


class HFGenerate:
    impl = "hf"

    def __init__(self, path: Path, device: torch.device, dtype: str, attn_impl: str = "sdpa"):

        require_transformers()
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # stderr stays for our own progress bars
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype), attn_implementation=attn_impl).to(device).eval()
        self.device = device
        self.cfg = Qwen3Config.from_file(path)

    def weight_bytes(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        return n

    def generate(self, prompts: list[list[int]], new_tokens: int, mark) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # [B, L], equal lengths: no padding
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, pad_token_id=self.cfg.eos_token_ids[0] if self.cfg.eos_token_ids else 0,
            streamer=_StepMarks(mark), temperature=None, top_p=None, top_k=None)
        return out[:, ids.shape[1]:].tolist()

    def close(self) -> None:
        del self.model


# ---- the bench -------------------------------------------------------------------------------------
def _fill_rooflines(records: list[dict], cfg: Qwen3Config, bandwidth_gbs: float) -> None:
    """Each decode record's roofline: the tok/s its decode of `new_tokens` after `prompt_len` at its batch could
    reach at `bandwidth_gbs`, the KV cache counted at the decode's mean context; the same for every impl."""
    for r in records:
        if r["phase"] == "decode" and r.get("tok_per_s"):
            roof = roofline_tok_per_s(cfg, r["dtype"], bandwidth_gbs,
                                      context=r["prompt_len"] + r["new_tokens"] // 2, batch=r["batch"])
            r.update(roofline_tok_per_s=roof, roofline_fraction=r["tok_per_s"] / roof)


def _paired_decode(impl, cfg: Qwen3Config, device, dtype: str, prompts, new_tokens: int) -> dict[str, float]:
    """One more decode of `prompts` with a bandwidth probe read after every step (bandwidth.PairedProbe): each
    step's roofline fraction at the bandwidth read just before and just after it, the median over the steps
    (bandwidth.paired_fraction). The probe's buffer is freed before the next phase's memory is measured."""
    probe = PairedProbe(device)
    ends: list[float] = []
    starts: list[float] = []
    reads: list[float] = []

    def mark() -> None:
        ends.append(clock(device))
        reads.append(probe.read_seconds())
        starts.append(clock(device))

    try:
        with torch.inference_mode():
            impl.generate(prompts, new_tokens, mark)
    finally:
        probe.close()
    assert len(ends) == new_tokens, (len(ends), new_tokens)
    # mark 0 follows the prefill; decode step i (1..N-1) runs from the end of read i-1 to mark i, over the
    # prompt plus the i tokens made so far
    L, B = len(prompts[0]), len(prompts)
    step_s = [ends[i] - starts[i - 1] for i in range(1, new_tokens)]
    nbytes = [step_bytes(cfg, dtype, context=L + i, batch=B) for i in range(1, new_tokens)]
    fraction, gbs = paired_fraction(step_s, reads, nbytes, probe.nbytes)
    return {"roofline_fraction_paired": fraction, "paired_read_gbs": round(gbs, 2)}


def _bench_impl(impl, cfg: Qwen3Config, device, dtype: str, prompt_lens, batches, new_tokens: int,
                decode_prompt_len: int, warmups: int, runs: int, seed: int, progress,
                paired: bool = False) -> tuple[list[dict], list[list[int]] | None]:
    recs: list[dict] = []
    greedy_tokens = None

    def timed(prompts, n, label):
        samples_tokens: list = []

        def fn(mark):
            samples_tokens.append(impl.generate(prompts, n, mark))

        with PeakMemory(device) as pm:
            samples = run_timed(fn, device, warmups, runs, progress=progress, label=label)
        for s in samples:
            assert len(s.marks) == n, (label, len(s.marks), n)  # one mark per generated step
        return samples, pm.peak_bytes, samples_tokens[-1]

    for L in prompt_lens:
        samples, peak, _ = timed(random_prompts(cfg, 1, L, seed), 1, f"{impl.impl} prefill {L}")
        ttft = [s.marks[0] for s in samples]
        med = median(ttft)
        recs.append(make_record("generate", impl.impl, "prefill", f"prompt={L} batch=1", device, dtype,
                                  ttft_ms=1e3 * med, tok_per_s=L / med, latency_p90_ms=1e3 * percentile(ttft, 90),
                                  peak_mem_bytes=peak, prompt_len=L, batch=1))
    for B in batches:
        prompts = random_prompts(cfg, B, decode_prompt_len, seed)
        samples, peak, toks = timed(prompts, new_tokens, f"{impl.impl} decode batch {B}")
        if B == 1:
            greedy_tokens = toks
        rates, itl = [], []
        for s in samples:
            rates.append(B * (new_tokens - 1) / (s.marks[-1] - s.marks[0]))
            itl += [b - a for a, b in zip(s.marks[:-1], s.marks[1:], strict=True)]
        rate = median(rates)
        pair = _paired_decode(impl, cfg, device, dtype, prompts, new_tokens) if paired else {}
        recs.append(make_record(
            "generate", impl.impl, "decode", f"batch={B} prompt={decode_prompt_len} new={new_tokens}", device, dtype,
            tok_per_s=rate, latency_ms=1e3 * median(itl), latency_p90_ms=1e3 * percentile(itl, 90),
            ttft_ms=1e3 * median([s.marks[0] for s in samples]), roofline_fraction=None,
            roofline_tok_per_s=None, peak_mem_bytes=peak, prompt_len=decode_prompt_len, batch=B,
            new_tokens=new_tokens, **pair))
    return recs, greedy_tokens


def _checked(path, dtype, warmups: int, runs: int, new_tokens: int, prompt_lens, decode_prompt_len: int | None,
             peer: str | None) -> tuple[list[str], Path, Qwen3Config, int]:
    """(dtypes, checkpoint dir, its config, decode prompt length), every option checked before a load."""
    dtypes = [dtype] if isinstance(dtype, str) else list(dtype)
    for dt in dtypes:
        if dt not in GENERATE_DTYPES:
            raise InputError(f"--dtype {dt!r}: not one of {', '.join(GENERATE_DTYPES)}")
    if not dtypes:
        raise InputError("--dtype: no dtype given")
    check_counts(warmups, runs)
    if new_tokens < 2:
        raise InputError(f"--new-tokens must be >= 2 (decode rate needs two tokens), got {new_tokens}")
    path = resolve_model_path(path)
    cfg = Qwen3Config.from_file(path)
    decode_prompt_len = decode_prompt_len or prompt_lens[0]
    longest = max(max(prompt_lens), decode_prompt_len + new_tokens)
    if longest > cfg.max_position_embeddings:
        raise InputError(f"{longest} positions exceed the model's context {cfg.max_position_embeddings}")
    if peer not in (None, "llama.cpp"):
        raise InputError(f"--peer {peer!r}: the one peer is llama.cpp")
    return dtypes, path, cfg, decode_prompt_len


def _load_and_bench(name: str, make: Callable, device, dt: str, fast: bool, bench_args: tuple):
    """Load one impl (timed, peak memory), bench it; (records, greedy tokens, weight bytes, kernels or None,
    per-rank stats of a tensor-parallel run or [])."""
    gc.collect()
    with PeakMemory(device) as pm:
        t0 = clock(device)
        impl = make()
        load_s = clock(device) - t0
    wb = impl.weight_bytes()
    kernels = describe(impl.lm.model) if name == "qwen3lab" and fast and device.type == "cpu" else None
    records = [make_record("generate", name, "load", "from_pretrained", device, dt, latency_ms=1e3 * load_s,
                           peak_mem_bytes=pm.peak_bytes, weight_bytes=wb, peak_growth_x_weights=pm.growth_over(wb))]
    recs, toks = _bench_impl(impl, *bench_args)
    ranks = impl.rank_stats() if name == "qwen3lab" else []
    impl.close()
    del impl
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records + recs, toks, wb, kernels, ranks


def _peer(path: Path, cfg: Qwen3Config, device, dt: str, prompt_lens, batches, new_tokens: int,
          decode_prompt_len: int, runs: int, log, notes: list[str]):
    """llama.cpp's records for one dtype, and its settings; [] and a note when the peer itself fails: ours and
    HF's figures stand."""
    try:
        recs, info = llama_cpp.run(path, device, dt, prompt_lens, batches, new_tokens, decode_prompt_len, runs, log)
    except InputError as e:
        log(f"note: {e}")
        notes.append(str(e))
        return [], None
    return recs, info


def _agreement(greedy: dict[str, Any]) -> str | None:
    """'same/compared' leading greedy tokens of ours and HF (information, not a check: random weights make
    near-ties, and bf16 rounding may break them differently)."""
    if not (greedy.get("qwen3lab") and greedy.get("hf")):
        return None
    a, b = greedy["qwen3lab"][0], greedy["hf"][0]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{same}/{min(len(a), len(b))}"


def run(path: str | Path | None, device: torch.device, dtype: str | Sequence[str], warmups: int = DEFAULT_WARMUPS,
        runs: int = DEFAULT_RUNS, prompt_lens=DEFAULT_PROMPT_LENS, batches=DEFAULT_BATCHES,
        new_tokens: int = DEFAULT_NEW_TOKENS, decode_prompt_len: int | None = None, hf: bool = True,
        hf_attn: str = "sdpa", seed: int = 0, roofline: bool = True, progress: Progress | None = None,
        fast: bool = True, log: Callable[[str], None] | None = None,
        peer: str | None = None, ndev: int = 1) -> tuple[list[dict], dict[str, Any]]:
    """Records for each dtype in `dtype` (one name or a sequence), ours (fast path unless fast=False) then
    HF (then the peer). Settings keyed by dtype: weight_bytes, greedy_agreement_tokens.

    The bandwidth is probed at the start and again after each impl's runs, and the roofline of every decode
    record is taken at the fastest probe: this VM's memory bandwidth moves by up to 1.7x between minutes, and
    one probe in a slow minute put a decode that ran in a fast one at 105 % of its roofline."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    dtypes, path, cfg, decode_prompt_len = _checked(path, dtype, warmups, runs, new_tokens, prompt_lens,
                                                    decode_prompt_len, peer)
    notes: list[str] = []
    peer_skip = llama_cpp.missing() if peer is not None else None
    if peer_skip:
        log(f"note: peer skipped: {peer_skip}")
        notes.append(f"peer skipped: {peer_skip}")
    peer_info: dict[str, Any] = {}
    probes = [measure_bandwidth(device)] if roofline else []

    def probe() -> None:
        if probes:
            probes.append(measure_bandwidth(device, repeats=5))

    records: list[dict] = []
    weight_bytes: dict[str, dict[str, int]] = {}
    agreement: dict[str, str] = {}
    kernels: dict[str, dict[str, str]] = {}
    tp_ranks: dict[str, list[dict]] = {}
    for dt in dtypes:
        makers: list[tuple[str, Callable]] = [("qwen3lab", lambda dt=dt: OursGenerate(path, device, dt, fast, ndev))]
        if hf and dt in HF_SKIPPED:
            log(f"note: {HF_SKIPPED[dt]}")
            notes.append(HF_SKIPPED[dt])
        elif hf:
            makers.append(("hf", lambda dt=dt: HFGenerate(path, device, dt, hf_attn)))
        greedy: dict[str, Any] = {}
        weight_bytes[dt] = {}
        bench_args = (cfg, device, dt, prompt_lens, batches, new_tokens, decode_prompt_len, warmups, runs, seed,
                      progress, roofline)
        for name, make in makers:
            recs, greedy[name], weight_bytes[dt][name], k, ranks = _load_and_bench(name, make, device, dt, fast,
                                                                                   bench_args)
            records += recs
            probe()
            if k is not None:
                kernels[dt] = k
            if ranks:
                tp_ranks[dt] = _tp_note(ranks, log)
        if peer is not None and not peer_skip:
            recs, info = _peer(path, cfg, device, dt, prompt_lens, batches, new_tokens, decode_prompt_len, runs,
                               log, notes)
            records += recs
            probe()
            if info is not None:
                peer_info[dt] = info
        if _agreement(greedy):
            agreement[dt] = _agreement(greedy)
    bw = max(probes, key=lambda b: b.read_gbs) if probes else None
    if bw:
        _fill_rooflines(records, cfg, bw.read_gbs)
    extra: dict[str, Any] = {
        "model": str(path), "model_type": cfg.model_type, "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size, "prompt_lens": list(prompt_lens), "batches": list(batches),
        "new_tokens": new_tokens, "decode_prompt_len": decode_prompt_len, "weight_bytes": weight_bytes,
        "bandwidth": {**bw.as_dict(), "probes_read_gbs": [round(b.read_gbs, 2) for b in probes]} if bw else None,
        "hf_attn_implementation": hf_attn if hf else None,
        "baseline_rss_bytes": rss_bytes(),
    }
    for key, value in (("greedy_agreement_tokens", agreement), ("kernels", kernels), ("notes", notes),
                       ("tp_ranks", tp_ranks)):
        if value:
            extra[key] = value
    if peer_info:
        extra["peer"] = {"llama.cpp": peer_info}
    return records, extra


def _tp_note(stats: list[dict], log) -> list[dict]:
    """One log line per rank: peak RSS and the time its collectives took over the whole bench."""
    for s in stats:
        log(f"rank {s['rank']}: peak RSS {s['peak_rss'] / 2**20:.0f} MiB, collectives {s['collective_s']:.3f} s "
            f"in {s['collective_calls']} calls ({s['collective_bytes'] / 2**20:.1f} MiB)")
    return stats
