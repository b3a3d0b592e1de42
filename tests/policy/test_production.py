"""The production profile: zero trust, a call no AccessPolicy allows is denied."""

from __future__ import annotations

import pytest

from agentmesh import PolicyDenied, Settings, capability

from .conftest import access_policy, call_unchecked, sources_for, until_applied


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings (fast leases, the test's bucket, mTLS) in the production profile."""
    return Settings(**{**settings.model_dump(), "profile": "production"})


@capability
async def ping() -> str:
    return "pong"


def test_the_profile_sets_the_default_and_default_access_overrides_it(settings: Settings):
    assert settings.access_default == "deny"
    assert Settings(profile="production", default_access="allow").access_default == "allow"
    assert Settings().access_default == "allow"
    assert Settings(default_access="deny").access_default == "deny"


async def test_default_deny_until_a_policy_allows(
    start_agent, mesh_as, apply, mesh, settings, wait_until
):
    server = await start_agent([ping], name="pinger")
    planner, intruder = await mesh_as("planner"), await mesh_as("intruder")
    assert server.agent.mesh is not None
    assert server.agent.mesh.sidecar.policies.default == "deny"
    with pytest.raises(PolicyDenied, match="the default action is deny") as denied:
        await planner.call("ping")
    assert denied.value.errors
    assert denied.value.errors[0]["rule"] == "default-deny"
    with pytest.raises(PolicyDenied, match="the default action is deny"):
        await call_unchecked(planner, settings, "ping")

    await apply(
        access_policy(
            "ping-access",
            {
                "name": "planner-may-ping",
                "action": "allow",
                "sources": sources_for("planner"),
                "targets": [{"capability": "ping"}],
            },
        )
    )
    await until_applied(wait_until, server, planner, present=("ping-access",))
    assert await planner.call("ping") == "pong"
    with pytest.raises(PolicyDenied, match="rule 'planner-may-ping'"):
        await call_unchecked(intruder, settings, "ping")
