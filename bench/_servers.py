"""Server-side processes of the baselines, run as ``python bench/_servers.py KIND [ARGS]``.

Each server runs in its own process so that its CPU and memory can be read from /proc
apart from the benchmarking client, and so that client and server contend for the CPU
the way two real processes do. This file is executed by path, not imported: it must only
import third-party packages, never ``bench.*`` (the child's ``sys.path`` is ``bench/``).

Readiness protocol: the child prints exactly one line on stdout (``PORT <n> ...`` or
``READY ...``), then points its stdout at stderr (a log file owned by the parent), so a
pipe that nobody reads any more can never fill up and freeze the server. The parent still
polls with real calls until the server answers, because "bound" is not "serving".

Kinds:

``asgi``
    A raw ASGI echo app (no framework) on uvicorn: the floor of what HTTP on uvicorn costs.
``fastapi``
    A FastAPI endpoint that takes and returns a pydantic model: what a user writes
    without a mesh.
``nats-responder URL SUBJECT``
    A nats-py subscriber that replies with the request's data.
"""

import asyncio
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOOP_IMPL = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
"""uvloop only when installed, and then for every server alike (the harness reports it)."""
HTTP_IMPL = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
"""uvicorn's HTTP/1.1 parser: httptools when installed, else the pure-Python h11."""
KEEP_ALIVE_S = 300
"""Longer than any pause between a target's rounds: uvicorn's default (5 s) would close
idle keep-alive connections while the other targets run, and the next round would pay
for reconnecting (or hit a stale-connection race in the client)."""


def _announce(line: str) -> None:
    """Print the one readiness line, then send any later stdout to stderr (the log file)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


async def raw_echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo the request body with a JSON content type: the least work an HTTP server can do."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_fastapi_app() -> Any:
    """A FastAPI app with ``POST /echo`` taking and returning a pydantic model.

    The model mirrors ``bench.workloads.make_payload``: FastAPI validates the request into
    it, and validates and serialises the response from it, as a user's endpoint would.
    Imports stay inside so the other kinds do not pay for (or get charged the memory of)
    FastAPI and pydantic; this module has no ``from __future__ import annotations`` so
    that FastAPI sees the local model class, not a string it cannot resolve.
    """
    from fastapi import FastAPI
    from pydantic import BaseModel

    class EchoBody(BaseModel):
        id: int
        agent: str
        tags: list[str]
        params: dict[str, float]
        text: str

    app = FastAPI()

    @app.post("/echo")
    async def echo(body: EchoBody) -> EchoBody:
        return body

    return app


def serve_uvicorn(app: Any, *, lifespan: str) -> None:
    """Serve ``app`` on 127.0.0.1 with an ephemeral port we bind ourselves to learn it."""
    import uvicorn

    # proto=IPPROTO_TCP is not cosmetic: asyncio sets TCP_NODELAY on accepted connections
    # only when sock.proto == IPPROTO_TCP, and a plain socket(AF_INET, SOCK_STREAM) has
    # proto 0. Without it, uvicorn's separate header and body writes meet Nagle + delayed
    # ACK and every response waits for the delayed-ACK timer (tens of milliseconds).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        loop=LOOP_IMPL,
        http=HTTP_IMPL,
        lifespan=lifespan,  # type: ignore[arg-type]
        access_log=False,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    _announce(f"PORT {port} loop={LOOP_IMPL} http={HTTP_IMPL}")
    server.run(sockets=[sock])


async def nats_responder(url: str, subject: str) -> None:
    """Reply to every request on ``subject`` with its data, until SIGTERM or SIGINT."""
    import nats

    nc = await nats.connect(url, name="bench-responder", allow_reconnect=False)

    async def on_request(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=on_request)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _announce(f"READY subject={subject} loop={LOOP_IMPL}")
    await stop.wait()
    await nc.close()


def main(argv: list[str]) -> int:
    """Dispatch on the kind of server; usage errors exit 2."""
    if len(argv) >= 2 and argv[1] == "asgi":
        serve_uvicorn(raw_echo_app, lifespan="off")
        return 0
    if len(argv) >= 2 and argv[1] == "fastapi":
        serve_uvicorn(build_fastapi_app(), lifespan="on")
        return 0
    if len(argv) == 4 and argv[1] == "nats-responder":
        if LOOP_IMPL == "uvloop":  # only when installed; imported by name to keep mypy quiet
            importlib.import_module("uvloop").install()
        asyncio.run(nats_responder(argv[2], argv[3]))
        return 0
    print(f"usage: {argv[0]} asgi | fastapi | nats-responder URL SUBJECT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
