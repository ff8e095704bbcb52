"""Exceptions corral raises to say how a run ended."""

from __future__ import annotations


class DeadlineExceeded(Exception):
    """The map's ``deadline`` passed: no new call started, calls in flight were cancelled.

    Raised after every result produced before the deadline was handed out.
    With ``return_exceptions=True`` the map does not raise: each call that was
    cancelled in flight yields a ``DeadlineExceeded`` in its place instead
    ("the deadline passed while item 3 ran"), and so does each item that had
    not started ("... before item 5 started"), so every item still has exactly
    one outcome and ``gather`` returns one per item. The rest of the input is
    read to report it (without calling ``fn``): for an endless input the
    consumer decides when to stop (``break``, or ``results.cancel()``). Neither
    kind is written to a checkpoint, so a resume runs those items.

    A deadline that passes once every call has ended (the consumer still
    reading the results) cuts nothing short and raises nothing.
    """


class BudgetExhausted(Exception):
    """The map's ``budget`` is spent: no new call started; calls in flight finished.

    Raised after every result was handed out. The budget is a soft cap: it
    may be overshot by at most the calls that were already in flight.
    """
