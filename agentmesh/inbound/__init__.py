"""Where a request reaches a process of ours, in the order it gets there.

``server`` (uvicorn on a socket we bound, our signal handling: agents and the control plane),
``tls`` (the uvicorn protocol that terminates TLS and knows who is calling), ``app`` (an agent's
raw ASGI app: capabilities, probes, metrics, agent card) and ``body`` (a request body read within
its limit, for the agent and the standalone sidecar's egress). Nothing is imported here, so a
process loads only the parts it serves with.
"""
