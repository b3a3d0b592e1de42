"""A planner agent: fans research out to researchers, then has the result summarized.

It calls other capabilities through its own sidecar: the `mesh` parameter is injected by the
runtime (it is not part of the capability's input schema).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from agentmesh import Agent, Mesh, capability


class Step(BaseModel):
    capability: str
    served_by: str
    detail: str


class Report(BaseModel):
    topic: str
    summary: str
    facts: int
    steps: list[Step]


@capability(version="1.0.0", tags=["planning", "en"], timeout=20)
async def plan(topic: str, mesh: Mesh, angles: list[str] | None = None) -> Report:
    """Research a topic from several angles in parallel and summarize what was found.

    Args:
        topic: The question or subject to plan a report for.
        angles: Aspects to research, one researcher call each.
    """
    angles = angles or ["mesh", "agents", "reliability"]
    results = await asyncio.gather(
        *(mesh.invoke("research", {"topic": topic, "angle": angle}) for angle in angles)
    )
    steps = [
        Step(capability="research", served_by=r.instance_id, detail=f"angle={a}")
        for a, r in zip(angles, results, strict=True)
    ]
    facts = [fact for r in results for fact in r.value["facts"]]
    summary = await mesh.invoke("summarize", {"text": " ".join(facts), "max_words": 45})
    steps.append(
        Step(capability="summarize", served_by=summary.instance_id, detail=f"{len(facts)} facts")
    )
    return Report(topic=topic, summary=summary.value["text"], facts=len(facts), steps=steps)


agent = Agent("planner", version="1.0.0", labels={"team": "orchestration"}, capabilities=[plan])
