"""Reading an app's A2A agent card for ``agentmesh sidecar --card URL`` (a cold path: httpx)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from agentmesh.errors import ConfigurationError

__all__ = ["CARD_TIMEOUT", "card_origin", "fetch_card"]

#: The app answers on loopback: a card that takes longer than this is not coming.
CARD_TIMEOUT = 5.0


def fetch_card(url: str) -> Any:
    """The card's JSON, or ConfigurationError naming the URL and what went wrong."""
    try:
        response = httpx.get(url, timeout=CARD_TIMEOUT)
    except httpx.HTTPError as exc:
        raise ConfigurationError(f"sidecar: cannot read the agent card at {url}: {exc}") from exc
    if response.status_code != 200:
        raise ConfigurationError(
            f"sidecar: the agent card at {url} answered HTTP {response.status_code}"
        )
    try:
        return response.json()
    except ValueError as exc:
        raise ConfigurationError(f"sidecar: the agent card at {url} is not JSON: {exc}") from exc


def card_origin(url: str) -> str:
    """The app's base URL: where its card is served."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
