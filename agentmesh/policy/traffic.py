"""Traffic policies, compiled: per-capability overrides and weighted version splits.

A :class:`TrafficRoute` is what the resilience layers read from ``OutboundCall.traffic``: the
timeout, a complete :class:`RetryPolicy` and :class:`BreakerConfig` (the policy's fields over
the sidecar's defaults), and the balancing strategy. A subset's fields override its policy's,
which override the sidecar's.

Splits use smooth weighted round robin (nginx's): over any ``sum(weights)`` consecutive calls
each subset gets exactly its share, interleaved (90/10 sends the 10 one by one, not in a
burst), so even a handful of calls follow the weights. A call with an ``affinity_key`` picks
its subset by hashing the key instead, so a conversation stays on one version. Only subsets
with a candidate instance take part; when none has one (the caller pinned a version outside
every subset), the split steps aside and the caller's own constraints decide: a split never
makes a call fail that would otherwise succeed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from packaging.specifiers import SpecifierSet

from agentmesh._config import BreakerConfig, RetryPolicy, Strategy, TrafficRoute
from agentmesh.models import BreakerSettings, RetrySettings, TrafficPolicy, TrafficSubset
from agentmesh.registry.index import Target

__all__ = ["TrafficRoute", "TrafficRule", "compile_traffic"]


@dataclass(slots=True)
class _Subset:
    name: str
    specifier: SpecifierSet
    weight: int
    route: TrafficRoute
    current: int = 0


class TrafficRule:
    """One compiled TrafficPolicy: its route, and the split between its subsets."""

    def __init__(self, policy: str, capability: str, route: TrafficRoute, subsets: list[_Subset]):
        self.policy = policy
        self.capability = capability
        self.route = route
        self.subsets = subsets

    def select(
        self, targets: Sequence[Target], affinity_key: str | None = None
    ) -> tuple[TrafficRoute, tuple[Target, ...]]:
        """The route and the targets of the subset this call goes to."""
        if not self.subsets:
            return self.route, tuple(targets)
        candidates: list[tuple[_Subset, tuple[Target, ...]]] = []
        for subset in self.subsets:
            if subset.weight <= 0:
                continue
            members = tuple(
                t for t in targets if subset.specifier.contains(t.version, prereleases=True)
            )
            if members:
                candidates.append((subset, members))
        if not candidates:
            return self.route, tuple(targets)
        if len(candidates) == 1:
            chosen, members = candidates[0]
        elif affinity_key is not None:
            chosen, members = _by_hash(candidates, affinity_key)
        else:
            chosen, members = _smooth_weighted(candidates)
        return chosen.route, members


def _smooth_weighted(
    candidates: list[tuple[_Subset, tuple[Target, ...]]],
) -> tuple[_Subset, tuple[Target, ...]]:
    total = 0
    best: tuple[_Subset, tuple[Target, ...]] | None = None
    for subset, members in candidates:
        subset.current += subset.weight
        total += subset.weight
        if best is None or subset.current > best[0].current:
            best = (subset, members)
    assert best is not None
    best[0].current -= total
    return best


def _by_hash(
    candidates: list[tuple[_Subset, tuple[Target, ...]]], key: str
) -> tuple[_Subset, tuple[Target, ...]]:
    total = sum(subset.weight for subset, _ in candidates)
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") % total
    for subset, members in candidates:
        if point < subset.weight:
            return subset, members
        point -= subset.weight
    return candidates[-1]


def _set_fields(settings: RetrySettings | BreakerSettings | None) -> dict[str, Any]:
    if settings is None:
        return {}
    return {k: v for k, v in settings.model_dump().items() if v is not None}


def _route(
    policy: str,
    subset: str | None,
    layers: Sequence[TrafficPolicy | TrafficSubset],
    retry: RetryPolicy,
    breaker: BreakerConfig,
) -> TrafficRoute:
    """Merge the override layers (outermost first) over the sidecar's defaults."""
    timeout = None
    balance: Strategy | None = None
    retry_fields: dict[str, Any] = {}
    breaker_fields: dict[str, Any] = {}
    for layer in layers:
        spec = layer.spec if isinstance(layer, TrafficPolicy) else layer
        timeout = spec.timeout if spec.timeout is not None else timeout
        balance = spec.balance if spec.balance is not None else balance
        retry_fields.update(_set_fields(spec.retry))
        breaker_fields.update(_set_fields(spec.breaker))
    known = {f.name for f in fields(BreakerConfig)}
    return TrafficRoute(
        policy=policy,
        subset=subset,
        timeout=timeout,
        # ValueError here (e.g. a backoff above the default max_backoff) makes the policy invalid.
        retry=replace(retry, **retry_fields) if retry_fields else None,
        breaker=(
            replace(breaker, **{k: v for k, v in breaker_fields.items() if k in known})
            if breaker_fields
            else None
        ),
        balance=balance,
    )


def compile_traffic(
    policy: TrafficPolicy,
    *,
    retry: RetryPolicy | None = None,
    breaker: BreakerConfig | None = None,
) -> TrafficRule:
    """Compile one policy; raises ValueError when its settings do not combine."""
    retry = retry or RetryPolicy()
    breaker = breaker or BreakerConfig()
    name = policy.metadata.name
    subsets = [
        _Subset(
            s.name,
            SpecifierSet(f"=={s.version}" if s.version[0].isdigit() else s.version),
            s.weight,
            _route(name, s.name, (policy, s), retry, breaker),
        )
        for s in policy.spec.subsets
    ]
    return TrafficRule(
        name, policy.spec.capability, _route(name, None, (policy,), retry, breaker), subsets
    )
