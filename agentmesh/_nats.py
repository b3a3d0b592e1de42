"""nats-py, imported without aiohttp, which it needs only for NATS over WebSocket.

``nats/aio/transport.py`` imports aiohttp at module level when it is installed, for its WebSocket
transport (``ws://``/``wss://`` URLs). agentmesh itself no longer depends on aiohttp (httpx is the
one HTTP client of its cold paths), but aiohttp is often installed anyway: by the ``bench`` and
``dev`` extras (the B0 baseline), and by many applications an agent lives in. Then importing
nats-py costs an agent's start-up the import of aiohttp (a large part of goal S7's budget;
docs/benchmarks.md), although the mesh speaks NATS over TCP only.

So the package's ``__init__`` imports this module before anything else, and nats-py is imported
here while ``sys.modules["aiohttp"]`` holds a stand-in. nats-py's transport module keeps that
stand-in as its ``aiohttp``; the first attribute it reads (when a WebSocket connection opens)
imports the real aiohttp and is forwarded to it. The stand-in leaves ``sys.modules`` as soon as
nats-py is imported, so every other ``import aiohttp`` gets the real module, loaded as usual.
If nats-py or aiohttp is already imported, or aiohttp is not installed, nothing is done.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

__all__: list[str] = []


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module: reading an attribute imports the real one and reads it there."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            # Only while nats-py itself is being imported: nothing real to forward to yet.
            raise AttributeError(f"{self.__name__}.{name} is not available yet")
        real = importlib.import_module(self.__name__)
        # From now on reads find the real attributes here, without this detour (nats-py reads
        # aiohttp.WSMsgType for every WebSocket message).
        vars(self).update(vars(real))
        return getattr(real, name)


def _import_nats() -> None:
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    if importlib.util.find_spec("aiohttp") is None:  # nothing for nats-py to import eagerly
        importlib.import_module("nats.aio.client")
        return
    stand_in = sys.modules["aiohttp"] = _ImportedOnFirstUse("aiohttp")
    try:
        importlib.import_module("nats.aio.client")
    finally:
        if sys.modules.get("aiohttp") is stand_in:
            del sys.modules["aiohttp"]


_import_nats()
