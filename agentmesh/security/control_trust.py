"""Trusting the control plane's HTTPS certificate before any token is sent to it.

The control plane serves HTTPS with a certificate from the mesh CA (``agentmesh.control.https``).
Agents, ``agentmesh.connect()`` and the CLI verify it (chain and host name) against, in order:

1. ``AGENTMESH_CONTROL_CA_FILE``: PEM roots given by the operator (a remote CLI with only the
   admin token);
2. ``roots.pem`` in ``AGENTMESH_DATA_DIR``: written by the control plane on its own machine, so
   local processes need no configuration;
3. the root pinned by the join token (``AGENTMESH_JOIN_TOKEN``, else the data dir's
   ``join-token``): the trust bundle is fetched *without* verification — nothing secret travels
   in that request — and must contain the pinned root and be signed by it; its roots are then
   trusted for every request that follows, the token's among them.

An ``http://`` URL (a control plane started with ``--insecure-http``, for development) is used
as is, with a warning; a token is sent over it only to a loopback address, so tokens never travel
in clear across a network.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agentmesh.errors import (
    AuthenticationFailed,
    ConfigurationError,
    MeshError,
    RegistryUnavailable,
)
from agentmesh.security.files import JOIN_TOKEN_FILE, ROOTS_FILE, read_secret
from agentmesh.settings import Settings

if TYPE_CHECKING:
    import httpx

__all__ = [
    "admin_request",
    "control_error",
    "control_verify",
    "control_verify_sync",
    "guard_cleartext",
    "roots_context",
]

_log = logging.getLogger("agentmesh.security")
_warned: set[str] = set()
#: Contexts already built, per (url, where the roots came from): a CLI poll loop or a renewal
#: does not re-read files or re-fetch the bundle.
_contexts: dict[tuple[str, str], ssl.SSLContext] = {}
#: Seconds to fetch the trust bundle when pinning by join token.
_PIN_FETCH_TIMEOUT = 10.0


def _is_https(url: str) -> bool:
    return urlsplit(url).scheme == "https"


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def guard_cleartext(url: str, *, sends_token: bool) -> None:
    """Warn once about an ``http://`` control plane; refuse to send a token to one off this host."""
    if _is_https(url):
        return
    if sends_token and not _loopback(url):
        raise ConfigurationError(
            f"control plane at {url}: refusing to send a token over plain HTTP to another "
            "host; use its https:// URL (`agentmesh control` serves HTTPS unless started with "
            "--insecure-http)"
        )
    if url not in _warned:
        _warned.add(url)
        # On this machine, plain HTTP is a development setup the operator chose; elsewhere it
        # is worth a warning even when no token is sent (the answers are not authenticated).
        _log.log(
            logging.DEBUG if _loopback(url) else logging.WARNING,
            "control plane at %s is plain HTTP (--insecure-http): for development only",
            url,
        )


def roots_context(roots_pem: str) -> ssl.SSLContext:
    """A client context that trusts exactly ``roots_pem`` and checks the host name."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=roots_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _local_roots(settings: Settings) -> tuple[str, str] | None:
    """(PEM roots, where from) without the network: the operator's file or the data dir's."""
    candidates: list[Path] = []
    if settings.control_ca_file is not None:
        candidates.append(settings.control_ca_file)
    candidates.append(settings.data_dir / ROOTS_FILE)
    for path in candidates:
        try:
            text = path.read_text()
        except FileNotFoundError:
            if path == settings.control_ca_file:
                raise ConfigurationError(
                    f"AGENTMESH_CONTROL_CA_FILE {path} does not exist"
                ) from None
            continue
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if "BEGIN CERTIFICATE" not in text:
            raise ConfigurationError(f"{path} holds no PEM certificate")
        return text, str(path)
    return None


def _token(settings: Settings) -> str | None:
    if settings.join_token is not None and settings.join_token.get_secret_value():
        return settings.join_token.get_secret_value()
    return read_secret(settings.data_dir / JOIN_TOKEN_FILE)


def _no_roots(settings: Settings) -> ConfigurationError:
    return ConfigurationError(
        f"cannot verify the control plane at {settings.control_url}: no root to trust. Run "
        f"where its data dir is (AGENTMESH_DATA_DIR; {settings.data_dir} has no {ROOTS_FILE}), "
        "give a join token (AGENTMESH_JOIN_TOKEN, it pins the root) or the root certificate "
        "(AGENTMESH_CONTROL_CA_FILE)"
    )


def _pinned_roots(body: bytes, token: str, url: str) -> str:
    """The bundle's roots as PEM, if it holds the token's pinned root and that root signed it."""
    from pydantic import ValidationError

    from agentmesh.models import TrustBundle
    from agentmesh.security.enrol import check_pinned, parse_token

    pin, _ = parse_token(token)
    try:
        bundle = TrustBundle.model_validate_json(body)
    except ValidationError as exc:
        raise RegistryUnavailable(
            f"control plane at {url} sent an unreadable trust bundle"
        ) from exc
    check_pinned(bundle, pin, url)
    return "".join(bundle.roots)


def _from_cache_or_local(settings: Settings) -> ssl.SSLContext | None:
    local = _local_roots(settings)
    if local is None:
        return None
    text, where = local
    key = (settings.control_url, where)
    if key not in _contexts:
        _contexts[key] = roots_context(text)
    return _contexts[key]


def _pin_key(settings: Settings, token: str) -> tuple[str, str]:
    parts = token.split(".")
    return settings.control_url, "pin:" + (parts[1] if len(parts) == 3 else "?")


def _bundle_url(settings: Settings) -> str:
    return settings.control_url.rstrip("/") + "/v1/trust-bundle"


@dataclass(frozen=True, slots=True)
class _Pin:
    """A join token's pin: what a trust bundle fetched without verification must satisfy."""

    key: tuple[str, str]
    token: str
    url: str

    def trust(self, body: bytes) -> ssl.SSLContext:
        """The bundle's roots as the context to verify by, if the pin holds (kept for reuse)."""
        _contexts[self.key] = roots_context(_pinned_roots(body, self.token, self.url))
        return _contexts[self.key]


def _known(settings: Settings) -> ssl.SSLContext | bool | _Pin:
    """What verifies the control plane without fetching anything, else the pin to fetch for."""
    if not _is_https(settings.control_url):
        guard_cleartext(settings.control_url, sends_token=False)
        return False
    ctx = _from_cache_or_local(settings)
    if ctx is not None:
        return ctx
    token = _token(settings)
    if token is None:
        raise _no_roots(settings)
    key = _pin_key(settings, token)
    return _contexts.get(key) or _Pin(key, token, settings.control_url)


async def control_verify(settings: Settings) -> ssl.SSLContext | bool:
    """What to verify the control plane by (httpx ``verify=``); may fetch the bundle once."""
    known = _known(settings)
    if not isinstance(known, _Pin):
        return known
    import httpx

    try:
        async with httpx.AsyncClient(verify=False, timeout=_PIN_FETCH_TIMEOUT) as http:
            resp = await http.get(_bundle_url(settings))
    except httpx.HTTPError as exc:
        raise control_error(exc, settings.control_url) from exc
    return known.trust(resp.content)


def control_verify_sync(settings: Settings) -> ssl.SSLContext | bool:
    """:func:`control_verify` for synchronous callers (the CLI)."""
    known = _known(settings)
    if not isinstance(known, _Pin):
        return known
    import httpx

    try:
        resp = httpx.get(_bundle_url(settings), verify=False, timeout=_PIN_FETCH_TIMEOUT)
    except httpx.HTTPError as exc:
        raise control_error(exc, settings.control_url) from exc
    return known.trust(resp.content)


def admin_request(settings: Settings) -> dict[str, Any]:
    """httpx keyword arguments for an admin request to the control plane: its verification
    and the admin token (``AGENTMESH_TOKEN``, else the data dir's file), never in clear."""
    from agentmesh.security.files import admin_token

    token = admin_token(settings)
    guard_cleartext(settings.control_url, sends_token=token is not None)
    return {
        "verify": control_verify_sync(settings),
        "headers": {"authorization": f"Bearer {token}"} if token else {},
    }


def control_error(exc: httpx.HTTPError | OSError, url: str) -> MeshError:
    """A failed request to the control plane as a mesh error naming it (and a bad certificate)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return AuthenticationFailed(
                f"control plane at {url}: its certificate is not trusted "
                f"({cause.verify_message}); it does not chain to the mesh root this process "
                "trusts (AGENTMESH_CONTROL_CA_FILE, roots.pem in the data dir, or the join "
                "token's pin): refusing to talk to it"
            )
        if isinstance(cause, ssl.SSLError):
            return RegistryUnavailable(
                f"control plane at {url}: TLS failed ({cause.reason or cause}); is it an "
                "https:// control plane? (`agentmesh control --insecure-http` serves http://)"
            )
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    return RegistryUnavailable(
        f"control plane at {url}: {text}; start it with `agentmesh control`, or set "
        "AGENTMESH_CONTROL_URL"
    )
