"""The standalone sidecar: an app in any language joins the mesh through a proxy beside it.

``agentmesh sidecar`` serves the app's declared capabilities (``kind: Agent`` manifest) on the
mesh port with the same inbound machinery as a Python agent, forwards each call to the app over
loopback, and gives the app an egress port for its own calls. See docs/sidecar.md.
"""

__all__ = ["SIDECAR_LABEL"]

#: The label that marks an agent served through a standalone sidecar (``agentmesh agents``
#: shows it); its value is ``"true"``.
SIDECAR_LABEL = "agentmesh.dev/sidecar"
