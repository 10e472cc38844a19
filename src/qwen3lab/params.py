"""Parameter and memory accounting for a Qwen3 / Qwen3-MoE config (`qwen3lab params`).

Notable:
- Counts come from shapes.expected_shapes(cfg), the one place tensor names and shapes live, summed by
  part; nothing here re-derives a shape.
- Conventions that reproduce the model cards: a tied lm_head is the embedding and is counted once (lm_head
  0); "non-embedding" leaves out the embedding and an untied lm_head; "activated" (MoE) counts the
  embedding, lm_head, all attention and norms, every router and the top-k experts of each MoE layer (dense
  layers of a MoE model count fully). The cards round totals to nearest but truncate 30B-A3B's activated
  3.35B to "3.3B".
- Memory figures are estimates with their assumptions spelled out (memory_report's docstring and the
  `assumptions` list of its result); exact byte counts, no allocator overheads.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Qwen3Config
from .errors import ConfigError
from .memory_estimate import memory_report
from .presets import preset_config
from .shapes import expected_shapes

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass
class LayerParams:
    index: int
    moe: bool
    attention: int  # q/k/v/o projections (+ biases) and the per-head q_norm / k_norm
    mlp: int  # dense MLP gate/up/down (0 in a MoE layer)
    router: int  # MoE router `mlp.gate` (0 in a dense layer)
    experts: int  # all experts of the layer
    expert_each: int  # one expert (0 in a dense layer)
    experts_active: int  # the top-k experts a token runs through
    norms: int  # input_layernorm + post_attention_layernorm

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.router + self.experts + self.norms

    @property
    def activated(self) -> int:
        return self.attention + self.mlp + self.router + self.experts_active + self.norms


@dataclass
class ParamReport:
    source: str
    model_type: str
    tied: bool
    embedding: int
    layers: list[LayerParams]
    final_norm: int
    lm_head: int  # 0 when tied: the lm_head is the embedding
    total: int = 0
    non_embedding: int = 0
    activated: int | None = None  # None for a dense model
    by_part: dict[str, int] = field(default_factory=dict)


def _part(name: str) -> tuple[int | None, str]:
    """(layer index or None, part) of a checkpoint tensor name."""
    if name == "model.embed_tokens.weight":
        return None, "embedding"
    if name == "lm_head.weight":
        return None, "lm_head"
    if name == "model.norm.weight":
        return None, "final_norm"
    m = _LAYER.fullmatch(name)
    assert m, f"unclassified tensor {name}"
    i, rest = int(m.group(1)), m.group(2)
    if rest.startswith("self_attn."):
        return i, "attention"
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return i, "norms"
    if rest == "mlp.gate.weight":
        return i, "router"
    if rest.startswith("mlp.experts."):
        return i, "experts"
    if rest.startswith("mlp."):
        return i, "mlp"
    raise AssertionError(f"unclassified tensor {name}")


def count_params(cfg: Qwen3Config) -> ParamReport:
    """Parameters of `cfg` by part, summed from expected_shapes(cfg)."""
    top = {"embedding": 0, "lm_head": 0, "final_norm": 0}
    per_layer = [{"attention": 0, "norms": 0, "router": 0, "experts": 0, "mlp": 0}
                 for _ in range(cfg.num_hidden_layers)]
    per_expert: list[dict[int, int]] = [{} for _ in range(cfg.num_hidden_layers)]
    for name, shape in expected_shapes(cfg).items():
        n = math.prod(shape)
        i, part = _part(name)
        if i is None:
            top[part] += n
            continue
        per_layer[i][part] += n
        if part == "experts":
            e = int(name.split(".mlp.experts.")[1].split(".")[0])
            per_expert[i][e] = per_expert[i].get(e, 0) + n

    layers = []
    for i, d in enumerate(per_layer):
        sizes = set(per_expert[i].values())
        assert len(sizes) <= 1, f"layer {i}: experts of different sizes {sizes}"
        each = sizes.pop() if sizes else 0
        moe = cfg.is_moe_layer(i)
        assert moe == bool(each), f"layer {i}: MoE layer without experts (or the reverse)"
        k = cfg.num_experts_per_tok if moe else 0
        layers.append(LayerParams(index=i, moe=moe, attention=d["attention"], mlp=d["mlp"], router=d["router"],
                                  experts=d["experts"], expert_each=each, experts_active=k * each,
                                  norms=d["norms"]))

    by_part = {
        "embedding": top["embedding"],
        "attention": sum(L.attention for L in layers),
        "mlp": sum(L.mlp for L in layers),
        "router": sum(L.router for L in layers),
        "experts": sum(L.experts for L in layers),
        "layer_norms": sum(L.norms for L in layers),
        "final_norm": top["final_norm"],
        "lm_head": top["lm_head"],
    }
    total = sum(by_part.values())
    activated = None
    if cfg.is_moe:
        activated = top["embedding"] + top["lm_head"] + top["final_norm"] + sum(L.activated for L in layers)
    return ParamReport(
        source=cfg.source, model_type=cfg.model_type, tied=cfg.tie_word_embeddings,
        embedding=top["embedding"], layers=layers, final_norm=top["final_norm"], lm_head=top["lm_head"],
        total=total, non_embedding=total - top["embedding"] - top["lm_head"], activated=activated,
        by_part=by_part,
    )


# ---- sources ------------------------------------------------------------------------------------------

def params_from_args(model: str | Path | None = None, config: str | Path | None = None,
                     preset: str | None = None) -> Qwen3Config:
    """The config named by exactly one of --model DIR, --config FILE, --preset NAME."""
    given = [(flag, v) for flag, v in (("--model", model), ("--config", config), ("--preset", preset))
             if v is not None]
    if not given:
        raise ConfigError("no model given: pass one of --model DIR, --config FILE, --preset NAME")
    if len(given) > 1:
        raise ConfigError(f"give only one of --model, --config, --preset (got {', '.join(f for f, _ in given)})")
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise ConfigError(f"--model {path}: not a directory (a checkpoint dir holding config.json; "
                              f"use --config for a file)")
        return Qwen3Config.from_file(path / "config.json")
    if config is not None:
        return Qwen3Config.from_file(config)
    return preset_config(preset)


# ---- output ------------------------------------------------------------------------------------------

def fmt_count(n: int) -> str:
    """440467456 -> '440.5M', 30532122624 -> '30.53B'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}B" if suffix == "B" else f"{n / div:.1f}{suffix}"
    return str(n)


def fmt_bytes(n: int) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _layer_groups(layers: list[LayerParams]) -> list[tuple[int, int, LayerParams]]:
    """Runs of consecutive layers with identical counts: (first, last, representative)."""
    groups: list[tuple[int, int, LayerParams]] = []

    def key(L: LayerParams) -> tuple:
        return (L.moe, L.attention, L.mlp, L.router, L.experts, L.norms)

    for L in layers:
        if groups and key(groups[-1][2]) == key(L) and groups[-1][1] == L.index - 1:
            groups[-1] = (groups[-1][0], L.index, groups[-1][2])
        else:
            groups.append((L.index, L.index, L))
    return groups


def params_json(report: ParamReport, memory: dict[str, Any]) -> dict[str, Any]:
    """One JSON-ready object: total, non_embedding, embedding, lm_head, activated (None for dense),
    by_part, per-layer counts and the memory figures."""
    return {
        "source": report.source,
        "model_type": report.model_type,
        "tie_word_embeddings": report.tied,
        "total": report.total,
        "non_embedding": report.non_embedding,
        "embedding": report.embedding,
        "lm_head": report.lm_head,
        "activated": report.activated,
        "by_part": dict(report.by_part),
        "layers": [{**asdict(L), "total": L.total} for L in report.layers],
        "memory": memory,
    }


def render_params(report: ParamReport, memory: dict[str, Any], console) -> None:
    """Print the parameter and memory tables (rich)."""
    from rich.table import Table

    t = Table(title=f"Parameters — {report.source}", title_justify="left")
    for name in ("part", "per layer", "layers", "count", "exact", "share"):
        t.add_column(name, justify="left" if name == "part" else "right")

    def row(label: str, n: int, per_layer: int | None = None, nl: int | None = None, style: str = "") -> None:
        t.add_row(f"{style}{label}", "" if per_layer is None else fmt_count(per_layer), "" if nl is None else str(nl),
                  f"{style}{fmt_count(n)}", f"{n:,}", f"{100 * n / report.total:.1f}%")

    row("embedding", report.embedding)
    for first, last, L in _layer_groups(report.layers):
        nl = last - first + 1
        span = f"layer {first}" if nl == 1 else f"layers {first}–{last}"
        parts = [("attention (q/k/v/o, q/k norm)", L.attention)]
        if L.moe:
            parts.append(("router", L.router))
            parts.append((f"experts ({L.experts // L.expert_each} × {fmt_count(L.expert_each)})", L.experts))
        else:
            parts.append(("MLP (gate/up/down)", L.mlp))
        parts.append(("norms (input, post-attention)", L.norms))
        for label, n in parts:
            row(f"{span} {label}", n * nl, per_layer=n, nl=nl)
    row("final norm", report.final_norm)
    if report.tied:
        t.add_row("lm_head", "", "", "tied", "= embedding", "")
    else:
        row("lm_head", report.lm_head)
    t.add_section()
    total_txt = f"{report.total / 1e9:.2f}B" if report.total >= 1e8 else fmt_count(report.total)  # cards speak in B
    t.add_row("[bold]total", "", "", f"[bold]{total_txt}", f"{report.total:,}", "100.0%")
    row("non-embedding", report.non_embedding)
    if report.activated is not None:
        row("activated per token", report.activated)
    console.print(t)

    m = Table(title=f"Memory — context {memory['kv_cache']['context']} × batch {memory['kv_cache']['batch']}",
              title_justify="left")
    for name in ("what", "size", "bytes"):
        m.add_column(name, justify="left" if name == "what" else "right")

    def mrow(label: str, n: int, style: str = "") -> None:
        m.add_row(f"{style}{label}", f"{style}{fmt_bytes(n)}", f"{n:,}")

    for dt, n in memory["weights_bytes"].items():
        mrow(f"weights {dt}" + (" ◀" if dt == memory["dtype"] else ""), n)
    kv = memory["kv_cache"]
    m.add_section()
    mrow(f"KV cache per token ({kv['dtype']})", kv["bytes_per_token"])
    mrow(f"KV cache, {kv['context']} tokens × batch {kv['batch']}", kv["bytes"])
    a = memory["activation_peak"]
    m.add_section()
    mrow(f"prefill activation peak, fused attention ({a['dtype']})", a["fused_bytes"])
    mrow("prefill activation peak, eager attention", a["eager_bytes"])
    mrow("  same, last-position logits only (fused)", a["fused_bytes_last_logits"])
    mrow("  same, last-position logits only (eager)", a["eager_bytes_last_logits"])
    for k, v in a["components"].items():
        mrow(f"  {k}", v)
    m.add_section()
    tb = memory["total_bytes"]
    mrow(f"weights {memory['dtype']} + KV + peak (fused)", tb["fused"], style="[bold]")
    mrow(f"weights {memory['dtype']} + KV + peak (eager)", tb["eager"])
    console.print(m)
    for note in memory["assumptions"]:
        console.print(f"[dim]· {note}")
    for note in memory["notes"]:
        console.print(f"[yellow]! {note}")


def run_params_command(model: str | None, config: str | None, preset: str | None, context: int = 4096,
                       batch: int = 1, dtype: str = "bfloat16", as_json: bool = False, console=None
                       ) -> dict[str, Any]:
    """`qwen3lab params`: print the tables (or one JSON line with as_json) and return the JSON object."""
    cfg = params_from_args(model=model, config=config, preset=preset)
    report = count_params(cfg)
    memory = memory_report(cfg, context=context, batch=batch, dtype=dtype)
    obj = params_json(report, memory)
    if as_json:
        out = console.file if console is not None else sys.stdout
        out.write(json.dumps(obj) + "\n")
    else:
        if console is None:
            from rich.console import Console
            console = Console()
        render_params(report, memory, console)
    return obj
