"""corral's lab: a target server that behaves like a real API, for the demo, tests and tuning.

    import corral.lab

    async with corral.lab.serve(capacity=64, service_ms=10) as url:
        ...

    async with corral.lab.serve_llm(rpm=500, output_tpm=40_000) as url:
        ...   # a mock OpenAI/Anthropic API at f"{url}/v1"

The lab needs the ``lab`` extra (``pip install 'corral[lab]'``). ``import
corral`` never imports this package, and importing it loads nothing either:
each name is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.lab.llm_model import LLMStats
    from corral.lab.llm_server import LLMServer, serve_llm
    from corral.lab.server import ServerStats, TargetServer, serve

__all__ = ["LLMServer", "LLMStats", "ServerStats", "TargetServer", "serve", "serve_llm"]

# name -> the module that defines it; imported on first attribute access.
_LAZY = {
    "ServerStats": "corral.lab.server",
    "TargetServer": "corral.lab.server",
    "serve": "corral.lab.server",
    "LLMServer": "corral.lab.llm_server",
    "LLMStats": "corral.lab.llm_model",
    "serve_llm": "corral.lab.llm_server",
}

LAB_EXTRA_HINT = "pip install 'corral[lab]'"


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'corral.lab' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("corral"):
            raise
        raise ModuleNotFoundError(
            f"corral.lab.{name} needs {exc.name!r}, part of the lab extra: {LAB_EXTRA_HINT}",
            name=exc.name,
        ) from exc
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
