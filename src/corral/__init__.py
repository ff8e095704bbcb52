"""corral: run huge numbers of async calls fast and safely.

    async with corral.map(fetch, urls, limit=100) as pages:
        async for page in pages:
            ...

See DESIGN.md and the README for the whole picture.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

__all__: list[str] = ["__version__"]
