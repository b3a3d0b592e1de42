"""Tap: sidecars publish a capability's calls only while someone taps it; ``agentmesh tap``.

Real NATS, in-process agents on real HTTP, and the CLI as a real process.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from typer.testing import CliRunner

from agentmesh import InvalidInput, Mesh, Settings, capability
from agentmesh.cli import app
from agentmesh.models import TapAck, TapEvent, TapRequest
from agentmesh.telemetry.stats import tap_control_subject, tap_subject
from tests.control.control_process import arun_cli, cli_env


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings, with payloads tappable (AGENTMESH_TAP_PAYLOADS=true)."""
    return settings.model_copy(update={"tap_payloads": True})


@pytest.fixture(autouse=True)
def _tracing() -> None:
    """An SDK tracer provider, as ``agentmesh run`` installs, so calls have trace ids.

    The same one ``test_tracing`` installs: OpenTelemetry allows one per process.
    """
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_ON))


@capability
async def echo(text: str) -> str:
    return text


async def test_sidecars_publish_calls_only_while_tapped(
    start_agent, mesh: Mesh, nats_url: str, bucket: str, wait_until
):
    running = await start_agent([echo], name="echoer")
    assert running.agent.mesh is not None
    stats = running.agent.mesh.sidecar.stats
    nc = await nats.connect(nats_url)
    events: list[TapEvent] = []

    async def on_event(msg) -> None:
        events.append(TapEvent.model_validate_json(msg.data))

    async def tap(payloads: bool, capability: str = "echo") -> TapAck:
        request = TapRequest(capability=capability, payloads=payloads, ttl=1.0, tapper="test")
        reply = await nc.request(
            tap_control_subject(bucket), request.model_dump_json().encode(), timeout=2
        )
        return TapAck.model_validate_json(reply.data)

    try:
        await nc.subscribe(tap_subject(bucket, "echo"), cb=on_event)
        await nc.flush()

        await mesh.call("echo", {"text": "unseen"})
        await asyncio.sleep(0.3)
        assert events == [], "nobody taps: nothing is published"

        ack = await tap(payloads=True)
        assert ack == TapAck(instance_id=running.instance_id, agent="echoer", payloads=True)
        await mesh.call("echo", {"text": "seen"})
        with pytest.raises(InvalidInput):
            await mesh.call("echo", {"text": 5})
        await wait_until(lambda: len(events) == 2)
        ok, refused = events
        assert (ok.capability, ok.agent, ok.instance_id, ok.caller) == (
            "echo",
            "echoer",
            running.instance_id,
            "client",
        )
        assert (ok.status, refused.status) == (200, 422)
        assert ok.trace_id is not None
        assert re.fullmatch(r"[0-9a-f]{32}", ok.trace_id)
        assert ok.duration_ms > 0
        assert (ok.request, ok.response) == ('{"text":"seen"}', '"seen"')
        assert refused.request == '{"text":5}'
        assert refused.response is None

        await asyncio.sleep(1.3)  # the tap's TTL runs out without a new announcement
        await mesh.call("echo", {"text": "after the tap"})
        await asyncio.sleep(0.3)
        assert len(events) == 2, "a stale tap publishes nothing"

        stats.tap_payloads = False  # as AGENTMESH_TAP_PAYLOADS=false
        assert (await tap(payloads=True)).payloads is False
        await mesh.call("echo", {"text": "secret"})
        await wait_until(lambda: len(events) == 3)
        assert events[2].request is None
        assert events[2].response is None

        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await tap(payloads=False, capability="nobody_serves_this")
    finally:
        await nc.close()


async def test_tap_prints_calls_as_they_happen(
    start_agent, mesh: Mesh, nats_url: str, bucket: str, tmp_path: Path, wait_until
):
    running = await start_agent([echo], name="echoer")
    env = cli_env(
        {
            "AGENTMESH_NATS_URL": nats_url,
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9",
        }
    )
    out, err = tmp_path / "tap.out", tmp_path / "tap.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "agentmesh", "tap", "echo", "--payloads", "--max", "3"),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        banner = f"tapping 'echo' on 1 instance(s): {running.instance_id}"
        await wait_until(lambda: banner in err.read_text(), timeout=20, interval=0.05)
        await mesh.call("echo", {"text": "one"})
        await mesh.call("echo", {"text": "two"})
        with pytest.raises(InvalidInput):
            await mesh.call("echo", {"text": 3})
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.read_text()
    lines = out.read_text().splitlines()
    calls = [line for line in lines if not line.startswith("    ")]
    assert len(calls) == 3, lines
    pattern = (
        r"\d\d:\d\d:\d\d\.\d{3}  client -> " + re.escape(running.instance_id) + r"  (\d{3})  "
        r"\s*[\d.]+m?s  trace=[0-9a-f]{32}"
    )
    statuses = []
    for line in calls:
        match = re.fullmatch(pattern, line)
        assert match, line
        statuses.append(match.group(1))
    assert statuses == ["200", "200", "422"]
    assert '    > {"text":"one"}' in lines
    assert '    < "one"' in lines
    assert '    > {"text":3}' in lines


async def test_tapping_a_capability_nobody_serves_waits_then_stops(
    nats_url: str, bucket: str, tmp_path: Path
):
    env = cli_env(
        {
            "AGENTMESH_NATS_URL": nats_url,
            "AGENTMESH_REGISTRY_BUCKET": bucket,
            "AGENTMESH_CONTROL_URL": "http://127.0.0.1:9",
        }
    )
    done = await arun_cli("tap", "nobody_serves_this", "--duration", "0.5", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "tapping 'nobody_serves_this': no instance serves it yet; waiting" in done.stderr


@pytest.mark.parametrize("command", ["stat", "top", "tap", "check"])
def test_each_observe_command_has_help(command: str):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert command in result.output
