"""Secrets the control plane keeps in its data dir, and how local processes find them.

======================  =============================================================  =====
file                    what                                                           mode
======================  =============================================================  =====
``admin-token``         bearer token of the control plane's admin API                 0600
``join-token``          multi-use join token: local agents and clients enrol with it   0600
``ca/``                 the self-managed CA (see ``agentmesh.control.ca``)             0700
======================  =============================================================  =====

A process of the same user with the same ``AGENTMESH_DATA_DIR`` reads them, so on one machine
``agentmesh control`` + ``agentmesh run`` need no configuration while everything is
authenticated; other users cannot read them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from agentmesh.settings import Settings

__all__ = [
    "ADMIN_TOKEN_FILE",
    "JOIN_TOKEN_FILE",
    "admin_token",
    "ensure_admin_token",
    "read_secret",
    "write_private",
]

ADMIN_TOKEN_FILE = "admin-token"
JOIN_TOKEN_FILE = "join-token"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by this user only (0600, directory 0700), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def read_secret(path: Path) -> str | None:
    """The stripped content of a secret file, or None if it is missing or unreadable."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def admin_token(settings: Settings) -> str | None:
    """``AGENTMESH_TOKEN``, else the control plane's token file in the data dir."""
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value()
    return read_secret(settings.data_dir / ADMIN_TOKEN_FILE)


def ensure_admin_token(settings: Settings) -> str:
    """The control plane's admin token: ``AGENTMESH_TOKEN``, else the file (created once)."""
    token = admin_token(settings)
    if token is None:
        token = secrets.token_urlsafe(32)
        write_private(settings.data_dir / ADMIN_TOKEN_FILE, token.encode() + b"\n")
    return token
