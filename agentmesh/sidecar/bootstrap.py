"""Bootstrap: from one setting (the control plane URL) to everything a sidecar needs.

An explicit ``AGENTMESH_NATS_URL`` skips the control plane entirely, so agents keep starting
while the control plane is down.
"""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from agentmesh._version import __version__
from agentmesh.errors import RegistryUnavailable
from agentmesh.models import Bootstrap
from agentmesh.settings import Settings

__all__ = ["bootstrap"]


async def bootstrap(settings: Settings) -> Bootstrap:
    if settings.nats_url:
        return Bootstrap(
            nats_url=settings.nats_url,
            registry_bucket=settings.registry_bucket,
            control_url=settings.control_url,
            version=__version__,
            heartbeat_interval=settings.heartbeat_interval,
            lease_ttl=settings.lease_ttl,
        )
    url = f"{settings.control_url.rstrip('/')}/v1/bootstrap"
    headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(url, headers=headers)
            resp.raise_for_status()
            return Bootstrap.model_validate_json(resp.content)
    except httpx.HTTPError as exc:
        raise RegistryUnavailable(
            f"control plane at {settings.control_url}: {exc or type(exc).__name__}; start it with "
            "`agentmesh control`, or set AGENTMESH_CONTROL_URL / AGENTMESH_NATS_URL"
        ) from exc
    except ValidationError as exc:
        raise RegistryUnavailable(
            f"control plane at {settings.control_url} sent an unexpected bootstrap document"
        ) from exc
