"""The control plane's own copy of the signed state it last wrote or verified, on its disk.

NATS may lose or be given forged state while the control plane is down; without a copy of its
own, a restarted control plane would start from nothing and its next write (a revocation, a
policy) would drop everything before it. So each signed document it takes is also kept under
``<data dir>/state/`` (0600, next to the CA key it is signed with), and read back at start as
the last good state: a newer correctly signed one in NATS still wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from agentmesh.models import SignedState
from agentmesh.security.files import write_private

__all__ = ["KEPT_REVOCATIONS", "STATE_DIR", "keep", "kept"]

_log = logging.getLogger("agentmesh.control")

#: The directory, in the control plane's data dir, of the state it keeps.
STATE_DIR = "state"
#: The revocation list's file there (``agentmesh nats-config`` preloads it into NATS too).
KEPT_REVOCATIONS = "revocations.json"


def kept(path: Path | None) -> bytes | None:
    """The document kept at ``path`` (to be verified by the caller), or None."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("cannot read the kept signed state %s: %s", path, exc)
        return None


def keep(path: Path | None, state: SignedState) -> None:
    """Keep ``state`` at ``path`` (nothing without a path: a process without a data dir)."""
    if path is None:
        return
    try:
        write_private(path, state.model_dump_json().encode())
    except (OSError, ValidationError) as exc:
        _log.warning("cannot keep the signed state in %s: %s", path, exc)
