"""A researcher agent: looks a topic up in a small built-in corpus (deterministic, offline).

Run two replicas of it and watch the mesh spread calls over both.
"""

from __future__ import annotations

from pydantic import BaseModel

from agentmesh import capability

CORPUS: dict[str, list[str]] = {
    "mesh": [
        "A service mesh moves retries, timeouts and encryption out of application code.",
        "Sidecars intercept every call, so the mesh can observe traffic without code changes.",
        "Linkerd and Istio popularised the sidecar model for microservices.",
    ],
    "agents": [
        "AI agents are programs that plan, call tools and delegate work to other agents.",
        "Agents built by different teams need a common way to discover each other.",
        "Multi-agent systems fail in new ways: loops, fan-out storms and runaway budgets.",
    ],
    "nats": [
        "NATS is a lightweight messaging system with request/reply and key-value storage.",
        "JetStream adds persistence, and its key-value store supports per-key TTLs.",
    ],
    "reliability": [
        "Retries are only safe for idempotent operations or requests that never arrived.",
        "Circuit breakers eject failing replicas so that healthy ones take the load.",
        "Deadlines that travel with a request stop work nobody is waiting for.",
    ],
}


class Findings(BaseModel):
    topic: str
    angle: str
    facts: list[str]


@capability(version="1.0.0", tags=["research", "en"], idempotent=True)
async def research(topic: str, angle: str = "overview", limit: int = 3) -> Findings:
    """Collect facts about a topic from the researcher's corpus.

    Args:
        topic: What to research, e.g. "service mesh for agents".
        angle: Which aspect to focus on; matched against the corpus sections.
        limit: Most facts to return.
    """

    def lookup(text: str) -> list[str]:
        words = {w.strip(".,").lower() for w in text.split()}
        return [fact for key, items in CORPUS.items() if key in words for fact in items]

    facts = lookup(angle) or lookup(topic)
    if not facts:
        facts = [f"No entry on {topic!r} yet; start from first principles."]
    return Findings(topic=topic, angle=angle, facts=facts[:limit])
