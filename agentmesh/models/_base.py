"""What every wire model shares: the model configuration and the name patterns."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

__all__ = [
    "AGENT_NAME_PATTERN",
    "AGENT_NAME_RE",
    "CAPABILITY_NAME_PATTERN",
    "CAPABILITY_NAME_RE",
    "RequestBody",
    "Wire",
]


#: Agent names become SPIFFE path segments and KV keys: a DNS label keeps them portable.
AGENT_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"

#: Capability names are Python identifiers, optionally dotted (``nlp.summarize``).
CAPABILITY_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$"
AGENT_NAME_RE = re.compile(AGENT_NAME_PATTERN)
CAPABILITY_NAME_RE = re.compile(CAPABILITY_NAME_PATTERN)


class Wire(BaseModel):
    # defer_build: a model's validator and serializer are built when it is first used, not at
    # import. Every process imports all of these shapes and uses a few (an agent: its record
    # and a bootstrap), and building them all at import was a noticeable share of an agent's
    # start-up (docs/benchmarks.md).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class RequestBody(Wire):
    """A request body of the control plane's API, built at import (no defer_build).

    FastAPI wraps a body parameter's model in ``Annotated[Model, Field(alias=...)]``; for a model
    whose schema is deferred, pydantic then builds it with the alias where it means nothing and
    warns (``UnsupportedFieldAttributeWarning``) at every control plane start.
    """

    model_config = ConfigDict(defer_build=False)
