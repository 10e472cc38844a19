"""Op isolation: which failing taps are wrong themselves, and which only inherited a wrong input.

The candidate runs a second time with the reference's taps grafted in (taps.graft): at every site the
next op consumes the reference's value, so each recorded tap is "the candidate's op applied to the
reference's inputs" and measures that op alone. Then, for each tap that failed in the plain run:
- `op`: it also fails in the grafted run: its own operation is wrong (or too imprecise);
- `inherited`: it passes in the grafted run: it failed only because an earlier tap fed it a wrong value.
The culprit is the first tap, in dataflow order, whose grafted comparison fails. When the plain run fails
but no grafted tap does, no single op is wrong: error accumulated over many ops (rounding) crossed the
tolerance, which the report says in so many words.
"""

from __future__ import annotations

from .compare import FAILING, TapResult, first_failing


def attach_isolated(results: dict[str, TapResult], isolated: dict[str, TapResult]) -> None:
    """Copy the grafted run's metrics onto the plain run's results, by tap name."""
    for name, iso in isolated.items():
        r = results.get(name)
        if r is None:
            continue
        r.isolated = iso.metrics
        r.isolated_status = iso.status
        r.isolated_reasons = list(iso.reasons)


def label_origins(results: list[TapResult]) -> TapResult | None:
    """Set `origin` on every failing tap; return the culprit (first tap whose own op fails)."""
    for r in results:
        if r.status not in FAILING:
            continue
        if r.isolated_status in FAILING:
            r.origin = "op"
        elif r.isolated_status == "pass":
            r.origin = "inherited"
        else:  # not in the grafted run: a structural failure is the tap's own; a numeric one cannot be told
            r.origin = "op" if r.status != "fail" else None
    return first_failing(results, isolated=True)
