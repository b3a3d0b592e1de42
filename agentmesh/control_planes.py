"""Several control planes: ``AGENTMESH_CONTROL_URL`` may list them, comma-separated.

Control planes are stateless apart from their CA key (everything else is in NATS), so any of
them answers bootstrap, enrolment and the CLI alike. A process asks the first one that accepts a
connection, starting with the one that answered last: a stopped control plane refuses
connections at once, so failing over costs one refused connect, never a timeout. The check is a
TCP connect on purpose: it works the same for http:// and https:// control planes and needs no
credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit

from agentmesh.errors import ConfigurationError, RegistryUnavailable

__all__ = ["control_urls", "live_control", "live_control_sync"]

_CONNECT_TIMEOUT = 2.0
"""Seconds one control plane gets to accept a connection before the next one is tried."""

_last_answered: dict[str, str] = {}
"""Setting value → the URL that answered last (tried first next time)."""


def control_urls(value: str) -> list[str]:
    """``"http://a:7700, http://b:7700"`` → the URLs, without trailing slashes, deduplicated."""
    urls: list[str] = []
    for part in (p.strip().rstrip("/") for p in value.split(",")):
        if part and part not in urls:
            urls.append(part)
    if not urls:
        raise ConfigurationError(f"no control plane URL in {value!r}")
    return urls


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port


def _ordered(value: str) -> list[str]:
    urls = control_urls(value)
    last = _last_answered.get(value)
    if last in urls:
        urls.remove(last)
        urls.insert(0, last)
    return urls


async def live_control(value: str) -> str:
    """The first control plane in ``value`` that accepts a connection (one URL: itself,
    unchecked, so its own request names the problem). Raises RegistryUnavailable if none does."""
    urls = _ordered(value)
    if len(urls) == 1:
        return urls[0]
    refused: list[str] = []
    for url in urls:
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                _, writer = await asyncio.open_connection(*_address(url))
        except (OSError, TimeoutError) as exc:
            refused.append(f"{url} ({exc or type(exc).__name__})")
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        _last_answered[value] = url
        return url
    raise RegistryUnavailable(f"no control plane answers: {'; '.join(refused)}")


def live_control_sync(value: str) -> str:
    """:func:`live_control` for synchronous code (the CLI resolving its settings)."""
    urls = _ordered(value)
    if len(urls) == 1:
        return urls[0]
    refused: list[str] = []
    for url in urls:
        try:
            with socket.create_connection(_address(url), timeout=_CONNECT_TIMEOUT):
                pass
        except OSError as exc:
            refused.append(f"{url} ({exc})")
            continue
        _last_answered[value] = url
        return url
    raise RegistryUnavailable(f"no control plane answers: {'; '.join(refused)}")
