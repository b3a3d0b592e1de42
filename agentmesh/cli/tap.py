"""``agentmesh tap``: every call of a capability as the serving sidecars see it, live.

It talks to the sidecars over NATS directly: they publish a tapped capability's calls only while
a tap keeps announcing itself, so an abandoned tap costs nothing after its TTL."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape

from agentmesh.cli._common import (
    ControlUrl,
    Output,
    err_console,
    millis,
    settings_from,
)
from agentmesh.models import (
    TapAck,
    TapEvent,
    TapRequest,
)
from agentmesh.settings import Settings

if TYPE_CHECKING:
    from nats.aio.msg import Msg


__all__ = ["register", "tap"]

#: How often ``tap`` re-announces itself, and how long sidecars keep tapping without news.
_TAP_ANNOUNCE = 1.0
_TAP_TTL = 3.0
#: Events received but not printed yet; past it new ones are dropped (and the count shown):
#: a terminal slower than the tapped sidecars must not grow this process without end.
_TAP_BACKLOG = 1000
#: Instances whose acknowledgements are remembered; more are not named (any NATS client that
#: reads the announcement can answer it, under any instance id).
_TAP_ACKS = 1000


def register(app: typer.Typer) -> None:
    app.command("tap")(tap)


def tap(
    capability: Annotated[str, typer.Argument(help="Capability whose calls to show.")],
    payloads: Annotated[
        bool,
        typer.Option(
            help="Show request and response bodies, where the serving agent allows it "
            "(AGENTMESH_TAP_PAYLOADS=true on that agent)."
        ),
    ] = False,
    max_events: Annotated[
        int | None, typer.Option("--max", min=1, help="Stop after this many calls.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Stop after this many seconds.")
    ] = None,
    output: Annotated[
        Output, typer.Option("--output", "-o", help="table (one line per call) or json lines.")
    ] = Output.table,
    control_url: ControlUrl = None,
    nats_url: Annotated[
        str | None, typer.Option(help="NATS URL; skips the control plane (AGENTMESH_NATS_URL).")
    ] = None,
) -> None:
    """Watch calls of a capability live: time, caller, serving instance, status, duration, trace.

    The sidecars serving CAPABILITY publish its calls only while a tap runs (and stop a few
    seconds after it ends), so tapping costs nothing the rest of the time.
    """
    settings = settings_from(control_url=control_url, nats_url=nats_url)
    asyncio.run(_tap(settings, capability, payloads, max_events, duration, output))


async def _tap(
    settings: Settings,
    capability: str,
    payloads: bool,
    max_events: int | None,
    duration: float | None,
    output: Output,
) -> None:
    from agentmesh.security.nats_client import client_connection
    from agentmesh.sidecar.bootstrap import bootstrap
    from agentmesh.telemetry.stats import tap_control_subject, tap_subject

    boot = await bootstrap(settings)
    tapper = f"tap-{socket.gethostname()}-{os.getpid()}"
    conn = await client_connection(
        settings, boot.nats_url, boot.registry_bucket, name=f"agentmesh-{tapper}"
    )
    loop = asyncio.get_running_loop()
    events = _Backlog(_TAP_BACKLOG)
    acks: dict[str, TapAck] = {}
    first_ack = asyncio.Event()
    announced = False

    async def on_event(msg: Msg) -> None:
        events.put(msg.data)

    async def on_ack(msg: Msg) -> None:
        try:
            ack = TapAck.model_validate_json(msg.data)
        except ValidationError:
            return
        new = ack.instance_id not in acks
        if new and len(acks) >= _TAP_ACKS:
            return
        acks[ack.instance_id] = ack
        first_ack.set()
        if new and announced:
            err_console.print(
                f"tapping {escape(ack.instance_id)} too", highlight=False, soft_wrap=True
            )
            _payload_note(payloads, [ack])

    try:
        nc = conn.client
        await conn.subscribe(tap_subject(boot.registry_bucket, capability), cb=on_event)
        inbox = nc.new_inbox()
        await conn.subscribe(inbox, cb=on_ack)
        request = TapRequest(
            capability=capability, payloads=payloads, ttl=_TAP_TTL, tapper=tapper
        ).model_dump_json()

        async def announce() -> None:
            while True:
                try:
                    await nc.publish(
                        tap_control_subject(boot.registry_bucket), request.encode(), reply=inbox
                    )
                except Exception as exc:  # NATS blips: the next announcement retries
                    err_console.print(
                        f"tap announcement failed: {exc}", highlight=False, soft_wrap=True
                    )
                await asyncio.sleep(_TAP_ANNOUNCE)

        announcer = loop.create_task(announce())
        try:
            try:
                async with asyncio.timeout(1.0):
                    await first_ack.wait()
                await asyncio.sleep(0.2)  # let the other instances answer too
            except TimeoutError:
                pass
            _announce_tap(capability, acks, payloads)
            announced = True
            await _print_events(events, max_events, duration, payloads, output)
        finally:
            announcer.cancel()
    finally:
        await conn.close()


def _announce_tap(capability: str, acks: dict[str, TapAck], payloads: bool) -> None:
    if acks:
        names = ", ".join(sorted(acks))
        err_console.print(
            f"tapping {escape(capability)!r} on {len(acks)} instance(s): {escape(names)} "
            "(Ctrl-C to stop)",
            highlight=False,
            soft_wrap=True,
        )
        _payload_note(payloads, list(acks.values()))
    else:
        err_console.print(
            f"tapping {escape(capability)!r}: no instance serves it yet; waiting (Ctrl-C to stop)",
            highlight=False,
            soft_wrap=True,
        )


def _payload_note(payloads: bool, acks: list[TapAck]) -> None:
    withheld = sorted(a.instance_id for a in acks if not a.payloads)
    if payloads and withheld:
        err_console.print(
            f"payloads withheld by {escape(', '.join(withheld))}: start that agent with "
            "AGENTMESH_TAP_PAYLOADS=true to allow them",
            highlight=False,
            soft_wrap=True,
        )


class _Backlog:
    """Tap events waiting to be printed: at most ``limit``, new ones dropped and counted."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(limit)
        self.dropped = 0

    def put(self, data: bytes) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1

    async def get(self) -> bytes:
        """The next event; first says how many were dropped since the last one, if any."""
        data = await self.queue.get()
        if self.dropped:
            err_console.print(
                f"({self.dropped} calls not shown: this terminal fell behind the sidecars)",
                highlight=False,
                soft_wrap=True,
            )
            self.dropped = 0
        return data


async def _print_events(
    events: _Backlog,
    max_events: int | None,
    duration: float | None,
    payloads: bool,
    output: Output,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    shown = 0
    while max_events is None or shown < max_events:
        timeout = None if deadline is None else deadline - loop.time()
        if timeout is not None and timeout <= 0:
            return
        try:
            async with asyncio.timeout(timeout):
                data = await events.get()
        except TimeoutError:
            return
        try:
            event = TapEvent.model_validate_json(data)
        except ValidationError:
            continue
        shown += 1
        if output is Output.json:
            if not payloads:
                event = event.model_copy(update={"request": None, "response": None})
            print(event.model_dump_json(exclude_none=True), flush=True)
            continue
        print(_tap_line(event), flush=True)
        if payloads and event.request is not None:
            print(f"    > {event.request}", flush=True)
        if payloads and event.response is not None:
            print(f"    < {event.response}", flush=True)


def _tap_line(event: TapEvent) -> str:
    at = event.at.astimezone().strftime("%H:%M:%S.%f")[:-3]
    duration = millis(event.duration_ms)
    trace = event.trace_id or "-"
    return (
        f"{at}  {event.caller} -> {event.instance_id}  {event.status}  {duration:>9}  trace={trace}"
    )
