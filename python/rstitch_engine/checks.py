"""One home for checking the values users give: engine options, sampling parameters, policies, request
fields, checkpoint config files. Each check returns the value (as int, float or bool) or raises
InvalidValue naming it, always in the words "<name> must be <what>, got <value>"; the server answers an
InvalidValue with a 400 whose `param` is its name."""
from __future__ import annotations

import math

import numpy as np

from .protocol import INT32_MAX

_POWERS = {2**31 - 1: "2**31 - 1", 2**63 - 1: "2**63 - 1", 2**64 - 1: "2**64 - 1"}


class InvalidValue(ValueError, TypeError):
    """A value of the wrong type or outside its range: a ValueError and a TypeError both, so callers that
    catch either keep working. `name` is the parameter."""

    def __init__(self, name: str, what: str, value):
        super().__init__(f"{name} must be {what}, got {value!r:.100}")
        self.name = name


def _bound(x) -> str:
    return _POWERS.get(x, f"{x:g}" if isinstance(x, float) else str(x))


def integer(name: str, value, low: int = 0, high: int = INT32_MAX) -> int:
    """An integer in [low, high] (numpy integers too; bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        if high < 2**63 - 1:
            what = f"an integer in [{_bound(low)}, {_bound(high)}]"
        else:  # no practical upper bound
            what = "a positive integer" if low == 1 else "an integer" if low <= -2**63 else f"an integer >= {low}"
        raise InvalidValue(name, what, value)
    return int(value)


def number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """A number (int or float, never NaN) in the interval from low to high, each end closed unless `*_open`;
    an infinite end that is open keeps the number finite."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer)) \
        and not math.isnan(value) and (low < value if low_open else low <= value) \
        and (value < high if high_open else value <= high)
    if not ok:
        if low == -math.inf and high == math.inf:
            what = "a finite number" if low_open or high_open else "a number"
        elif low == 0 and low_open and high == math.inf:
            what = "a positive number"
        elif high == math.inf:
            what = f"a {'finite ' if high_open else ''}number {'>' if low_open else '>='} {_bound(low)}"
        elif low == -math.inf:
            what = f"a number {'<' if high_open else '<='} {_bound(high)}"
        else:
            what = f"a number in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
        raise InvalidValue(name, what, value)
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(name, "true or false", value)
    return value


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidValue(name, "a string", value)
    return value


def token_ids(name: str, value, limit: int = INT32_MAX + 1) -> list[int]:
    """A list (or tuple) of token ids, each an integer in [0, limit)."""
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(name, "a list of token ids", value)
    return [integer(f"{name}[{i}]", t, 0, limit - 1) for i, t in enumerate(value)]
