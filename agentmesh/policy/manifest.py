"""Policy manifests: validating one, and reading many from YAML files with their locations.

Shared by the control plane (which validates every write) and the CLI (which validates before it
sends anything, so a mistake in the fifth document of a file is reported with the file, the
document and the line, and nothing is applied). YAML is read strictly: a key given twice in one
mapping is an error, not "the last one wins".
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from agentmesh.errors import InvalidInput
from agentmesh.models import AccessPolicy, Policy, TrafficPolicy

if TYPE_CHECKING:
    import yaml

__all__ = [
    "POLICY_ADAPTER",
    "Manifest",
    "describe_errors",
    "error_listing",
    "load_manifests",
    "parse_policy",
    "validate_manifest",
]

#: Built on first use (defer_build): every sidecar imports this module, few ever parse a policy.
POLICY_ADAPTER: TypeAdapter[AccessPolicy | TrafficPolicy] = TypeAdapter(
    Policy, config=ConfigDict(defer_build=True)
)
_SUFFIXES = (".yaml", ".yml", ".json")


def parse_policy(data: Any) -> AccessPolicy | TrafficPolicy:
    """Validate one manifest (a decoded JSON/YAML document); raises ValidationError."""
    return POLICY_ADAPTER.validate_python(data)


def describe_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors as ``{"loc": "spec.rules[0].name", "path": [...], "msg": ...}``.

    The kind tag pydantic puts first in a tagged union's locations is dropped, and so are the
    "too short" follow-ups of a list whose items already failed.
    """
    out: list[dict[str, Any]] = []
    raw = exc.errors(include_url=False, include_context=False, include_input=False)
    locs = [tuple(e["loc"]) for e in raw]
    for error, full in zip(raw, locs, strict=True):
        if error["type"] == "too_short" and any(
            other != full and other[: len(full)] == full for other in locs
        ):
            continue
        loc = full[1:] if full and full[0] in ("AccessPolicy", "TrafficPolicy") else full
        out.append(
            {
                "loc": _dotted(loc),
                "path": list(loc),
                "msg": error["msg"].removeprefix("Value error, "),
            }
        )
    return out


def error_listing(exc: ValidationError) -> str:
    """Every problem on one line (``loc: msg; loc: msg``): one round of fixes, not one per error."""
    return "; ".join(f"{e['loc']}: {e['msg']}" for e in describe_errors(exc))


def _dotted(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def validate_manifest(data: Any) -> AccessPolicy | TrafficPolicy:
    """One manifest → a policy, or InvalidInput listing every problem with its field."""
    from agentmesh.policy.traffic import compile_traffic

    if not isinstance(data, dict):
        raise InvalidInput(
            "a policy must be a mapping with apiVersion, kind, metadata and spec",
            errors=[{"loc": "(document)", "path": [], "msg": f"got {type(data).__name__}"}],
        )
    try:
        policy = parse_policy(data)
    except ValidationError as exc:
        errors = describe_errors(exc)
        meta = data.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        kind = data.get("kind") if isinstance(data.get("kind"), str) else "policy"
        what = f"{kind} {name!r}" if isinstance(name, str) else str(kind)
        raise InvalidInput(f"{what}: {error_listing(exc)}", errors=errors) from exc
    if isinstance(policy, TrafficPolicy):
        try:
            compile_traffic(policy)
        except ValueError as exc:
            raise InvalidInput(
                f"TrafficPolicy {policy.metadata.name!r}: {exc}",
                errors=[{"loc": "spec", "path": ["spec"], "msg": str(exc)}],
            ) from exc
    return policy


@cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently).

    Built on first use: PyYAML stays off the import path of agents and other commands.
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            self.flatten_mapping(node)
            seen: set[str] = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping",
                            node.start_mark,
                            f"found the key {key_node.value!r} twice",
                            key_node.start_mark,
                        )
                    seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


@dataclass(frozen=True, slots=True)
class Manifest:
    """One document of a manifest file, and where it came from."""

    source: str
    index: int
    """1-based position of the document in its file."""
    data: Any
    node: yaml.Node | None = None

    @property
    def where(self) -> str:
        return f"{self.source}, document {self.index}"

    def line_of(self, path: Iterable[Any]) -> int | None:
        """The line (1-based) of the field at ``path``, or of its closest parent that exists."""
        import yaml

        node = self.node
        if node is None:
            return None
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                        node = value
                        break
                else:
                    break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    break
                node = node.value[part]
            else:
                break
        return int(node.start_mark.line) + 1

    def problem(self, error: InvalidInput) -> InvalidInput:
        """``error`` with this document's location (and the first bad field's line) in front."""
        line = None
        if error.errors and isinstance(error.errors[0].get("path"), list):
            line = self.line_of(error.errors[0]["path"])
        where = f"{self.where}" + (f" (line {line})" if line else "")
        return InvalidInput(f"{where}: {error.message}", errors=error.errors)


def _read(text: str, source: str) -> list[Manifest]:
    import yaml

    loader = _strict_loader()(text)
    out: list[Manifest] = []
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            index += 1
            data = loader.construct_document(node)
            if data is not None:  # an empty document (a stray '---') is no policy
                out.append(Manifest(source, index, data, node))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput(f"{source}{at}: not valid YAML: {problem}") from exc
    finally:
        loader.dispose()
    return out


def load_manifests(paths: Sequence[str]) -> list[Manifest]:
    """The documents of every file (a directory: its *.yaml, *.yml, *.json; ``-``: stdin)."""
    out: list[Manifest] = []
    for given in paths:
        if given == "-":
            out.extend(_read(sys.stdin.read(), "<stdin>"))
            continue
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
            if not files:
                raise InvalidInput(f"{given}: no .yaml, .yml or .json files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise InvalidInput(f"{given}: no such file or directory")
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"{file}: cannot read: {exc}") from exc
            out.extend(_read(text, str(file)))
    return out
