"""Access policies enforced by real sidecars: in-process agents on real HTTP, real NATS KV.

Callers are Mesh clients with distinct names (``mesh_as``); the policies match them by name and
by SPIFFE ID, so these tests keep their meaning once identities are verified by mTLS.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from agentmesh import Agent, Mesh, PolicyDenied, RemoteAgentError, Settings, capability

from .conftest import (
    TRUST_DOMAIN,
    access_policy,
    call_unchecked,
    delete,
    put_signed,
    sources_for,
    until_applied,
)

RUNS: dict[str, int] = {}
#: How the receiving sidecar knows the intruder client: its verified identity (mTLS is on).
INTRUDER = f"spiffe://{TRUST_DOMAIN}/client/intruder"


@capability(version="1.2.0", tags=["nlp", "en"])
async def summarize(text: str = "") -> str:
    RUNS["summarize"] = RUNS.get("summarize", 0) + 1
    return text[:10]


@capability
async def echo(text: str = "") -> str:
    RUNS["echo"] = RUNS.get("echo", 0) + 1
    return text


@capability
async def relay(mesh: Mesh, text: str = "") -> str:
    """Calls summarize from inside an agent: the caller is this agent, with its labels."""
    result: str = await mesh.call("summarize", {"text": text})
    return result


def allow_planner() -> dict:
    return access_policy(
        "summarize-access",
        {
            "name": "planner-may-summarize",
            "action": "allow",
            "sources": sources_for("planner"),
            "targets": [{"capability": "summarize", "version": ">=1,<2"}],
        },
    )


@pytest.fixture(autouse=True)
def _count_runs():
    RUNS.clear()


async def test_one_caller_allowed_another_denied_with_the_rule_named(
    start_agent, mesh_as, apply, mesh, settings: Settings, wait_until
):
    server = await start_agent([summarize, echo], name="summarizer")
    planner, intruder = await mesh_as("planner"), await mesh_as("intruder")
    await apply(allow_planner())
    await until_applied(wait_until, server, planner, intruder, present=("summarize-access",))

    assert await planner.call("summarize", {"text": "hello world, again"}) == "hello worl"
    assert RUNS == {"summarize": 1}

    # The sending sidecar fails fast: the call never leaves the process.
    with pytest.raises(PolicyDenied) as denied:
        await intruder.call("summarize", {"text": "x"})
    assert f"caller {INTRUDER} may not call 'summarize' 1.2.0" in str(denied.value)
    assert "AccessPolicy 'summarize-access' rule 'planner-may-summarize'" in str(denied.value)
    assert denied.value.errors == [
        {"policy": "summarize-access", "rule": "planner-may-summarize", "caller": INTRUDER}
    ]
    assert denied.value.status == 403
    # The receiving sidecar decides for good, on its own: a call that skips the sender's check
    # is refused with a 403 problem document naming the rule, before the capability runs.
    with pytest.raises(PolicyDenied) as refused:
        await call_unchecked(intruder, settings, "summarize")
    assert f"agent {server.instance_id} at {server.endpoint}" in str(refused.value)
    assert f"caller {INTRUDER} may not call" in str(refused.value)  # the verified identity
    assert "rule 'planner-may-summarize'" in str(refused.value)
    assert refused.value.errors
    assert refused.value.errors[0]["policy"] == "summarize-access"
    assert RUNS == {"summarize": 1}
    # Other capabilities of the same agent are not covered by the policy (dev profile: allow).
    assert await intruder.call("echo", {"text": "hi"}) == "hi"


async def test_denial_is_never_retried(start_agent, mesh_as, apply, settings, wait_until):
    a = await start_agent([summarize], name="summarizer-a")
    b = await start_agent([summarize], name="summarizer-b")
    intruder = await mesh_as("intruder")
    await apply(allow_planner())
    await until_applied(wait_until, a, b, intruder, present=("summarize-access",))
    with pytest.raises(PolicyDenied):
        await intruder.call("summarize", retries=5)
    assert intruder.sidecar.outbound.retry.retries == 0
    # Receiving side: two instances; a denial from the first is final, the other is not tried.
    with pytest.raises(PolicyDenied) as refused:
        await call_unchecked(intruder, settings, "summarize")
    assert "attempts" not in str(refused.value)  # no "(after N attempts)"
    assert RUNS == {}


async def test_deny_rules_win_over_allow_rules(
    start_agent, mesh_as, apply, mesh, settings, wait_until
):
    server = await start_agent([summarize], name="summarizer")
    scraper = await start_agent(
        Agent("scraper", capabilities=[relay], labels={"trust": "untrusted"})
    )
    planner = await mesh_as("planner")
    # ALLOW for everyone first, DENY for untrusted labels after it: order does not matter.
    await apply(
        access_policy(
            "everyone",
            {
                "name": "anyone-may-summarize",
                "action": "allow",
                # every agent, and every client (a verified client has no agent name)
                "sources": [{"agent": "*"}, {"spiffe": f"spiffe://{TRUST_DOMAIN}/client/*"}],
                "targets": [{"capability": "summarize"}],
            },
        )
    )
    await apply(
        access_policy(
            "untrusted",
            {
                "name": "no-untrusted",
                "action": "deny",
                "sources": [{"labels": {"trust": "untrusted"}}],
                "targets": [{"capability": "*"}],
            },
        )
    )
    await until_applied(
        wait_until, server, scraper, planner, mesh, present=("everyone", "untrusted")
    )
    assert await planner.call("summarize", {"text": "fine"}) == "fine"
    # scraper (an agent labelled trust=untrusted) calls summarize from inside its capability:
    # its own sidecar denies, and the capability reports it.
    with pytest.raises(RemoteAgentError, match=r"PolicyDenied.*rule 'no-untrusted'"):
        await mesh.call("relay", {"text": "x"})
    # The receiver reaches the same decision from the caller's registry labels.
    with pytest.raises(PolicyDenied, match="AccessPolicy 'untrusted' rule 'no-untrusted'"):
        await call_unchecked(scraper, settings, "summarize")
    assert RUNS == {"summarize": 1}


async def test_a_policy_change_reaches_every_sidecar_within_a_second_without_restarts(
    start_agent, mesh_as, apply, mesh, settings, wait_until
):
    servers = [
        await start_agent([summarize], name="summarizer"),
        await start_agent([echo], name="echoer"),
    ]
    planner, intruder = await mesh_as("planner"), await mesh_as("intruder")
    everyone = (*servers, planner, intruder, mesh)
    assert await intruder.call("summarize") == ""
    block = access_policy(
        "block-intruder",
        {
            "name": "no-intruder",
            "action": "deny",
            "sources": sources_for("intruder"),
            "targets": [{"capability": "*"}],
        },
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await apply(block)
    await until_applied(wait_until, *everyone, present=("block-intruder",), timeout=1.0)
    assert loop.time() - started < 1.0
    for name in ("summarize", "echo"):
        with pytest.raises(PolicyDenied, match="rule 'no-intruder'"):
            await intruder.call(name)
        with pytest.raises(PolicyDenied, match="rule 'no-intruder'"):
            await call_unchecked(intruder, settings, name)
    assert await planner.call("echo", {"text": "ok"}) == "ok"

    started = loop.time()
    await delete(mesh, "block-intruder")
    await until_applied(wait_until, *everyone, absent=("block-intruder",), timeout=1.0)
    assert loop.time() - started < 1.0
    assert await intruder.call("echo", {"text": "back"}) == "back"
    assert await call_unchecked(intruder, settings, "summarize") == ""


async def test_invalid_policies_fail_closed_and_never_crash_a_sidecar(
    start_agent, mesh_as, mesh, settings, wait_until, caplog
):
    caplog.set_level(logging.WARNING, logger="agentmesh.policy")
    server = await start_agent([summarize, echo], name="summarizer")
    planner = await mesh_as("planner")
    everyone = (server, planner, mesh)

    # Bytes that are no policy at all (signed by a control plane of another version): what
    # they would cover cannot be told, so they cover everything.
    await put_signed(mesh, "broken", b"{not json")
    await until_applied(wait_until, *everyone, present=("broken",))
    for name in ("summarize", "echo"):
        with pytest.raises(PolicyDenied, match="'broken' is invalid and fails closed"):
            await planner.call(name)
        with pytest.raises(PolicyDenied, match="'broken' is invalid and fails closed"):
            await call_unchecked(planner, settings, name)
    assert any("fails closed" in r.getMessage() for r in caplog.records)

    # A policy that names its target but does not validate denies just that target.
    narrow = access_policy(
        "narrow",
        {
            "name": "typo",
            "action": "allow",
            "sources": [{"agnet": "planner"}],
            "targets": [{"capability": "summarize"}],
        },
    )
    import json

    await put_signed(mesh, "narrow", json.dumps(narrow).encode())
    await delete(mesh, "broken")
    await until_applied(wait_until, *everyone, present=("narrow",), absent=("broken",))
    with pytest.raises(PolicyDenied, match=r"AccessPolicy 'narrow' is invalid .*agnet"):
        await planner.call("summarize")
    with pytest.raises(PolicyDenied, match="'narrow' is invalid"):
        await call_unchecked(planner, settings, "summarize")
    assert await planner.call("echo", {"text": "still"}) == "still"
    assert RUNS == {"echo": 1}
    # The sidecars are alive and well: fixing the policy restores service.
    await delete(mesh, "narrow")
    await until_applied(wait_until, *everyone, absent=("narrow",))
    assert await planner.call("summarize", {"text": "again"}) == "again"
