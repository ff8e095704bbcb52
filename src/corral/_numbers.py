"""Checks of the numbers given as arguments, shared by the modules that take them."""

from __future__ import annotations

import math
import numbers
from typing import TypeGuard


def is_finite(value: float) -> bool:
    """``math.isfinite``, but False (not an OverflowError) for an int too large for a float.

    ``10**400`` is an int, and a finite one, but every float computation with
    it overflows: an argument check must refuse it by name, not crash.
    """
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_real(value: object) -> TypeGuard[float]:
    """A real number, as ``numbers.Real`` says (a Fraction, a numpy float), but not a bool.

    ``True`` is an int to Python, but ``timeout=True`` is a mistake, not 1 s.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integral(value: object) -> TypeGuard[int]:
    """An integer, as ``numbers.Integral`` says (a numpy int too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
