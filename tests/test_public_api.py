"""The public API is exactly ``agentmesh.__all__``, sorted, and every name in it resolves."""

from __future__ import annotations

import pytest

import agentmesh
from agentmesh import errors


def test_all_is_sorted_and_unique():
    assert list(agentmesh.__all__) == sorted(set(agentmesh.__all__))


def test_every_public_name_resolves():
    for name in agentmesh.__all__:
        assert getattr(agentmesh, name) is not None, name


def test_no_public_name_is_left_out():
    for name in agentmesh.__all__:
        getattr(agentmesh, name)  # public names are imported on first use
    public = {n for n in vars(agentmesh) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(agentmesh, n)).__name__ == "module"}
    assert public - modules == set(agentmesh.__all__) - {"__version__"}


def test_the_design_pins_these_names():
    for name in (
        "capability",
        "Agent",
        "connect",
        "Mesh",
        "CapabilitySpec",
        "AgentRecord",
        "CapabilityNotFound",
        "NoHealthyEndpoints",
        "PolicyDenied",
        "InvalidInput",
        "DeadlineExceeded",
        "RemoteAgentError",
        "MeshUnavailable",
    ):
        assert name in agentmesh.__all__


def test_every_error_is_exported_with_a_unique_code():
    classes = [getattr(errors, n) for n in errors.__all__ if n[0].isupper()]
    assert all(c.__name__ in agentmesh.__all__ for c in classes)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize("cls", [errors.PolicyDenied, errors.InvalidInput, errors.ConnectionFailed])
def test_errors_round_trip_through_problem_json(cls):
    original = cls("boom", errors=[{"loc": ["x"]}], retry_after=1.5)
    problem = agentmesh.Problem.model_validate_json(original.to_problem().model_dump_json())
    again = errors.error_from_problem(problem, where="agent a-1 at http://h:1")
    assert type(again) is cls
    assert str(again) == "agent a-1 at http://h:1: boom"
    assert again.errors == [{"loc": ["x"]}]
    assert again.retry_after == 1.5
    assert problem.status == cls.status


def test_unknown_codes_fall_back_by_status():
    def problem(status: int) -> agentmesh.Problem:
        return agentmesh.Problem(title="t", status=status, code="from_the_future")

    assert type(errors.error_from_problem(problem(503), where="x")) is errors.MeshUnavailable
    assert type(errors.error_from_problem(problem(500), where="x")) is errors.RemoteAgentError


def test_settings_refuse_a_lease_shorter_than_two_heartbeats():
    with pytest.raises(ValueError, match="at least twice"):
        agentmesh.Settings(heartbeat_interval=1.0, lease_ttl=1)
