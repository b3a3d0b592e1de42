"""Orchestration code calling the example agents through the mesh.

Start the mesh first (`agentmesh control`, then `agentmesh run examples/agents/*.py`), or just
run `agentmesh demo`, which runs this same code. Then: `python examples/orchestrate.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import agentmesh


async def orchestrate(
    mesh: agentmesh.Mesh, topic: str = "a service mesh for agents"
) -> dict[str, Any]:
    """Discover, call and stream; return an account of who did what."""
    offers = await mesh.registry.find("summarize", tags=["en"], version=">=1.0")
    research = [
        await mesh.invoke("research", {"topic": topic, "angle": a})
        for a in ("mesh", "nats", "agents", "reliability")
    ]
    report = await mesh.invoke("plan", {"topic": topic})
    chunks = [chunk async for chunk in mesh.stream("draft", {"topic": topic, "paragraphs": 3})]
    summary = await mesh.call("summarize", {"text": report.value["summary"], "max_words": 12})
    return {
        "summarize_offers": [f"{o.agent} {o.capability.version} at {o.endpoint}" for o in offers],
        "research": [(r.instance_id, r.value["angle"], len(r.value["facts"])) for r in research],
        "plan": {"served_by": report.instance_id, **report.value},
        "draft": [c["text"] for c in chunks],
        "headline": summary["text"],
    }


async def main() -> None:
    async with agentmesh.connect() as mesh:
        account = await orchestrate(mesh)
    for key, value in account.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    asyncio.run(main())
