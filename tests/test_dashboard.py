"""launch/grafana/lvface.json: importable, and every metric its panels query is one lvface exports.

The exported names come from the code's registry (lvface.metrics.exported_sample_names builds a
prometheus_client registry from METRICS), not from a list kept here.
"""

import json
import re
from pathlib import Path

from lvface.metrics import METRICS, PREFIX, exported_sample_names

DASHBOARD = Path(__file__).resolve().parent.parent / "launch" / "grafana" / "lvface.json"
NAME = re.compile(r"\b(lvface_[a-z0-9_]+)\b")


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queried_names(dashboard: dict) -> dict[str, str]:
    """{metric name: the title of a panel that queries it}"""
    names = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            for name in NAME.findall(target["expr"]):
                names.setdefault(name, panel["title"])
    return names


def test_dashboard_is_importable_json():
    dashboard = json.loads(DASHBOARD.read_text())
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        assert key in dashboard, key
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasources = {v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"]["uid"].strip("${}") in datasources, panel["title"]


def test_every_queried_metric_is_exported():
    queried = _queried_names(json.loads(DASHBOARD.read_text()))
    exported = exported_sample_names()
    unknown = {name: title for name, title in queried.items() if name not in exported}
    assert not unknown, f"panels query metrics lvface does not export: {unknown}"


def test_every_exported_metric_has_a_panel():
    queried = set(_queried_names(json.loads(DASHBOARD.read_text())))
    families = set()
    for name in queried:
        for metric in METRICS:
            base = PREFIX + metric.name
            if name in (base, base + "_total", base + "_sum", base + "_count", base + "_bucket"):
                families.add(metric.name)
    missing = {metric.name for metric in METRICS} - families
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_the_check_can_fail():
    dashboard = {"panels": [{"title": "typo", "targets": [{"expr": "rate(lvface_image_total[1m])"}]}]}
    assert "lvface_image_total" not in exported_sample_names()
    assert _queried_names(dashboard) == {"lvface_image_total": "typo"}
