"""FedRefine: federated inference where frozen LLMs exchange KV caches through small trained fusers.

The Python API (see :mod:`fedrefine.api`), imported on first use so that ``import fedrefine`` stays light::

    import fedrefine
    pair = fedrefine.load("runs/my_pair/config.yaml")
    answer = pair.answer("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], route="c2c")
"""

from __future__ import annotations

from typing import Any

__all__ = ["Answer", "Pair", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedrefine import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedrefine' has no attribute {name!r}")
