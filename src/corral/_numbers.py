"""Checks of the numbers given as arguments, shared by the modules that take them."""

from __future__ import annotations

import math


def is_finite(value: float) -> bool:
    """``math.isfinite``, but False (not an OverflowError) for an int too large for a float.

    ``10**400`` is an int, and a finite one, but every float computation with
    it overflows: an argument check must refuse it by name, not crash.
    """
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
