"""Argument checks every layer uses for its error messages (tokenizer, engine, API): the bottom of the layering,
so nothing below the API imports the API for them."""

from __future__ import annotations

import numbers

from .errors import InputError


def shorten(value, limit: int = 80) -> str:
    """repr of a value for an error message, cut to about `limit` characters (a prompt may be megabytes)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit - 20]}...{r[-12:]} ({len(r)} chars)"


def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer argument in minimum..maximum; bools, floats and strings are refused, naming the argument."""
    if type(value) is int and value >= minimum and (maximum is None or value <= maximum):
        return value  # the common case, cheaply: the engine checks counts on every round
    allowed = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer {allowed}, got {shorten(value)} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be an integer {allowed}, got {shorten(value)}")
    return int(value)
