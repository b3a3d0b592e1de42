"""Policy manifests and decisions without a network: validation, evaluation order, splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from agentmesh.errors import InvalidInput
from agentmesh.models import AccessPolicy, AgentRecord, CapabilitySpec, TrafficPolicy
from agentmesh.policy import (
    Caller,
    Subject,
    compile_snapshot,
    load_manifests,
    validate_manifest,
)
from agentmesh.policy.traffic import compile_traffic
from agentmesh.registry.index import Target

from .conftest import access_policy, traffic_policy

EXAMPLES = Path(__file__).parents[2] / "examples" / "policies"
SUMMARIZE = Subject("summarize", Version("1.2.0"), ("nlp", "en"))


def rule(name: str, action: str, sources: list[dict[str, Any]], targets: list[dict[str, Any]]):
    return {"name": name, "action": action, "sources": sources, "targets": targets}


def engine(*docs: dict[str, Any], default: str = "allow"):
    raw = {d["metadata"]["name"]: json.dumps(d).encode() for d in docs}
    return compile_snapshot(raw, default=default).access  # type: ignore[arg-type]


def problems(data: Any) -> list[str]:
    with pytest.raises(InvalidInput) as info:
        validate_manifest(data)
    return [f"{e['loc']}: {e['msg']}" for e in info.value.errors or []]


# ---- validation: exact, canonical, no ambiguity ------------------------------------------------


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ({"agent": "Planner"}, "agent 'Planner' must be lowercase"),
        ({"agent": " planner"}, "must be lowercase"),
        ({"agent": "plan*"}, "must be lowercase"),
        ({"spiffe": "SPIFFE://td/agent/a"}, "must look like spiffe://"),
        ({"spiffe": "spiffe://TD/agent/a"}, "must look like spiffe://"),
        ({"spiffe": "spiffe://td/agent/a/"}, "must look like spiffe://"),
        ({"spiffe": "spiffe://td/agent//a"}, "must look like spiffe://"),
        ({"spiffe": "spiffe://td/agent/../control"}, "'.' and '..' segments"),
        ({"spiffe": "spiffe://td/agent/a%2Fb"}, "must look like spiffe://"),
        ({"spiffe": "spiffe://td/agent/pl*"}, "'*' may only be the whole last segment"),
        ({"spiffe": "spiffe://td/*/a"}, "'*' may only be the whole last segment"),
        ({"labels": {}}, "labels must not be empty"),
        ({"labels": {"trust": " low"}}, "no leading or trailing spaces"),
        ({}, "a source needs agent, spiffe or labels"),
        ({"name": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_ambiguous_or_non_canonical_sources_are_refused(source, fragment):
    doc = access_policy("p", rule("r", "allow", [source], [{"capability": "summarize"}]))
    found = problems(doc)
    assert any(fragment in p and p.startswith("spec.rules[0].sources[0]") for p in found), found


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ({"capability": "Sum marize"}, "must be a capability name"),
        ({"capability": "nlp.*"}, "must be a capability name"),
        ({"version": ">=1,"}, "has an empty clause"),
        ({"version": ">=1,<=x"}, "not a PEP 440 specifier"),
        ({"version": " 1.0"}, "without outer spaces"),
        ({"version": 2}, "valid string"),
        ({"tags": []}, "tags must not be empty"),
        ({}, "a target needs capability, version or tags"),
    ],
)
def test_ambiguous_targets_are_refused(target, fragment):
    doc = access_policy("p", rule("r", "deny", [{"agent": "*"}], [target]))
    found = problems(doc)
    assert any(fragment in p and p.startswith("spec.rules[0].targets[0]") for p in found), found


def test_manifest_envelope_errors_name_the_field():
    assert any("kind" in p for p in problems({"apiVersion": "agentmesh.dev/v1", "kind": "X"}))
    bad = access_policy("Bad_Name", rule("r", "allow", [{"agent": "a"}], [{"capability": "c"}]))
    assert any(p.startswith("metadata.name:") for p in problems(bad))
    twice = access_policy(
        "p",
        rule("same", "allow", [{"agent": "a"}], [{"capability": "c"}]),
        rule("same", "deny", [{"agent": "b"}], [{"capability": "c"}]),
    )
    assert any("rule names must be unique" in p for p in problems(twice))
    assert problems([1, 2]) == ["(document): got list"]


def test_traffic_policy_validation():
    ok = validate_manifest(
        traffic_policy(
            "t",
            "summarize",
            timeout=5,
            retry={"attempts": 2},
            subsets=[
                {"name": "v1", "version": ">=1,<2", "weight": 90},
                {"name": "v2", "version": ">=2,<3", "weight": 10},
            ],
        )
    )
    assert isinstance(ok, TrafficPolicy)
    assert any("no wildcards" in p for p in problems(traffic_policy("t", "*")))
    zero = [{"name": "a", "version": "1.0", "weight": 0}]
    assert any("weight above 0" in p for p in problems(traffic_policy("t", "c", subsets=zero)))
    # Fine field by field, but not together with the default max_backoff (0.25 s).
    found = problems(traffic_policy("t", "c", retry={"backoff": 1.0}))
    assert any("max_backoff" in p for p in found), found


def test_the_examples_are_valid_policies():
    manifests = load_manifests([str(EXAMPLES)])
    kinds = {type(validate_manifest(m.data)) for m in manifests}
    assert kinds == {AccessPolicy, TrafficPolicy}


def test_manifest_files_report_document_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: agentmesh.dev/v1\nkind: AccessPolicy\nmetadata: {name: ok}\n"
        "spec:\n  rules:\n  - {name: r, action: allow, sources: [{agent: a}], targets: [{capability: c}]}\n"
        "---\n"
        "apiVersion: agentmesh.dev/v1\nkind: AccessPolicy\nmetadata:\n  name: bad\nspec:\n"
        "  rules:\n  - name: r\n    action: allow\n    sources:\n    - agent: Planner\n"
        "    targets: [{capability: c}]\n"
    )
    first, second = load_manifests([str(path)])
    validate_manifest(first.data)
    with pytest.raises(InvalidInput) as info:
        validate_manifest(second.data)
    message = second.problem(info.value).message
    assert message.startswith(f"{path}, document 2 (line 17): AccessPolicy 'bad': "), message
    assert "spec.rules[0].sources[0].agent" in message


def test_yaml_with_a_repeated_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("kind: AccessPolicy\nkind: TrafficPolicy\n")
    with pytest.raises(InvalidInput, match=r"line 2.*found the key 'kind' twice"):
        load_manifests([str(path)])


# ---- evaluation ----------------------------------------------------------------------------


def test_deny_is_evaluated_before_allow_whatever_the_order():
    access = engine(
        access_policy(
            "a-first",
            rule("everyone", "allow", [{"agent": "*"}], [{"capability": "summarize"}]),
        ),
        access_policy(
            "z-last",
            rule("no-intruder", "deny", [{"agent": "intruder"}], [{"capability": "*"}]),
        ),
    )
    denied = access.decide(Caller("intruder"), SUMMARIZE)
    assert (denied.allowed, denied.policy, denied.rule) == (False, "z-last", "no-intruder")
    allowed = access.decide(Caller("planner"), SUMMARIZE)
    assert (allowed.allowed, allowed.rule) == (True, "everyone")


def test_an_allow_rule_engages_an_allow_list_for_what_it_covers():
    access = engine(
        access_policy(
            "summarize-access",
            rule("planner-only", "allow", [{"agent": "planner"}], [{"capability": "summarize"}]),
        )
    )
    assert access.decide(Caller("planner"), SUMMARIZE).allowed
    denied = access.decide(Caller("intruder"), SUMMARIZE)
    assert not denied.allowed
    assert denied.rule == "planner-only"
    assert "not allowed by AccessPolicy 'summarize-access' rule 'planner-only'" in denied.reason
    # Not covered by any rule: the default action.
    other = Subject("translate", Version("1.0"), ())
    assert access.decide(Caller("intruder"), other).allowed
    assert not engine(default="deny").decide(Caller("intruder"), other).allowed


def test_version_and_tag_targets():
    access = engine(
        access_policy(
            "v",
            rule(
                "old-only",
                "allow",
                [{"agent": "*"}],
                [{"capability": "summarize", "version": "<2"}],
            ),
            rule("no-de", "deny", [{"agent": "*"}], [{"tags": ["de"]}]),
        )
    )
    assert access.decide(Caller("a"), SUMMARIZE).allowed
    v2 = Subject("summarize", Version("2.0.0"), ("nlp",))
    assert not access.decide(Caller("a"), v2).allowed
    german = Subject("translate", Version("1.0"), ("de",))
    assert access.decide(Caller("a"), german).rule == "no-de"


def test_labels_deny_on_any_instance_allow_only_on_all():
    access = engine(
        access_policy(
            "labels",
            rule("low-trust", "deny", [{"labels": {"trust": "low"}}], [{"capability": "a"}]),
            rule("team-nlp", "allow", [{"labels": {"team": "nlp"}}], [{"capability": "b"}]),
        )
    )
    a, b = Subject("a", Version("1"), ()), Subject("b", Version("1"), ())
    mixed = Caller("x", labels=({"trust": "low", "team": "nlp"}, {"team": "ops"}))
    assert not access.decide(mixed, a).allowed  # one instance is low-trust: deny
    assert not access.decide(mixed, b).allowed  # not every instance is team nlp: no allow
    same = Caller("x", labels=({"team": "nlp"}, {"team": "nlp", "zone": "a"}))
    assert access.decide(same, a).allowed
    assert access.decide(same, b).allowed
    assert not access.decide(Caller("x"), b).allowed  # no record, no labels


def test_spiffe_patterns_match_exactly_one_segment():
    access = engine(
        access_policy(
            "ids",
            rule("agents", "allow", [{"spiffe": "spiffe://td/agent/*"}], [{"capability": "*"}]),
        ),
        default="deny",
    )

    def verified(uri: str) -> bool:
        return access.decide(Caller(None, uri, True), SUMMARIZE).allowed

    assert verified("spiffe://td/agent/planner")
    assert not verified("spiffe://td/agent/planner/x")
    assert not verified("spiffe://td/agent/")
    assert not verified("spiffe://td/agentx/planner")
    assert not verified("spiffe://td2/agent/planner")
    assert not verified("spiffe://TD/agent/planner")
    # Sending side, before mTLS: its SPIFFE ID is unknown, so the rule may allow (the receiver
    # decides); a DENY that depends on it never fails fast.
    assert access.decide(Caller("planner"), SUMMARIZE, partial=True).allowed
    assert not access.decide(Caller("planner"), SUMMARIZE).allowed
    deny = engine(
        access_policy(
            "d", rule("r", "deny", [{"spiffe": "spiffe://td/agent/*"}], [{"capability": "*"}])
        )
    )
    assert deny.decide(Caller("planner"), SUMMARIZE, partial=True).allowed


def test_invalid_policies_fail_closed_for_what_they_cover():
    good = access_policy("good", rule("r", "allow", [{"agent": "*"}], [{"capability": "*"}]))
    narrow = access_policy(
        "narrow", rule("r", "allow", [{"agent": "a", "oops": 1}], [{"capability": "summarize"}])
    )
    raw = {
        "good": json.dumps(good).encode(),
        "narrow": json.dumps(narrow).encode(),
    }
    snapshot = compile_snapshot(raw)
    assert [p.name for p in snapshot.invalid] == ["narrow"]
    denied = snapshot.access.decide(Caller("a"), SUMMARIZE, partial=True)
    assert (denied.allowed, denied.policy, denied.rule) == (False, "narrow", "invalid")
    assert "AccessPolicy 'narrow' is invalid and fails closed" in denied.reason
    assert snapshot.access.decide(Caller("a"), Subject("other", Version("1"), ())).allowed

    garbage = compile_snapshot({**raw, "broken": b"\x00not json"})
    assert not garbage.access.decide(Caller("a"), Subject("other", Version("1"), ())).allowed
    misnamed = compile_snapshot({"other-key": json.dumps(good).encode()})
    assert "stored under 'other-key'" in misnamed.invalid[0].problem
    bad_traffic = traffic_policy("t", "summarize", retry={"backoff": 1.0})
    snapshot = compile_snapshot({"t": json.dumps(bad_traffic).encode()})
    assert snapshot.invalid[0].covers == frozenset({"summarize"})
    assert not snapshot.access.decide(Caller("a"), SUMMARIZE).allowed


# ---- traffic --------------------------------------------------------------------------------


def _target(instance: str, version: str) -> Target:
    spec = CapabilitySpec(name="summarize", version=version, input_schema={}, output_schema={})
    record = AgentRecord(
        instance_id=instance, name="s", endpoint="http://127.0.0.1:1", capabilities=(spec,)
    )
    return Target(record, spec, Version(version))


def test_split_follows_the_weights_exactly_and_steps_aside_when_pinned():
    policy = validate_manifest(
        traffic_policy(
            "canary",
            "summarize",
            timeout=5,
            retry={"attempts": 2},
            subsets=[
                {"name": "stable", "version": ">=1,<2", "weight": 90},
                {"name": "canary", "version": ">=2,<3", "weight": 10, "timeout": 9},
            ],
        )
    )
    assert isinstance(policy, TrafficPolicy)
    rule_ = compile_traffic(policy)
    targets = [_target("s-1", "1.0.0"), _target("s-2", "2.0.0")]
    picks = [rule_.select(targets)[0].subset for _ in range(100)]
    assert picks.count("canary") == 10
    assert "canary canary" not in " ".join(picks)  # interleaved, never in a burst
    route, chosen = rule_.select(targets[:1])  # only stable is live: no failure, stable
    assert route.subset == "stable"
    assert chosen == (targets[0],)
    route, chosen = rule_.select([_target("s-3", "3.0.0")])  # pinned outside every subset
    assert route.subset is None
    assert route.timeout == 5
    assert len(chosen) == 1
    routes = [rule_.select(targets)[0] for _ in range(10)]
    canary = next(r for r in routes if r.subset == "canary")
    assert canary.timeout == 9
    assert canary.retry is not None
    assert canary.retry.attempts == 2
    # An affinity key sticks to one subset.
    assert len({rule_.select(targets, "conversation-7")[0].subset for _ in range(20)}) == 1
