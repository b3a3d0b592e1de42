"""TLS through memory BIOs: the read loop and the close the outbound pool and the agent share.

Both ends of a mesh call run TLS on ``ssl.SSLObject`` over ``ssl.MemoryBIO`` rather than
asyncio's TLS transport (see ``agentmesh/sidecar/http1.py`` and ``agentmesh/inbound/tls.py``
for why); what they do with the plaintext, and with a broken stream, differs.
"""

from __future__ import annotations

import contextlib
import ssl

__all__ = ["close_notify", "read_plaintext"]


def read_plaintext(tls: ssl.SSLObject, incoming: ssl.MemoryBIO) -> tuple[bytes, bool]:
    """Everything ``incoming`` holds, decrypted: ``(plaintext, the peer sent close_notify)``.

    Stops when the BIO is empty rather than at ``SSLWantReadError`` (raising an exception on every
    call costs more than the check); a partial record stays in the BIO for the next read. ``read``
    returns ``b""`` for a close_notify (``SSLZeroReturnError`` only in some states). A broken stream
    raises ``ssl.SSLError``.
    """
    chunks = []
    closed = False
    while incoming.pending or tls.pending():
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            break
        except ssl.SSLZeroReturnError:
            chunk = b""
        if not chunk:
            closed = True
            break
        chunks.append(chunk)
    return b"".join(chunks), closed


def close_notify(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO) -> bytes:
    """The bytes to write before closing: anything pending, then our ``close_notify`` alert.

    Without the alert the peer cannot tell a close from a truncation (RFC 8446 §6.1).
    ``unwrap`` then waits for the peer's alert (``SSLWantReadError``), which nobody needs: the
    connection is being closed.
    """
    with contextlib.suppress(ssl.SSLError):
        tls.unwrap()
    return outgoing.read()
