"""Checks of the arguments (numbers, callables) shared by the modules that take them."""

from __future__ import annotations

import inspect
import math
import numbers
import types
from collections.abc import Callable
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


def to_float(value: float) -> float:
    """``float(value)``, but inf (or -inf), not an OverflowError, for a number too large for one.

    What the float arithmetic of the gates and timers would make of it: a
    cap of ``10**400`` seconds is no cap, as ``math.inf`` is.
    """
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def positive_seconds(value: object) -> float | None:
    """``value`` as float seconds if it is a real number, finite and > 0 as a float; else None.

    The float is what the timers use, so it is what is checked: ``10**400``
    (inf as a float) and ``Fraction(1, 10**400)`` (0.0) are refused, and
    ``True`` is not 1 s. The caller raises, in its own words.
    """
    if is_real(value):
        seconds = to_float(value)
        if 0.0 < seconds < math.inf:  # NaN fails both
            return seconds
    return None


def check_finite(value: object, message: str) -> float:
    """``value``, as given, if it is a finite real number > 0; else raise ``message``.

    Raises:
        TypeError: ``message``, for a value that is not a real number (or is a bool).
        ValueError: ``message``, for one out of range: 0, negative, NaN,
            infinite, or too large for a float.
    """
    if not is_real(value):
        raise TypeError(message)
    if not (is_finite(value) and value > 0):
        raise ValueError(message)
    return value


def _name(fn: object) -> str:
    """How an error names a callable: its ``__name__`` (``<lambda>``, ``estimate``), else "it".

    The message shows the callable's repr as well (a partial, an object).
    """
    try:
        name = getattr(fn, "__name__", None)
    except Exception:
        name = None
    return name if isinstance(name, str) else "it"


def is_async_callable(fn: object) -> bool:
    """An ``async def`` function, a partial of one, or an object with an async ``__call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, as Python calls it
    return call is not None and inspect.iscoroutinefunction(call)


def _arguments(names: list[str]) -> str:
    """``"1 argument (item)"``, ``"2 arguments (item, session)"``."""
    noun = "argument" if len(names) == 1 else "arguments"
    return f"{len(names)} {noun} ({', '.join(names)})"


def check_arity(
    name: str, fn: Callable[..., object], count: int, given: str, *, plain: bool = False
) -> None:
    """Refuse ``fn`` by name unless it can be called with ``count`` positional arguments.

    A ``cost=lambda: 1`` would otherwise fail only on its first call, deep in
    the run, with Python's "takes 0 positional arguments but 1 was given",
    which names neither the argument nor the callable. Run once per argument,
    never per call. A callable whose signature cannot be read (``bool``, many
    C functions, ``functools.cache`` wrappers) is accepted, as before; so is a
    decorated function: its wrapper's own signature is read, not the wrapped
    function's, since a decorator may add or supply arguments.

    Args:
        name: the argument, as the message shows it: ``"cost"``.
        fn: the callable given.
        count: how many positional arguments it is called with.
        given: what it is called with, in words: ``"the item"``.
        plain: refuse an ``async def`` too: ``fn``'s result is used as it is,
            and a coroutine is neither a dict of amounts nor a false answer.

    Raises:
        TypeError: ``fn`` cannot take ``count`` positional arguments (too few
            parameters, more required ones, or a required keyword-only one),
            or is async where ``plain`` says it must not be.
    """
    if plain and is_async_callable(fn):
        raise TypeError(
            f"{name}= must be a plain function (a `def`), called with {given}; its result is "
            f"used as it is, never awaited; got the async function {name}={fn!r}"
        )
    if _binds_plainly(fn, count):
        return
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except Exception:  # ValueError, TypeError: not inspectable, so not checked
        return
    try:
        signature.bind(*range(count))  # placeholders: only their number matters
    except TypeError:
        why = _mismatch(signature, count)
        raise TypeError(
            f"{name}= is called with {given}, but {_name(fn)} {why}; got {name}={fn!r}"
        ) from None


def _binds_plainly(fn: object, count: int) -> bool:
    """True when ``fn`` is a plain function (or a method of one) that takes ``count`` arguments.

    Read from its code object: a microsecond, where ``inspect.signature``
    takes ten, and a map checks its callables each time it is made. False
    means "not known this way" (any other callable, one with its own
    ``__signature__``, or a mismatch), and the caller asks ``inspect``.
    """
    if type(fn) is types.MethodType:
        fn, count = fn.__func__, count + 1
    if type(fn) is not types.FunctionType or "__signature__" in fn.__dict__:
        return False
    code = fn.__code__
    positional = code.co_argcount
    required = positional - len(fn.__defaults__ or ())
    keyword_only = code.co_kwonlyargcount - len(fn.__kwdefaults__ or ())
    varargs = code.co_flags & inspect.CO_VARARGS
    return keyword_only == 0 and required <= count and (count <= positional or bool(varargs))


def _mismatch(signature: inspect.Signature, count: int) -> str:
    """Why a call with ``count`` positional arguments does not bind to ``signature``."""
    params = signature.parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if not positional and all(p.kind is not p.VAR_POSITIONAL for p in params):
        return "takes no argument" if not params else "takes no positional argument"
    if len(required) > count:
        return f"needs {_arguments(required)}"
    if keyword_only:
        return f"also needs the keyword argument {keyword_only[0]!r}"
    return f"takes only {_arguments([p.name for p in positional])}"
