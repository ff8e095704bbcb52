"""corral: run huge numbers of async calls fast and safely.

::

    async with corral.map(fetch, urls, limit=100) as pages:
        async for page in pages:
            ...

    pages = await corral.gather(fetch, urls, limit=100, rate="20/s", retries=3)
    pages = corral.run(fetch, urls, limit=100)          # from sync code

Bounded or shared concurrency (:class:`Limiter`), start rates (:class:`Rate`),
per-attempt timeouts, retries with backoff and Retry-After (:class:`Retry`,
:class:`RetryAfter`), results in input order or as completed, in memory that
does not grow with the number of items.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from ._adaptive import Adaptive
from ._api import gather, map, run
from ._checkpoint_file import RecordedFailure
from ._engine import ResultStream
from ._errors import BudgetExhausted, DeadlineExceeded
from ._limits import Limiter
from ._monitor import BlockReport, LagStats, LoopWatch, watch_loop
from ._offload import WorkerCrashed
from ._rate import Rate
from ._retry import Retry, RetryAfter, transient
from ._retry_budget import RetryBudget, RetryBudgetExhausted
from ._stats import Stats
from ._usage import token_usage

__all__ = [
    "Adaptive",
    "BlockReport",
    "BudgetExhausted",
    "DeadlineExceeded",
    "LagStats",
    "Limiter",
    "LoopWatch",
    "Rate",
    "RecordedFailure",
    "ResultStream",
    "Retry",
    "RetryAfter",
    "RetryBudget",
    "RetryBudgetExhausted",
    "Stats",
    "WorkerCrashed",
    "__version__",
    "gather",
    "map",
    "run",
    "token_usage",
    "transient",
    "watch_loop",
]

# Tracebacks and reprs say corral.Limiter, not corral._limits.Limiter.
for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__"):
        _obj.__module__ = "corral"
del _name, _obj
