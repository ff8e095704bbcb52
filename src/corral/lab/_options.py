"""Argument types for the ``corral`` command line: each refuses a bad value with what it must be.

argparse reports the message as ``argument --port: must be an int from 0 to
65535, got '70000'``: the option, the rule and the text as typed. Standard
library only: ``corral --help`` and a bad option must work without the lab's
extras.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["int_option", "number_option"]


def int_option(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An int from ``minimum`` (to ``maximum``, when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not an int, or more digits than int() reads
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an int {bound}, got {text!r}")
        return value

    return parse


def number_option(
    maximum: float | None = None, *, positive: bool = False, what: str = "a number"
) -> Callable[[str], float]:
    """A finite number >= 0 (> 0 when ``positive``), at most ``maximum`` when given.

    ``what`` names it in the message (``"a number of seconds"``).
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > 0 if positive else value >= 0
        if not (math.isfinite(value) and low_ok and (maximum is None or value <= maximum)):
            if maximum is None:
                bound = "> 0" if positive else ">= 0"
            elif positive:
                bound = f"> 0 and <= {maximum:g}"
            else:
                bound = f"between 0 and {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    return parse
