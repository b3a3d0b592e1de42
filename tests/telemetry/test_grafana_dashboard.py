"""``examples/grafana/agentmesh-dashboard.json`` only asks Prometheus for what agents export.

Every PromQL expression may name only the series of the metrics defined in
``agentmesh/telemetry/metrics.py`` (``_total``, ``_bucket``... as prometheus_client exposes them)
and, in selectors and ``by (...)``, only their labels plus the ones Prometheus adds. With promtool
installed (CI installs it), every expression must also parse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from agentmesh.telemetry import metrics
from tests.promtool import check_rules

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "examples" / "grafana" / "agentmesh-dashboard.json"
)
#: Labels Prometheus adds to every series; a metric's own ``instance`` becomes ``exported_instance``.
TARGET_LABELS = {"job", "instance", "exported_instance"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
_METRIC = re.compile(r"\b(agentmesh_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def _series() -> dict[str, set[str]]:
    """Every series name agents expose → the labels it may carry."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = set(value._labelnames)
        for family in value.describe():
            for suffix in _SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                out[family.name + suffix] = labels | extra
    return out


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_the_dashboard_is_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"type", "title", "gridPos"} <= panel.keys(), panel.get("title")
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "agent", "capability"}


def test_every_expression_uses_only_exported_metrics_and_labels(
    dashboard: dict[str, Any],
) -> None:
    series = _series()
    used: set[str] = set()
    for expr in _expressions(dashboard):
        found = _METRIC.findall(expr)
        assert found, f"no agentmesh metric in {expr!r}"
        allowed = set(TARGET_LABELS)
        for name, selector in found:
            assert name in series, f"{name} is not exported by agentmesh/telemetry/metrics.py"
            used.add(name)
            allowed |= series[name]
            for label in _LABEL.findall(selector):
                assert label in series[name] | TARGET_LABELS, f"{name} has no label {label!r}"
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                assert label in allowed, f"{expr!r}: no metric in it has label {label!r}"
    # The golden signals and the resilience metrics are all on the dashboard.
    for name in (
        "agentmesh_inbound_requests_total",
        "agentmesh_inbound_latency_seconds_bucket",
        "agentmesh_outbound_requests_total",
        "agentmesh_outbound_latency_seconds_bucket",
        "agentmesh_outbound_retries_total",
        "agentmesh_retry_budget_exhausted_total",
        "agentmesh_breaker_state",
        "agentmesh_breaker_transitions_total",
    ):
        assert name in used, f"{name} is on no panel"


def test_every_expression_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    substituted = [
        e.replace("$__rate_interval", "5m").replace("$agent", ".*").replace("$capability", ".*")
        for e in exprs
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(substituted)
                ],
            }
        ]
    }
    path = tmp_path / "rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    check_rules(path)
