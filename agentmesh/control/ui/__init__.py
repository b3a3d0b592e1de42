"""The dashboard at ``/ui``: server-rendered pages of the mesh, live without a JavaScript build.

Pages are Jinja2 templates (``agentmesh/control/templates/``); their live parts are fragments
that poll their own URL with htmx (vendored in ``static/htmx.min.js``). The modules finish the
sentence "the dashboard's ...": ``app`` (the ASGI app mounted at ``/ui``), ``auth`` (sign-in for
a session cookie), ``routes`` (pages and live fragments), ``render`` (templates, filters,
headers), ``data`` (where every number on a page comes from), ``views`` (the rows and cards a
page shows), ``listing`` (tables read from the control plane's own API), ``schema`` (forms from
a capability's JSON Schema) and ``tryit`` (the try-it call through the mesh).
"""

from agentmesh.control.ui.app import dashboard_app
from agentmesh.control.ui.data import DashboardData
from agentmesh.control.ui.views import Golden

__all__ = ["DashboardData", "Golden", "dashboard_app"]
