"""Module-level functions for tests that send work to other processes."""

from __future__ import annotations

import os


def square(x: int) -> int:
    return x * x


def pid_of(_: object) -> int:
    return os.getpid()


class Unpicklable(Exception):
    def __init__(self, handle: object) -> None:
        super().__init__("cannot travel")
        self.handle = handle

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("this exception cannot be pickled")


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"bad item {x}")
    return x


def fail_unpicklably(x: int) -> int:
    raise Unpicklable(lambda: x)
