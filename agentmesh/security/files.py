"""Secrets the control plane keeps in its data dir, and how local processes find them.

======================  =============================================================  =====
file                    what                                                           mode
======================  =============================================================  =====
``admin-token``         bearer token of the control plane's admin API                 0600
``join-token``          multi-use join token: local agents and clients enrol with it   0600
``ca/``                 the self-managed CA (see ``agentmesh.control.ca``)             0700
``roots.pem``           the mesh's root certificates (public): what local processes   0644
                        verify the control plane's HTTPS certificate by
======================  =============================================================  =====

A process of the same user with the same ``AGENTMESH_DATA_DIR`` reads them, so on one machine
``agentmesh control`` + ``agentmesh run`` need no configuration while everything is
authenticated; other users cannot read them. The data dir is made 0700; a key or token file
that other users could read is an error naming it (:func:`check_private`), never silently used.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from agentmesh.errors import ConfigurationError
from agentmesh.settings import Settings

__all__ = [
    "ADMIN_TOKEN_FILE",
    "JOIN_TOKEN_FILE",
    "ROOTS_FILE",
    "admin_token",
    "check_private",
    "ensure_admin_token",
    "ensure_private_dir",
    "read_secret",
    "write_private",
    "write_public",
]

ADMIN_TOKEN_FILE = "admin-token"
JOIN_TOKEN_FILE = "join-token"
ROOTS_FILE = "roots.pem"


def ensure_private_dir(path: Path) -> Path:
    """``path`` as a directory, created 0700 (its parents as usual) if it does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)  # whatever the umask
    return path


def check_private(path: Path) -> None:
    """Refuse a key or token file that other users can read or write (it may have leaked)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise ConfigurationError(
            f"{path} is accessible to other users (mode {mode:04o}); it holds a key or token: "
            f"make it private with `chmod 600 {path}` (and consider it exposed: replace it)"
        )


def write_private(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` readable by this user only (0600, directory 0700), atomically."""
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_public(path: Path, data: bytes) -> None:
    """Write a file anyone may read (certificates), atomically, in a private directory."""
    write_private(path, data, mode=0o644)


def read_secret(path: Path) -> str | None:
    """The stripped content of a secret file, or None if it is missing or unreadable.

    ConfigurationError if other users can read it (:func:`check_private`)."""
    check_private(path)
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
