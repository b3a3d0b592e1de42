"""Access and traffic policies: the KV store, the watch-fed cache, the compiled engines.

See docs/policies.md. The wire models live in ``agentmesh.models``; the outbound layers that
apply them in ``agentmesh.sidecar.access`` and ``agentmesh.sidecar.route``; the inbound check in
``agentmesh.inbound.app``.
"""

from agentmesh.policy.access import AccessEngine, Caller, Decision, InvalidPolicy, Subject
from agentmesh.policy.cache import PolicyCache, PolicySnapshot, compile_snapshot
from agentmesh.policy.manifest import Manifest, load_manifests, parse_policy, validate_manifest
from agentmesh.policy.store import PolicyConflict, PolicyEntry, PolicyStore, policy_bucket
from agentmesh.policy.traffic import TrafficRoute, TrafficRule, compile_traffic

__all__ = [
    "AccessEngine",
    "Caller",
    "Decision",
    "InvalidPolicy",
    "Manifest",
    "PolicyCache",
    "PolicyConflict",
    "PolicyEntry",
    "PolicySnapshot",
    "PolicyStore",
    "Subject",
    "TrafficRoute",
    "TrafficRule",
    "compile_snapshot",
    "compile_traffic",
    "load_manifests",
    "parse_policy",
    "policy_bucket",
    "validate_manifest",
]
