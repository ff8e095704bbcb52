"""Argument types for the ``corral`` command line: each refuses a bad value with what it must be.

argparse reports the message as ``argument --port: must be an int from 0 to
65535, got '70000'``: the option, the rule and the text as typed. Standard
library only: ``corral --help`` and a bad option must work without the lab's
extras.

Every numeric option has both bounds written down, not only a sign: a value
like ``1e300`` or ``1e-300`` parses as a fine float and then turns into a
sleep that never ends or a rate of 1e301 per second, far from where the
mistake was made.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DAY_MS",
    "DAY_S",
    "LOOPBACK_RULE",
    "directory_option",
    "host_option",
    "int_option",
    "loopback_host",
    "number_option",
    "show_number",
]

#: The longest wait any option may ask for: a day, in seconds and in
#: milliseconds. Past it, a value is a typo, not a scenario.
DAY_S = 86_400.0
DAY_MS = DAY_S * 1e3


#: What a lab server's host must be, as its refusals say it.
LOOPBACK_RULE = (
    "a loopback address (127.0.0.0/8, ::1 or localhost): corral serves on this machine only"
)


def loopback_host(host: str) -> str | None:
    """The address to bind for ``host`` (``localhost`` meaning 127.0.0.1), or None if not loopback.

    ``localhost`` may resolve to both 127.0.0.1 and ::1; binding both with
    port=0 would give two different ports and no single URL.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return host if address.is_loopback else None


def host_option(text: str) -> str:
    """``--host``: a loopback address, refused by argparse, naming the option, otherwise."""
    if loopback_host(text) is None:
        raise argparse.ArgumentTypeError(f"must be {LOOPBACK_RULE}, got {text!r}")
    return text


def show_number(value: float) -> str:
    """``value`` as a bound in a message: ``86400``, ``0.01``, never ``8.64e+07``."""
    return f"{value:.15g}"


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
    minimum: float = 0.0,
    maximum: float | None = None,
    *,
    exclusive: bool = False,
    what: str = "a number",
) -> Callable[[str], float]:
    """A finite number from ``minimum`` (excluded when ``exclusive``) to ``maximum``, if given.

    ``what`` names it in the message (``"a number of seconds"``), which reads
    ``>= 0``, ``> 0``, ``between 0.1 and 86400`` or ``> 0 and <= 100``.
    """
    low = show_number(minimum)
    if maximum is None:
        bound = f"> {low}" if exclusive else f">= {low}"
    elif exclusive:
        bound = f"> {low} and <= {show_number(maximum)}"
    else:
        bound = f"between {low} and {show_number(maximum)}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if exclusive else value >= minimum
        # nan fails every comparison, so it fails low_ok; inf fails isfinite.
        if not (math.isfinite(value) and low_ok and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text!r}")
        return value

    return parse


def directory_option(text: str) -> Path:
    """A directory to write into, named by a non-empty path.

    ``Path("")`` is the current directory: ``--out "$DIR"`` with ``DIR`` unset
    would scatter the results among the user's own files instead of failing.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a directory, like ./results; got {text!r}")
    return Path(text)
