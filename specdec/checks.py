"""Checks of user-given numbers, shared by ``generate`` and every drafter's constructor: each error names
the argument, the value given and what to give instead."""

from __future__ import annotations

import numbers


def as_int(name: str, value, low: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an ``int`` (a Python or numpy integer, or a whole float, as transformers accepts them),
    at least ``low``; ``None`` passes when ``optional``. Raises ``ValueError`` naming ``name``."""
    if value is None and optional:
        return None
    whole = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or whole):
        raise ValueError(f"{name}={value!r} must be an integer" + (" or None" if optional else "")
                         + (f" >= {low}" if low is not None else "") + f", got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    return value


def as_number(name: str, value, optional: bool = False) -> float | None:
    """``value`` as a ``float`` (any real number but a bool); ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a number" + (" or None" if optional else "")
                         + f", got {type(value).__name__}")
    return float(value)
