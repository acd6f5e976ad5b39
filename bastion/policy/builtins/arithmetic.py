"""Arithmetic on numbers (``+``, ``-``, ``*``, ``/``, ``mod``, ``rem``), as Polar has it.

Integers stay within Polar's 64-bit signed range: a result outside it, a division by zero, or
an operand that is not a finite number (a string, a boolean, a missing context field, an
infinity or a NaN from the context) makes the
condition that uses it false, so a bad value fails closed and no computation can grow a number
without bound. ``/`` of two integers rounds toward zero; ``mod`` takes the sign of the divisor,
``rem`` that of the dividend.
"""

from __future__ import annotations

import math
from typing import Any

from bastion.policy.runtime import MISSING

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
OPERATORS = ("+", "-", "*", "/", "mod", "rem")
_NUMBERS = (int, float)


def _truncated(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def arith(op: str, a: Any, b: Any) -> Any:
    """``a op b``, or MISSING when it has no value (see the module's docstring)."""
    if a.__class__ not in _NUMBERS or b.__class__ not in _NUMBERS:
        return MISSING  # booleans, strings, entities, lists, MISSING
    if (
        a.__class__ is float
        and not math.isfinite(a)
        or b.__class__ is float
        and not math.isfinite(b)
    ):
        return MISSING  # 1 / inf would be 0.0, a value made from one that has none
    try:
        return _checked(op, a, b)
    except (OverflowError, ValueError):  # a float out of range, a NaN or an infinity
        return MISSING


def _checked(op: str, a: Any, b: Any) -> Any:
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    elif op == "*":
        result = a * b
    elif b == 0:
        return MISSING
    elif a.__class__ is int and b.__class__ is int:
        q = _truncated(a, b)
        result = q if op == "/" else a - b * q if op == "rem" else a % b
    elif op == "/":
        result = a / b
    elif op == "rem":
        result = math.fmod(a, b)
    else:
        result = a % b
    if result.__class__ is int:
        return result if INT_MIN <= result <= INT_MAX else MISSING
    return result if math.isfinite(result) else MISSING
