"""``agentmesh apply``, ``get policies|policy`` and ``delete policy``: policies as manifests.

``apply`` reads every document first and validates it locally, so a mistake is reported with its
file, document and line and nothing at all is applied; then it sends them one by one to the
control plane, which validates again, compares with what is stored (``unchanged`` writes
nothing) and writes a new revision. ``get`` and ``delete`` are groups, so other resources can
join them (``get_app.command("...")``).
"""

from __future__ import annotations

import enum
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel, TypeAdapter
from rich.markup import escape
from rich.table import Table

from agentmesh.cli._common import ControlUrl, console, settings_from
from agentmesh.errors import InvalidInput, MeshError, RegistryUnavailable, error_from_problem
from agentmesh.models import AccessPolicy, PolicyChange, PolicyRevision, Problem, TrafficPolicy
from agentmesh.policy.manifest import POLICY_ADAPTER, load_manifests, validate_manifest

if TYPE_CHECKING:
    from agentmesh.settings import Settings

__all__ = ["delete_app", "get_app", "register"]

get_app = typer.Typer(help="Show resources (policies).", no_args_is_help=True)
delete_app = typer.Typer(help="Delete resources (a policy).", no_args_is_help=True)


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[Format, typer.Option("--output", "-o", help="table, json or yaml.")]


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
    app.add_typer(get_app, name="get")
    app.add_typer(delete_app, name="delete")


# ---- the control plane's API ---------------------------------------------------------------


def _request(
    settings: Settings,
    method: str,
    path: str,
    *,
    params: dict[str, Any] | None = None,
    body: Any = None,
) -> Any:
    import httpx  # a cold path: kept off the import of every other command (agent start-up)

    from agentmesh.security.control_trust import admin_request, control_error

    url = f"{settings.control_url.rstrip('/')}{path}"
    try:
        resp = httpx.request(
            method, url, params=params, json=body, timeout=15.0, **admin_request(settings)
        )
    except httpx.HTTPError as exc:
        raise control_error(exc, settings.control_url) from exc
    if resp.status_code >= 400:
        try:
            problem = Problem.model_validate_json(resp.content)
        except ValueError:
            raise RegistryUnavailable(
                f"control plane at {settings.control_url}: HTTP {resp.status_code}"
            ) from None
        error = error_from_problem(problem, where="control plane")
        error.message = problem.detail or problem.title  # the CLI names the place itself
        error.args = (error.message,)
        raise error
    return resp.json()


# ---- output ---------------------------------------------------------------------------------


def _plain(item: Any) -> Any:
    if isinstance(item, BaseModel):
        return item.model_dump(mode="json", exclude_none=True)
    return item


def _emit(data: Any, output: Format) -> None:
    """JSON or YAML on stdout, nothing else (a list in YAML is a multi-document stream)."""
    import yaml

    if output is Format.json:
        plain = [_plain(d) for d in data] if isinstance(data, list) else _plain(data)
        print(json.dumps(plain, indent=2))
    elif isinstance(data, list):
        sys.stdout.write(yaml.safe_dump_all([_plain(d) for d in data], sort_keys=False))
    else:
        sys.stdout.write(yaml.safe_dump(_plain(data), sort_keys=False))


def _target(policy: AccessPolicy | TrafficPolicy | None) -> str:
    if policy is None:
        return "?"
    if isinstance(policy, TrafficPolicy):
        return policy.spec.capability
    caps = {
        t.capability or (f"tags {','.join(t.tags)}" if t.tags else f"version {t.version}")
        for r in policy.spec.rules
        for t in r.targets
    }
    return ", ".join(sorted(caps))


def _summary(policy: AccessPolicy | TrafficPolicy | None, error: str | None = None) -> str:
    if policy is None:
        return f"[red]invalid, fails closed:[/] {escape(error or '?')}"
    if isinstance(policy, AccessPolicy):
        rules = policy.spec.rules
        return f"{len(rules)} rule(s): " + ", ".join(f"{r.action} {r.name}" for r in rules)
    spec = policy.spec
    parts = []
    if spec.timeout is not None:
        parts.append(f"timeout {spec.timeout:g}s")
    if spec.retry is not None:
        attempts = spec.retry.attempts
        parts.append(f"retry {attempts} attempts" if attempts is not None else "retry")
    if spec.breaker is not None:
        parts.append("breaker")
    if spec.balance is not None:
        parts.append(spec.balance)
    if spec.subsets:
        parts.append("split " + " / ".join(f"{s.name} {s.weight}" for s in spec.subsets))
    return ", ".join(parts) or "defaults"


def _when(revision: PolicyRevision) -> str:
    return revision.updated.strftime("%Y-%m-%d %H:%M:%S") if revision.updated else "-"


def _change_line(change: PolicyChange) -> str:
    kind = (change.kind or "policy").lower()
    revision = f" (revision {change.revision})" if change.revision is not None else ""
    dry = " (dry run)" if change.dry_run else ""
    return f"{kind}/{change.name} {change.result}{revision}{dry}"


# ---- commands -------------------------------------------------------------------------------


def apply(
    filename: Annotated[
        list[str],
        typer.Option(
            "--filename", "-f", help="A YAML/JSON file, a directory of them, or '-' for stdin."
        ),
    ],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate and report what would change; write nothing."),
    ] = False,
    output: OutputOpt = Format.table,
    control_url: ControlUrl = None,
) -> None:
    """Create or update the policies in manifest files (idempotent)."""
    settings = settings_from(control_url=control_url)
    manifests = load_manifests(filename)
    if not manifests:
        raise InvalidInput(f"{', '.join(filename)}: no documents to apply")
    problems: list[InvalidInput] = []
    seen: dict[str, str] = {}
    for manifest in manifests:
        try:
            policy = validate_manifest(manifest.data)
        except InvalidInput as exc:
            problems.append(manifest.problem(exc))
            continue
        name = policy.metadata.name
        if name in seen:
            problems.append(
                InvalidInput(f"{manifest.where}: policy {name!r} is also defined in {seen[name]}")
            )
        seen.setdefault(name, manifest.where)
    if len(problems) == 1:
        raise InvalidInput(f"{problems[0].message}; nothing applied")
    if problems:  # every invalid document on a line of its own, so one edit fixes them all
        listing = "".join(f"\n  {p.message}" for p in problems)
        raise InvalidInput(f"{len(problems)} invalid documents; nothing applied:{listing}")
    changes: list[PolicyChange] = []
    for manifest in manifests:
        try:
            data = _request(
                settings,
                "POST",
                "/v1/policies",
                params={"dry_run": "true"} if dry_run else None,
                body=manifest.data,
            )
        except InvalidInput as exc:
            done = f" ({len(changes)} earlier document(s) applied)" if changes else ""
            raise InvalidInput(f"{manifest.problem(exc).message}{done}") from exc
        except MeshError as exc:
            exc.message = f"{manifest.where}: {exc.message}"
            exc.args = (exc.message,)
            raise
        change = PolicyChange.model_validate(data)
        changes.append(change)
        if output is Format.table:
            console.print(escape(_change_line(change)), highlight=False)
    if output is not Format.table:
        _emit(changes, output)


@get_app.command("policies")
def get_policies(
    kind: Annotated[str | None, typer.Option(help="Only AccessPolicy or TrafficPolicy.")] = None,
    output: OutputOpt = Format.table,
    control_url: ControlUrl = None,
) -> None:
    """List the policies (yaml output can be applied again)."""
    settings = settings_from(control_url=control_url)
    if kind is not None and kind not in ("AccessPolicy", "TrafficPolicy"):
        raise InvalidInput(f"--kind {kind!r}: expected AccessPolicy or TrafficPolicy")
    rows = TypeAdapter(list[PolicyRevision]).validate_python(
        _request(settings, "GET", "/v1/policies", params={"kind": kind} if kind else None)
    )
    if output is Format.yaml:
        _emit([r.policy for r in rows if r.policy is not None], output)
        return
    if output is Format.json:
        _emit(rows, output)
        return
    table = Table(
        title=f"{len(rows)} polic{'y' if len(rows) == 1 else 'ies'}", title_justify="left"
    )
    for column in ("NAME", "KIND", "TARGET", "REVISION", "UPDATED", "SUMMARY"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.name,
            r.policy.kind if r.policy is not None else "?",
            _target(r.policy),
            str(r.revision),
            _when(r),
            _summary(r.policy, r.error),
        )
    console.print(table)


@get_app.command("policy")
def get_policy(
    name: Annotated[str, typer.Argument(help="The policy's name.")],
    history: Annotated[
        bool, typer.Option("--history", help="Every kept revision, deletions included.")
    ] = False,
    output: OutputOpt = Format.table,
    control_url: ControlUrl = None,
) -> None:
    """Show one policy, or with --history every revision of it."""
    settings = settings_from(control_url=control_url)
    if history:
        revisions = TypeAdapter(list[PolicyRevision]).validate_python(
            _request(settings, "GET", f"/v1/policies/{name}/history")
        )
        if output is not Format.table:
            _emit(revisions, output)
            return
        table = Table(title=f"history of policy {name!r}", title_justify="left")
        for column in ("REVISION", "OPERATION", "UPDATED", "KIND", "SUMMARY"):
            table.add_column(column)
        for r in revisions:
            deleted = r.operation == "delete"
            table.add_row(
                str(r.revision),
                r.operation,
                _when(r),
                "-" if deleted else (r.policy.kind if r.policy else "?"),
                "-" if deleted else _summary(r.policy, r.error),
            )
        console.print(table)
        return
    policy = POLICY_ADAPTER.validate_python(_request(settings, "GET", f"/v1/policies/{name}"))
    if output is not Format.table:
        _emit(policy, output)
        return
    row = PolicyRevision(
        name=name,
        revision=policy.metadata.revision or 0,
        operation="put",
        updated=policy.metadata.updated,
        policy=policy,
    )
    table = Table(title=f"policy {name!r}", title_justify="left")
    for column in ("NAME", "KIND", "TARGET", "REVISION", "UPDATED", "SUMMARY"):
        table.add_column(column)
    table.add_row(
        name, policy.kind, _target(policy), str(row.revision), _when(row), _summary(policy)
    )
    console.print(table)


@delete_app.command("policy")
def delete_policy(
    name: Annotated[str, typer.Argument(help="The policy's name.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be deleted; delete nothing.")
    ] = False,
    output: OutputOpt = Format.table,
    control_url: ControlUrl = None,
) -> None:
    """Delete a policy (its history stays: see get policy NAME --history)."""
    settings = settings_from(control_url=control_url)
    change = PolicyChange.model_validate(
        _request(
            settings,
            "DELETE",
            f"/v1/policies/{name}",
            params={"dry_run": "true"} if dry_run else None,
        )
    )
    if output is Format.table:
        console.print(escape(_change_line(change)), highlight=False)
    else:
        _emit(change, output)
