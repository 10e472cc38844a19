"""Full-matrix printing: every element, row labels, fixed precision, aligned columns, no ellipsis.

A 2-D array prints as a table with one labelled row per token ("t0", "t1", ...) and numbered columns.
A 3-D tap prints one such table per head: [T, H, Dh] (q, k, v, attn, ...) splits on axis 1, [H, T, S]
(scores, probs) on axis 0. When a table is wider than the line width its columns are cut into blocks of
equal size ("columns 0-7", "columns 8-15"), each block repeating the row labels, so nothing is
ever elided. Values are fixed-point at the chosen precision; a matrix holding values of 1e6 or more
switches to scientific notation as a whole, so its columns stay aligned.
"""

from __future__ import annotations

import math

import numpy as np

# which axis of a 3-D tap is the head axis, by site name
HEAD_FIRST = ("probs", "scores")


def fmt_value(x: float, precision: int, sci: bool) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{precision}e}" if sci else f"{x:.{precision}f}"


def _is_int(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_


def format_matrix(a, precision: int = 4, row_labels: list[str] | None = None, width: int = 80,
                  indent: str = "  ", sci: bool | None = None) -> str:
    """A 1-D or 2-D array as aligned text lines, wrapped into column blocks to fit `width`."""
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
        row_labels = row_labels or [""]
    if a.ndim != 2:
        raise ValueError(f"format_matrix takes 1-D or 2-D arrays, got shape {a.shape}")
    R, C = a.shape
    row_labels = row_labels if row_labels is not None else [f"t{r}" for r in range(R)]
    if _is_int(a):
        cells = [[str(int(v)) for v in r] for r in a.tolist()]
    else:
        finite = np.abs(a[np.isfinite(a)])
        if sci is None:
            sci = bool(finite.size and finite.max() >= 1e6)
        cells = [[fmt_value(float(v), precision, sci) for v in r] for r in a.tolist()]
    col_names = [str(c) for c in range(C)]
    cw = max([len(s) for r in cells for s in r] + [len(s) for s in col_names] + [1])
    lw = max([len(s) for s in row_labels] + [1])
    per_line = max(1, (width - len(indent) - lw) // (cw + 1))
    nblocks = math.ceil(C / per_line) if C else 1
    per_block = math.ceil(C / nblocks) if C else 0  # equal-sized blocks read better than 9 + 1
    lines = []
    for b in range(nblocks):
        lo, hi = b * per_block, min(C, (b + 1) * per_block)
        if nblocks > 1:
            lines.append(f"{indent}columns {lo}-{hi - 1}:")
        lines.append(indent + " " * lw + "".join(" " + s.rjust(cw) for s in col_names[lo:hi]))
        for r in range(R):
            lines.append(indent + row_labels[r].rjust(lw) + "".join(" " + s.rjust(cw) for s in cells[r][lo:hi]))
    return "\n".join(lines)


def format_tap(name: str, a, precision: int = 4, width: int = 80, what: str = "", sci: bool | None = None) -> str:
    """Header (name, shape, mean, and what it is) and the whole tensor, one table per head for 3-D taps."""
    a = np.asarray(a)
    site = name.rsplit(".", 1)[-1]
    if _is_int(a):
        stats = ""
    else:
        finite = a[np.isfinite(a)]
        mean = float(finite.mean()) if finite.size else float("nan")
        stats = f"  mean {fmt_value(mean, precision, bool(sci) or abs(mean) >= 1e6)}"
    head = f"{name}  {list(a.shape)}{stats}"
    if what:  # the description goes on the header line when it fits, else on a line of its own
        head += f"  ({what})" if len(head) + len(what) + 4 <= width else f"\n  ({what})"
    if a.ndim <= 2:
        return head + "\n" + format_matrix(a, precision, width=width, sci=sci)
    if sci is None:  # one notation for all heads so they compare at a glance
        finite = np.abs(a[np.isfinite(a)]) if not _is_int(a) else np.zeros(0)
        sci = bool(finite.size and finite.max() >= 1e6)
    blocks = [head]
    heads = a.shape[0] if site in HEAD_FIRST else a.shape[1]
    for h in range(heads):
        m = a[h] if site in HEAD_FIRST else a[:, h]
        if m.ndim > 2:
            m = m.reshape(m.shape[0], -1)
        hint = "  (rows: query token, columns: key position)" if site in HEAD_FIRST and h == 0 else ""
        blocks.append(f"  head {h}{hint}")
        blocks.append(format_matrix(m, precision, width=width, indent="    ", sci=sci))
    return "\n".join(blocks)
