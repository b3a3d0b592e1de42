"""Access: the outbound layer that applies the cached AccessPolicies (no I/O).

``AccessLayer`` decides, from the sidecar's cached AccessPolicies, which of the resolved targets
this caller may call: those it may not are dropped (a rule may allow only some versions), and if
none is left the call fails fast with ``PolicyDenied`` naming the rule. It decides in partial mode
(see ``policy/access.py``): the receiving sidecar's decision is the authoritative one. A denial is
final; the retry layer below never sees it.

Access runs before the route layer's weighted split (``route.py``), so a caller allowed only
some versions is routed among those, and a canary coin flip never turns into a denial.
"""

from __future__ import annotations

from collections.abc import Callable

from agentmesh.errors import PolicyDenied
from agentmesh.policy.access import Decision, Subject
from agentmesh.policy.cache import PolicyCache
from agentmesh.registry.index import Target
from agentmesh.sidecar.call import Handler, OutboundCall, Reply

__all__ = ["AccessLayer"]


class AccessLayer:
    """``own_spiffe`` gives this sidecar's verified SPIFFE ID (its mTLS certificate's), if any:
    the receiver sees that identity, so the sender decides as it. Without one (mTLS off), the
    caller is the name this sidecar claims in ``agentmesh-caller``."""

    def __init__(
        self,
        inner: Handler,
        policies: PolicyCache,
        *,
        caller: str,
        own_spiffe: Callable[[], str | None] | None = None,
    ) -> None:
        self._inner = inner
        self._policies = policies
        self.caller = caller
        self._own_spiffe = own_spiffe

    async def __call__(self, call: OutboundCall) -> Reply:
        policies = self._policies
        if policies.open:
            return await self._inner(call)
        own = self._own_spiffe() if self._own_spiffe is not None else None
        caller = policies.verified(own) if own else policies.caller(self.caller)
        decided: dict[tuple[str, tuple[str, ...]], Decision] = {}
        allowed: list[Target] = []
        denial: tuple[Decision, Subject] | None = None
        for target in call.targets:
            spec = target.spec
            key = (spec.version, spec.tags)
            decision = decided.get(key)
            subject = Subject(spec.name, target.version, spec.tags)
            if decision is None:
                decision = decided[key] = policies.authorize(caller, subject, partial=True)
            if decision.allowed:
                allowed.append(target)
            elif denial is None:
                denial = (decision, subject)
        if not allowed:
            if denial is None:  # no targets: resolve already raised; keep the layer total
                return await self._inner(call)
            error: PolicyDenied = denial[0].error(caller, denial[1])
            raise error
        if len(allowed) != len(call.targets):
            call.targets = tuple(allowed)
        return await self._inner(call)
