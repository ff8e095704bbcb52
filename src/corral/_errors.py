"""Exceptions corral raises to say how a run ended."""

from __future__ import annotations


class DeadlineExceeded(Exception):
    """The map's ``deadline`` passed: no new call started, calls in flight were cancelled.

    Raised after every result produced before the deadline was handed out.
    With ``return_exceptions=True`` the map does not raise: each call that was
    cancelled in flight yields a ``DeadlineExceeded`` in its place instead,
    and the items that had not started yield nothing. Items start in input
    order, so those that did are a prefix of the input: ``gather`` returns a
    list shorter than the input, one outcome for each item that started.
    """


class BudgetExhausted(Exception):
    """The map's ``budget`` is spent: no new call started; calls in flight finished.

    Raised after every result was handed out. The budget is a soft cap: it
    may be overshot by at most the calls that were already in flight.
    """
