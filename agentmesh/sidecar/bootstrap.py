"""Bootstrap: from one setting (the control plane URL) to everything a sidecar needs.

An explicit ``AGENTMESH_NATS_URL`` skips the control plane entirely, so agents keep starting
while the control plane is down. The control plane is asked with aiohttp (lighter to import
than httpx), imported only then: with ``AGENTMESH_NATS_URL`` set, start-up imports no HTTP
client at all (aiohttp alone costs 100–200 ms of an agent's start-up).
"""

from __future__ import annotations

from pydantic import ValidationError

from agentmesh._version import __version__
from agentmesh.control_planes import live_control
from agentmesh.errors import RegistryUnavailable
from agentmesh.models import Bootstrap
from agentmesh.settings import Settings

__all__ = ["bootstrap", "local_bootstrap"]


def local_bootstrap(settings: Settings, *, nats_url: str, control_url: str) -> Bootstrap:
    """The bootstrap document these settings describe (what the control plane serves)."""
    return Bootstrap(
        nats_url=nats_url,
        registry_bucket=settings.registry_bucket,
        control_url=control_url,
        version=__version__,
        heartbeat_interval=settings.heartbeat_interval,
        lease_ttl=settings.lease_ttl,
    )


async def bootstrap(settings: Settings) -> Bootstrap:
    if settings.nats_url:
        return local_bootstrap(
            settings, nats_url=settings.nats_url, control_url=settings.control_url
        )
    import aiohttp

    control = await live_control(settings.control_url)  # the first of several that answers
    url = f"{control}/v1/bootstrap"
    token = settings.token.get_secret_value() if settings.token else None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as client,
            client.get(url, headers=headers, raise_for_status=True) as resp,
        ):
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise RegistryUnavailable(
            f"control plane at {settings.control_url}: {reason}; start it with "
            "`agentmesh control`, or set AGENTMESH_CONTROL_URL / AGENTMESH_NATS_URL"
        ) from exc
    try:
        return Bootstrap.model_validate_json(body)
    except ValidationError as exc:
        raise RegistryUnavailable(
            f"control plane at {settings.control_url} sent an unexpected bootstrap document"
        ) from exc
