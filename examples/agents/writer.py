"""A writer agent with a streaming capability: drafts a text paragraph by paragraph."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel

from agentmesh import capability

_OPENERS = [
    "Every agent deserves to be found by what it can do",
    "Calls between agents fail, and the mesh decides what can be hidden",
    "Nothing crosses the mesh unseen",
    "Trust is earned per hop, not per network",
]


class Paragraph(BaseModel):
    index: int
    text: str


@capability(version="0.3.0", tags=["writing", "en"])
async def draft(topic: str, paragraphs: int = 3) -> AsyncIterator[Paragraph]:
    """Stream a draft about a topic, one paragraph at a time.

    Args:
        topic: What the draft is about.
        paragraphs: How many paragraphs to write (1-10).
    """
    for i in range(max(1, min(paragraphs, 10))):
        await asyncio.sleep(0.05)
        opener = _OPENERS[i % len(_OPENERS)]
        yield Paragraph(index=i, text=f"{opener}: on {topic}, part {i + 1}.")
