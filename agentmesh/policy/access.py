"""Access decisions: may this caller call this capability?

Evaluation, for one caller and one capability (name, version, tags):

1. a policy that is **invalid** (unparseable, or refused by validation) and covers the
   capability denies — it fails closed, naming itself;
2. a matching **DENY** rule denies (policies in name order, rules in written order);
3. if any **ALLOW** rule names the capability, the call must match one of them, caller and
   version and tags (an allow list engages as soon as one exists, as in Istio); otherwise it
   is denied, naming that rule;
4. nothing covers the capability: the **default action** (allow in the ``dev`` profile,
   deny in ``production``; ``AGENTMESH_DEFAULT_ACCESS`` overrides).

The receiving sidecar decides with everything it knows (authoritative). The sending sidecar
decides to fail fast, as the identity the receiver will see (its own certificate's SPIFFE ID),
in *partial* mode: a fact it cannot know (its SPIFFE ID with mTLS off) never makes it deny, a
rule that depends on one counts as a possible allow; only certain denials fail fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from agentmesh.errors import PolicyDenied
from agentmesh.models import AccessPolicy, AccessRule, SourceSelector, TargetSelector

__all__ = ["AccessEngine", "Caller", "Decision", "InvalidPolicy", "Subject", "VerifiedIdentity"]

DefaultAction = Literal["allow", "deny"]


class VerifiedIdentity(Protocol):
    """What an mTLS peer certificate proved (``agentmesh.security.identity.Caller`` is one)."""

    @property
    def spiffe_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling.

    ``name`` is the agent name: from the verified SPIFFE ID of the peer certificate (only an
    ``…/agent/<name>`` identity has one) when mTLS is on; with mTLS off, the name claimed in
    the ``agentmesh-caller`` header. None for clients, the control plane and unidentified
    callers. ``labels`` holds the labels of each live registry record of that agent (instances
    may differ): a DENY label selector matches if any instance has the labels, an ALLOW one only
    if all do, so disagreeing instances never widen access.
    """

    name: str | None
    spiffe_id: str | None = None
    verified: bool = False
    labels: tuple[Mapping[str, str], ...] = ()

    @classmethod
    def verified_from(cls, spiffe_id: str) -> Caller:
        """The caller a verified certificate's SPIFFE ID names.

        Only an agent identity (``spiffe://<td>/agent/<name>``) has an agent name that ``agent:``
        selectors match; clients (``…/client/<name>``) and the control plane are matched by
        their SPIFFE ID.
        """
        _, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
        kind, _, name = path.partition("/")
        agent = name if kind == "agent" and name and "/" not in name else None
        return cls(agent, spiffe_id, True)

    def describe(self) -> str:
        if self.spiffe_id is not None:
            return f"caller {self.spiffe_id}"
        if self.name is not None:
            return f"caller {self.name!r}" if self.verified else f"caller {self.name!r} (claimed)"
        return "an unidentified caller"


@dataclass(frozen=True, slots=True)
class Subject:
    """The capability a call is for, as far as access rules care."""

    capability: str
    version: Version
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, and which policy and rule decided (None: the default action)."""

    allowed: bool
    policy: str | None
    rule: str | None
    reason: str

    def error(self, caller: Caller, subject: Subject) -> PolicyDenied:
        what = f"{caller.describe()} may not call {subject.capability!r} {subject.version}"
        return PolicyDenied(
            f"{what}: {self.reason}",
            errors=[
                {
                    "policy": self.policy,
                    "rule": self.rule,
                    "caller": caller.spiffe_id or caller.name,
                }
            ],
        )


@dataclass(frozen=True, slots=True)
class InvalidPolicy:
    """A stored policy that cannot be used: it denies what it would cover (fails closed).

    ``covers`` is the set of capability names it names, or None when that cannot be told (it
    then covers every capability).
    """

    name: str
    kind: str | None
    covers: frozenset[str] | None
    problem: str

    def applies(self, capability: str) -> bool:
        return self.covers is None or capability in self.covers


@dataclass(frozen=True, slots=True)
class _Rule:
    policy: str
    rule: AccessRule
    specifiers: tuple[SpecifierSet | None, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.rule.name

    def covers(self, subject: Subject) -> bool:
        """Does one of the rule's targets match the capability, version and tags?"""
        return any(
            _target_matches(t, spec, subject)
            for t, spec in zip(self.rule.targets, self.specifiers, strict=True)
        )

    def engages(self, subject: Subject) -> bool:
        """Does this ALLOW rule put the capability on an allow list?

        A target naming the capability (or ``*``) engages it whatever its version and tags: an
        allow for ``summarize <2`` means 2.x is not allowed. A target without a capability name
        (tags or version only) engages what it matches.
        """
        return any(
            (t.capability in ("*", subject.capability))
            if t.capability is not None
            else _target_matches(t, spec, subject)
            for t, spec in zip(self.rule.targets, self.specifiers, strict=True)
        )

    def source_match(self, caller: Caller, *, deny: bool, partial: bool) -> bool | None:
        """True, False, or None (unknown: it depends on what only the receiver knows)."""
        unknown = False
        for source in self.rule.sources:
            result = _source_matches(source, caller, deny=deny, partial=partial)
            if result:
                return True
            unknown = unknown or result is None
        return None if unknown else False


def _specifier(version: str | None) -> SpecifierSet | None:
    if version is None:
        return None
    return SpecifierSet(f"=={version}" if version[0].isdigit() else version)


def _target_matches(
    target: TargetSelector, specifier: SpecifierSet | None, subject: Subject
) -> bool:
    if target.capability is not None and target.capability not in ("*", subject.capability):
        return False
    if specifier is not None and not specifier.contains(subject.version, prereleases=True):
        return False
    return target.tags is None or set(target.tags).issubset(subject.tags)


def _spiffe_matches(pattern: str, spiffe_id: str) -> bool:
    if not pattern.endswith("/*"):
        return spiffe_id == pattern
    prefix = pattern[:-1]  # keeps the '/'
    rest = spiffe_id[len(prefix) :]
    return spiffe_id.startswith(prefix) and bool(rest) and "/" not in rest


def _source_matches(
    source: SourceSelector, caller: Caller, *, deny: bool, partial: bool
) -> bool | None:
    if source.agent is not None and (caller.name is None or source.agent not in ("*", caller.name)):
        return False
    if source.labels is not None:
        wanted = source.labels.items()
        hits = [all(labels.get(k) == v for k, v in wanted) for labels in caller.labels]
        if not hits or not (any(hits) if deny else all(hits)):
            return False
    if source.spiffe is not None:
        if caller.spiffe_id is None:
            return None if partial else False
        if not _spiffe_matches(source.spiffe, caller.spiffe_id):
            return False
    return True


class AccessEngine:
    """The compiled access policies of one snapshot; immutable once built."""

    def __init__(
        self,
        policies: Iterable[AccessPolicy],
        invalid: Iterable[InvalidPolicy] = (),
        *,
        default: DefaultAction = "allow",
    ) -> None:
        self.default: DefaultAction = default
        self.invalid = tuple(sorted(invalid, key=lambda p: p.name))
        deny: list[_Rule] = []
        allow: list[_Rule] = []
        for policy in sorted(policies, key=lambda p: p.metadata.name):
            for rule in policy.spec.rules:
                compiled = _Rule(
                    policy.metadata.name,
                    rule,
                    tuple(_specifier(t.version) for t in rule.targets),
                )
                (deny if rule.action == "deny" else allow).append(compiled)
        self._deny = tuple(deny)
        self._allow = tuple(allow)
        self._by_capability: dict[str, tuple[tuple[_Rule, ...], tuple[_Rule, ...]]] = {}

    @property
    def open(self) -> bool:
        """No rule and no invalid policy, default allow: every call is allowed unexamined."""
        return not (self._deny or self._allow or self.invalid) and self.default == "allow"

    def _rules(self, capability: str) -> tuple[tuple[_Rule, ...], tuple[_Rule, ...]]:
        """The rules that can concern ``capability`` (by name or '*'), computed once."""
        rules = self._by_capability.get(capability)
        if rules is None:

            def concerned(rule: _Rule) -> bool:
                return any(t.capability in (None, "*", capability) for t in rule.rule.targets)

            rules = (
                tuple(r for r in self._deny if concerned(r)),
                tuple(r for r in self._allow if concerned(r)),
            )
            if len(self._by_capability) > 4096:
                self._by_capability.clear()
            self._by_capability[capability] = rules
        return rules

    def decide(self, caller: Caller, subject: Subject, *, partial: bool = False) -> Decision:
        for bad in self.invalid:
            if bad.applies(subject.capability):
                kind = bad.kind or "policy"
                return Decision(
                    False,
                    bad.name,
                    "invalid",
                    f"{kind} {bad.name!r} is invalid and fails closed ({bad.problem})",
                )
        deny, allow = self._rules(subject.capability)
        for rule in deny:
            if rule.covers(subject) and rule.source_match(caller, deny=True, partial=partial):
                return Decision(
                    False,
                    rule.policy,
                    rule.name,
                    f"denied by AccessPolicy {rule.policy!r} rule {rule.name!r}",
                )
        covering = [rule for rule in allow if rule.engages(subject)]
        for rule in covering:
            if not rule.covers(subject):
                continue
            if rule.source_match(caller, deny=False, partial=partial) is not False:
                return Decision(
                    True,
                    rule.policy,
                    rule.name,
                    f"allowed by AccessPolicy {rule.policy!r} rule {rule.name!r}",
                )
        if covering:
            first = covering[0]
            names = ", ".join(sorted({f"{r.policy}/{r.name}" for r in covering}))
            return Decision(
                False,
                first.policy,
                first.name,
                f"not allowed by AccessPolicy {first.policy!r} rule {first.name!r} "
                f"(allow rules for it: {names})",
            )
        if self.default == "allow":
            return Decision(True, None, None, "no policy covers it; the default action is allow")
        return Decision(
            False,
            None,
            "default-deny",
            "no AccessPolicy allows it and the default action is deny "
            "(AGENTMESH_PROFILE=production or AGENTMESH_DEFAULT_ACCESS=deny)",
        )
