"""The agent behind the mesh targets: ``python -m agentmesh run bench/_echo_agent.py --port 0``.

One capability, ``echo``, doing the same work as the FastAPI baseline (B1): its parameters are
the fields of ``bench.workloads.make_payload``'s JSON object, so the agent validates the request
body into a pydantic model (the capability's generated input model), and it returns an
``EchoBody`` pydantic model that the agent serialises (its type is the declared return type, so
it is dumped without a second validation). B1 validates into the same model and FastAPI
validates and serialises the returned model. The payload bytes are identical for every target.

``idempotent=True``: echoing twice is harmless, and it lets the failover benchmark retry calls
whose connection died with the agent (``bench/failover.py``).

This file is executed by ``agentmesh run``, which puts ``bench/`` on ``sys.path``: it imports
only ``agentmesh`` and ``pydantic``, never ``bench.*``.
"""

from pydantic import BaseModel

from agentmesh import capability


class EchoBody(BaseModel):
    """The same model as B1's FastAPI endpoint (``bench/_servers.py``)."""

    id: int
    agent: str
    tags: list[str]
    params: dict[str, float]
    text: str


@capability(idempotent=True)
async def echo(
    id: int,
    agent: str,
    tags: list[str],
    params: dict[str, float],
    text: str,
) -> EchoBody:
    """Return the request as it came: the least work a validating capability can do."""
    return EchoBody(id=id, agent=agent, tags=tags, params=params, text=text)
