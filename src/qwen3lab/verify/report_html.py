"""The HTML report (`--html FILE`): one self-contained file that opens offline in any browser.

Contents: the verdict; a heatmap of log10 relative error, layers x tap sites (failing cells crossed, the
culprit boxed); the first divergent tap's error by token and by channel (and the culprit's, from the
grafted run, when it is another tap); the full table. Plots are matplotlib figures (Figure API, no
pyplot state) embedded as base64 PNG; styles are inline; no script, font or image is fetched.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..taps import split_name
from .compare import TapResult
from .metrics import per_channel_error, per_token_error
from .report import VerifyReport, fmt, loc_str
from .tolerances import cos_str

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.verdict{padding:10px 14px;border-radius:6px;font-weight:600}
.ok{background:#e6f4ea;color:#1e6b34} .bad{background:#fce8e6;color:#a50e0e}
table{border-collapse:collapse;font-size:12.5px} td,th{padding:3px 8px;border-bottom:1px solid #e3e3e3;
text-align:right;white-space:nowrap} th{background:#f5f5f5;position:sticky;top:0} td.l,th.l{text-align:left}
tr.fail td{background:#fdecea} tr.missing td{color:#999} .meta td{text-align:left;border:none;padding:1px 10px}
.warn{color:#8a5300} img{max-width:100%;height:auto;border:1px solid #eee}
"""


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


def _cell_value(r: TapResult) -> float:
    m = r.metrics
    if m is None:
        return np.nan if r.passed is None else 2.0  # shape mismatch: off the scale
    if r.site == "topk_idx" and m.match_fraction is not None:
        e = 1.0 - m.match_fraction
    else:
        e = m.relative_error
    if not np.isfinite(e):
        return 2.0
    return float(np.log10(max(e, 1e-17)))


def heatmap(rep: VerifyReport) -> Figure | None:
    groups = [g for g in rep.groups() if any(t.passed is not None for t in g.taps)]
    if not groups:
        return None
    sites: list[str] = []
    for g in groups:
        for t in g.taps:
            if t.site not in sites:
                sites.append(t.site)
    grid = np.full((len(groups), len(sites)), np.nan)
    fails, culprit = [], None
    for i, g in enumerate(groups):
        for t in g.taps:
            j = sites.index(t.site)
            grid[i, j] = _cell_value(t)
            if t.passed is False:
                fails.append((i, j, t.origin == "op"))
            if rep.culprit is not None and t.name == rep.culprit.name:
                culprit = (i, j)
    h = max(2.5, 0.32 * len(groups) + 1.6)
    fig = Figure(figsize=(max(7.0, 0.45 * len(sites) + 2.5), h))
    ax = fig.add_subplot()
    cmap = _cmap()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=-16, vmax=0, interpolation="nearest")
    ax.set_xticks(range(len(sites)), labels=sites, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(groups)), labels=[g.layer_name for g in groups], fontsize=8)
    for i, j, own in fails:
        ax.plot(j, i, marker="x", color="red" if own else "black", markersize=8 if own else 5, mew=2 if own else 1.2)
    if culprit is not None:
        ax.add_patch(_box(culprit))
    ax.set_title("log10 relative error per tap (red x: its own op fails, black x: inherited, box: culprit, "
                 "grey: not compared)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 ||cand - ref|| / ||ref||", shrink=0.8)
    return fig


def _cmap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#dddddd")


def _box(ij):
    from matplotlib.patches import Rectangle

    i, j = ij
    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2)


def error_profile(name: str, cand: np.ndarray, ref: np.ndarray, title: str) -> Figure:
    """Relative error per token and max abs error per channel (last axis) of one tap."""
    site = split_name(name)[2]
    token_axis = 1 if site == "probs" else 0
    tok = per_token_error(cand, ref, token_axis)
    ch = per_channel_error(cand, ref)
    fig = Figure(figsize=(11, 3.2))
    a1, a2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    a1.bar(np.arange(tok.size), np.nan_to_num(tok, posinf=np.nanmax(tok[np.isfinite(tok)], initial=1.0) * 10),
           color="#c0392b")
    a1.set_xlabel("token")
    a1.set_ylabel("||cand - ref|| / ||ref|| of the token")
    a1.set_title(f"{name}: error by token", fontsize=9)
    last = "key position" if site == "probs" else ("vocab id" if site == "logits" else "channel")
    a2.plot(np.arange(ch.size), np.nan_to_num(ch, posinf=np.nan), lw=0.8, color="#2c3e50")
    a2.set_xlabel(last + (" (over all heads)" if site in ("q", "k", "v", "q_norm", "k_norm", "q_rot", "k_rot",
                                                            "attn") else ""))
    a2.set_ylabel("max |cand - ref|")
    a2.set_title(f"{name}: max abs error by {last}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def _tap_row(r: TapResult) -> str:
    m = r.metrics
    cls = "fail" if r.passed is False else ("missing" if r.passed is None else "")
    iso = "-"
    if r.isolated is not None:
        iso = fmt(r.isolated.relative_error) + (" ✗" if r.isolated_failed else " ✓")
    cells = [
        ("l", r.name), ("l", r.status), ("l", r.origin or ""),
        ("", "×".join(map(str, r.shape)) if r.shape else "-"),
        ("", f"{m.cosine_similarity:.9f}" if m else "-"), ("", fmt(m.relative_error) if m else "-"),
        ("", fmt(m.mse) if m else "-"), ("", fmt(m.max_abs_error) if m else "-"),
        ("l", loc_str(m.max_abs_location) if m else "-"), ("", iso),
        ("l", "; ".join(r.reasons)),
    ]
    tds = "".join(f'<td class="{c}">{html.escape(str(v))}</td>' for c, v in cells)
    return f'<tr class="{cls}">{tds}</tr>'


def render_html(rep: VerifyReport) -> str:
    ok = rep.overall_success
    tested, passed, failed = rep.layer_counts()
    tol = rep.tolerance
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>qwen3lab verify: "
             f"{html.escape(rep.candidate)} vs {html.escape(rep.reference)}</title><style>{CSS}</style></head><body>",
             "<h1>qwen3lab verify</h1>",
             f'<p class="verdict {"ok" if ok else "bad"}">{html.escape(rep.sentence())}</p>',
             '<table class="meta">']
    meta = [("candidate", rep.candidate), ("reference", rep.reference), ("model", rep.model_path or "-"),
            ("input", rep.test_input if rep.test_input is not None else "(token ids)"),
            ("input_ids", ", ".join(map(str, rep.input_ids))), ("decode steps", rep.decode_steps),
            ("tolerance", f"{tol.name}: cosine ≥ {cos_str(tol.cos_min)}, relative error ≤ {tol.rel_max:g}"
             + (f", MSE ≤ {tol.mse_max:g}" if tol.mse_max is not None else "")),
            ("layers", f"{tested} tested, {passed} passed, {failed} failed"), ("isolation", rep.isolation),
            ("first divergence", rep.first_divergence.name if rep.first_divergence else "none"),
            ("culprit", rep.culprit.name if rep.culprit else "none")]
    parts += [f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in meta]
    parts.append("</table>")
    for n in rep.notes:
        parts.append(f"<p>note: {html.escape(n)}</p>")
    for p in rep.problems:
        parts.append(f'<p class="warn">warning: {html.escape(p)}</p>')
    fig = heatmap(rep)
    if fig is not None:
        parts += ["<h2>Error heatmap: layers × taps</h2>", _img(fig, "heatmap of relative error, layers by taps")]
    if rep.divergence_arrays is not None:
        name, cand, ref = rep.divergence_arrays
        parts += [f"<h2>First divergence: {html.escape(name)}</h2>",
                  _img(error_profile(name, cand, ref, "candidate vs reference (plain run)"),
                       f"error of {name} by token and channel")]
    if rep.culprit_arrays is not None:
        name, cand, ref = rep.culprit_arrays
        if rep.divergence_arrays is not None and name == rep.divergence_arrays[0]:
            parts.append(f"<p>The culprit is the first divergent tap itself: {html.escape(name)} fails with the "
                         f"reference's inputs grafted in, so its own operation is wrong.</p>")
        else:
            parts += [f"<h2>Culprit: {html.escape(name)} (its own op on the reference's inputs)</h2>",
                      _img(error_profile(name, cand, ref, "grafted run: candidate op applied to reference inputs"),
                           f"isolated error of {name} by token and channel")]
    parts += ["<h2>All taps</h2><table><thead><tr>"
              + "".join(f'<th class="{c}">{h}</th>' for c, h in (
                  ("l", "tap"), ("l", "status"), ("l", "origin"), ("", "shape"), ("", "cosine"), ("", "rel err"),
                  ("", "MSE"), ("", "max abs"), ("l", "at"), ("", "isolated rel err"), ("l", "why")))
              + "</tr></thead><tbody>"]
    parts += [_tap_row(r) for r in rep.results]
    parts.append("</tbody></table></body></html>")
    return "\n".join(parts)


def write_html(rep: VerifyReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render_html(rep), encoding="utf-8")
    return path
