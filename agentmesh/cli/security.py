"""``agentmesh token``, ``identity`` and ``ca``: enrolment tokens, issued identities, the CA.

All of them talk to the control plane's admin API with the admin token (``AGENTMESH_TOKEN``,
else the ``admin-token`` file in ``AGENTMESH_DATA_DIR``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter
from rich.table import Table

from agentmesh.cli._common import (
    ControlUrl,
    Output,
    OutputOpt,
    certificate_count,
    console,
    print_json,
    settings_from,
)
from agentmesh.errors import InvalidInput, RegistryUnavailable, error_from_problem
from agentmesh.models import (
    IdentityRecord,
    JoinToken,
    JoinTokenRequest,
    Problem,
    RevocationRequest,
    RevocationResult,
    TrustBundle,
)
from agentmesh.settings import Settings

token_app = typer.Typer(help="Join tokens: how a new agent or client enrols.", no_args_is_help=True)
identity_app = typer.Typer(help="Issued identities: list and revoke.", no_args_is_help=True)
ca_app = typer.Typer(help="The mesh CA: trust bundle and root rotation.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.add_typer(identity_app, name="identity")
    app.add_typer(ca_app, name="ca")


def _request(settings: Settings, method: str, path: str, body: Any = None) -> bytes:
    import httpx  # a cold path: kept off the import of every other command

    from agentmesh.security.control_trust import admin_request, control_error

    url = f"{settings.control_url.rstrip('/')}{path}"
    try:
        resp = httpx.request(method, url, json=body, timeout=30.0, **admin_request(settings))
    except httpx.HTTPError as exc:
        raise control_error(exc, settings.control_url) from exc
    if resp.status_code >= 400:
        try:
            problem = Problem.model_validate_json(resp.content)
        except ValueError:
            raise RegistryUnavailable(
                f"control plane at {settings.control_url}: HTTP {resp.status_code}"
            ) from None
        raise error_from_problem(problem, where=f"control plane at {settings.control_url}")
    return resp.content


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = int((moment - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"in {seconds // size}{unit}"
    return f"in {seconds}s"


def _duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise InvalidInput(f"duration {text!r}: use e.g. 90s, 15m, 2h or 7d") from None


@token_app.command("create")
def token_create(
    agent: Annotated[str | None, typer.Option(help="Agent name the token enrols.")] = None,
    client: Annotated[
        str | None, typer.Option(help="Client name the token enrols (connect(), the CLI).")
    ] = None,
    ttl: Annotated[str, typer.Option(help="How long it stays valid: 90s, 15m, 2h, 7d.")] = "1h",
    uses: Annotated[int, typer.Option(help="Enrolments it allows.", min=1)] = 1,
    reusable: Annotated[
        bool, typer.Option("--reusable", help="Any number of enrolments within the TTL.")
    ] = False,
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Create a join token: AGENTMESH_JOIN_TOKEN=<token> agentmesh run agent.py --name NAME."""
    settings = settings_from(control_url=control_url)
    try:
        request = JoinTokenRequest(
            agent=agent, client=client, ttl=_duration(ttl), uses=None if reusable else uses
        )
    except ValueError as exc:
        raise InvalidInput(f"token create: {exc}") from None
    created = JoinToken.model_validate_json(
        _request(settings, "POST", "/v1/tokens", request.model_dump(mode="json"))
    )
    if output is Output.json:
        print_json(created)
        return
    uses_text = "any number of" if created.uses is None else str(created.uses)
    console.print(created.token, highlight=False, soft_wrap=True)
    console.print(
        f"[dim]enrols {created.identity}; {uses_text} use(s); expires "
        f"{_when(created.expires_at)}[/]",
        highlight=False,
    )


@identity_app.command("list")
def identity_list(
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Certificates the CA issued that have not expired: identity, serial, expiry, revoked."""
    settings = settings_from(control_url=control_url)
    records = TypeAdapter(list[IdentityRecord]).validate_json(
        _request(settings, "GET", "/v1/identities")
    )
    if output is Output.json:
        print_json(records)
        return
    counted = certificate_count([r.model_dump(mode="json") for r in records])
    table = Table(title=counted, title_justify="left")
    for column in ("IDENTITY", "SERIAL", "EXPIRES", "VIA", "STATE"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.spiffe_id,
            r.serial,
            _when(r.not_after),
            r.via,
            "[red]revoked[/]" if r.revoked else "[green]valid[/]",
        )
    console.print(table)


@identity_app.command("revoke")
def identity_revoke(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A SPIFFE ID, an agent name, or a serial written 0x…; something that could be "
            "a serial or a name (`cafe`) is refused: say --serial or --name."
        ),
    ] = None,
    serial: Annotated[
        str | None,
        typer.Option(help="A certificate serial (hex), whether or not the CA has a record of it."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="An agent name: all its live certificates, and older tokens refused."),
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the revocation).")] = "",
    output: OutputOpt = Output.table,
    control_url: ControlUrl = None,
) -> None:
    """Revoke: every sidecar refuses it within about a second; a name cannot re-enrol with an
    older token."""
    given = [(v, k) for v, k in ((target, "auto"), (serial, "serial"), (name, "name")) if v]
    if len(given) != 1:
        raise InvalidInput("say what to revoke: one TARGET, or --serial SERIAL, or --name NAME")
    [(value, kind)] = given
    settings = settings_from(control_url=control_url)
    body = RevocationRequest(target=value, kind=kind, reason=reason).model_dump(mode="json")
    result = RevocationResult.model_validate_json(
        _request(settings, "POST", "/v1/revocations", body)
    )
    if output is Output.json:
        print_json(result)
        return
    if not result.revoked:
        console.print(f"no live certificate for {value}; re-enrolment with older tokens blocked")
    for r in result.revoked:
        whose = r.spiffe_id or "(no record of whose it is)"
        console.print(f"revoked {r.serial}  {whose}", highlight=False)


@ca_app.command("show")
def ca_show(output: OutputOpt = Output.table, control_url: ControlUrl = None) -> None:
    """The trust bundle: version and roots."""
    from agentmesh.security.pki import fingerprint, load_certs

    settings = settings_from(control_url=control_url)
    bundle = TrustBundle.model_validate_json(_request(settings, "GET", "/v1/trust-bundle"))
    if output is Output.json:
        print_json(bundle)
        return
    console.print(f"trust domain {bundle.trust_domain}, bundle v{bundle.version}")
    for text in bundle.roots:
        for root in load_certs(text):
            console.print(
                f"  {fingerprint(root)[:32]}  {root.subject.rfc4514_string()}  "
                f"expires {root.not_valid_after_utc:%Y-%m-%d}",
                highlight=False,
            )


@ca_app.command("rotate")
def ca_rotate(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    control_url: ControlUrl = None,
) -> None:
    """New root CA. The bundle holds old and new roots until the old root's last certificate
    expires, so no call fails; sidecars pick up new certificates as they renew."""
    settings = settings_from(control_url=control_url)
    if not yes:
        typer.confirm("Rotate the mesh's root CA?", abort=True)
    bundle = TrustBundle.model_validate_json(_request(settings, "POST", "/v1/ca/rotate"))
    console.print(
        f"rotated: trust bundle v{bundle.version} holds {len(bundle.roots)} roots; the old one "
        "leaves it once its last certificate has expired"
    )
