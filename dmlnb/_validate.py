"""Input validation shared by every public entry point.

Every message names the offending parameter and, where there is a finite set, the valid choices
(the scikit-learn habit). All helpers raise :class:`ValueError` (or :class:`TypeError` for a wrong type).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelt string ``value``
    (``""`` when nothing is close)."""
    if not isinstance(value, str):
        return ""
    names = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in names}
        close = [lowered[value.lower()]] if value.lower() in lowered else []
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming both (and the
    closest choice to a misspelt name)."""
    choices = list(choices)
    if value not in choices:
        listed = ", ".join(map(repr, choices))
        raise ValueError(f"{name}={value!r} is not valid{did_you_mean(value, choices)}; "
                         f"choose one of {listed}")
    return value


def check_keys(given: Mapping[str, Any] | Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise a ValueError listing every key of ``given`` that is not in ``valid``, and the valid ones."""
    valid = list(valid)
    unknown = [k for k in given if k not in valid]
    if unknown:
        hints = "".join(did_you_mean(k, valid).replace("; did you mean", f"; {k!r}: did you mean")
                        for k in unknown)
        raise ValueError(
            f"unknown {what}: {', '.join(map(repr, unknown))}{hints}; valid {what} are: "
            f"{', '.join(valid)}"
        )


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` if it is a finite number in the given interval, else raise a ValueError
    that states it (NaN and infinities are refused whatever the interval)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number")
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
        raise ValueError(f"{name}={value!r} is out of range; it must lie in {interval}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools refused), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} is out of range; it must be >= {minimum}")
    return value
