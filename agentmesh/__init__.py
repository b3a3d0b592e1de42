"""agentmesh: a service mesh for AI agents."""
