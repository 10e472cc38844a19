"""`--text FILE`: teacher-forced output quality over a text, llama.cpp `--kl-divergence` style.

A quantised port is judged by what it predicts, not only by tensor error. Both sides run over the whole text
once (teacher forcing: position t sees the true tokens 0..t); at each position, from the two next-token
distributions: KL(reference || candidate) (mean, p99, max), whether the top-1 tokens agree, the overlap of the
top-k sets, and the perplexity of the text's actual next tokens under each (ratio candidate / reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Qwen3Config
from ..errors import InputError
from .inputs import parse_options
from .side import resolve

TOP_K = 10


@dataclass
class TextQuality:
    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    topk_overlap: float
    ppl_reference: float
    ppl_candidate: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_candidate / self.ppl_reference

    def lines(self) -> list[str]:
        return [f"text quality over {self.positions} positions (teacher-forced, candidate vs reference):",
                f"  KL divergence mean {self.kl_mean:.3g}, p99 {self.kl_p99:.3g}, max {self.kl_max:.3g}",
                f"  top-1 agreement {self.top1_agreement:.1%}, top-{TOP_K} overlap {self.topk_overlap:.1%}",
                f"  perplexity {self.ppl_candidate:.4g} vs {self.ppl_reference:.4g} (ratio {self.ppl_ratio:.4f})"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def text_quality(ref_logits: np.ndarray, cand_logits: np.ndarray, ids) -> TextQuality:
    """ref/cand logits [T, V] over token ids [T]: the figures of the module docstring over T - 1 positions."""
    ids = np.asarray(ids, dtype=np.int64)
    if ref_logits.shape != cand_logits.shape or ref_logits.shape[0] != ids.shape[0] or ids.shape[0] < 2:
        raise InputError(f"--text: logits {ref_logits.shape} / {cand_logits.shape} for {ids.shape[0]} tokens "
                         f"(need the same [T, V] on both sides and T >= 2)")
    lp, lq = _log_softmax(ref_logits[:-1]), _log_softmax(cand_logits[:-1])  # [T-1, V] predicting ids[1:]
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # [T-1]
    top1 = lp.argmax(-1) == lq.argmax(-1)
    k = min(TOP_K, lp.shape[-1])
    tp, tq = np.argsort(-lp, axis=-1)[:, :k], np.argsort(-lq, axis=-1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tp, tq, strict=True)])
    nxt = ids[1:, None]
    nll_p, nll_q = -np.take_along_axis(lp, nxt, -1).mean(), -np.take_along_axis(lq, nxt, -1).mean()
    return TextQuality(positions=int(kl.shape[0]), kl_mean=float(kl.mean()), kl_p99=float(np.quantile(kl, 0.99)),
                       kl_max=float(kl.max()), top1_agreement=float(top1.mean()), topk_overlap=float(overlap),
                       ppl_reference=float(np.exp(nll_p)), ppl_candidate=float(np.exp(nll_q)))


def run_text(path, reference, candidate, model_path, device="cpu", dtype=None, candidate_opts=None) -> TextQuality:
    """Both sides over the text in `path` (tokenized with the model's tokenizer), logits only."""
    from ..tokenizer import Tokenizer  # here, as runner does: the tokenizers library only when text is given

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--text {path}: cannot read it as text ({e})") from None
    if model_path is None:
        raise InputError("--text needs --model-path (its tokenizer and weights)")
    cfg = Qwen3Config.from_file(model_path)
    ids = Tokenizer.from_dir(model_path).encode(text)
    ref = resolve(reference, model_path, cfg, dtype="float64", role="reference")
    cand = resolve(candidate, model_path, cfg, device=device, dtype=dtype, role="candidate",
                   options=parse_options(candidate_opts))
    arr = np.asarray(ids, dtype=np.int64)
    return text_quality(np.asarray(ref.run(arr, ["logits"]).logits), np.asarray(cand.run(arr, ["logits"]).logits), ids)
