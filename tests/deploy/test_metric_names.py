"""Every metric a dashboard, an alert rule or the docs name is one that Tuneworks (or vLLM) really exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from core import metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
# vLLM series the dashboards and rules use (exposition names); checked against the installed vLLM below.
VLLM_SERIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:lora_requests_info": "gauge",
    "vllm:generation_tokens": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def series_names(name: str, kind: str) -> set[str]:
    return {name + suffix for suffix in _SUFFIXES[kind]}


def exported() -> set[str]:
    """Exposition names of every metric in core/metrics.py."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names |= series_names(value._name, value._type)
    return names


def recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def known() -> set[str]:
    names = exported() | recorded()
    for name, kind in VLLM_SERIES.items():
        names |= series_names(name, kind)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, matchers, ranges and grouping labels stripped)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        if match.start() and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or unit of a number such as 1e3
        names.add(match.group())
    return names


def dashboard_exprs(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_extractor_finds_names() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, route) (rate(ft_a_bucket{status=~"5.."}[5m]))) > 1e3 and on () up'
    assert metric_names(expr) == {"ft_a_bucket", "up"}
    assert metric_names("label_values(ft_vllm_up, base_model)") == {"ft_vllm_up", "base_model"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_metrics_exist(path: Path) -> None:
    names = set()
    for expr in dashboard_exprs(path):
        if expr.startswith("label_values("):
            metric, label = (
                x.strip() for x in expr.removeprefix("label_values(").removesuffix(")").split(",")
            )
            names.add(metric)
            continue
        names |= metric_names(expr)
    assert names, path.name
    unknown = names - known()
    assert not unknown, f"{path.name} uses metrics nothing exports: {sorted(unknown)}"


def test_rule_metrics_exist() -> None:
    names = set().union(*(metric_names(e) for e in rule_exprs()))
    unknown = names - known()
    assert not unknown, f"rules.yml uses metrics nothing exports: {sorted(unknown)}"


def test_dashboards_are_well_formed() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"tuneworks-overview", "tuneworks-drift", "tuneworks-inference"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["uid"] not in uids
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}"


def test_every_exported_metric_is_on_a_dashboard() -> None:
    used = set()
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            used |= metric_names(expr)
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            assert series_names(value._name, value._type) & used, f"{value._name} is on no dashboard"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_series_are_defined_by_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    source = "\n".join(
        p.read_text(errors="replace")
        for p in (Path(spec.submodule_search_locations[0]) / "v1" / "metrics").glob("*.py")
    )
    for name in VLLM_SERIES:
        assert f'"{name}"' in source, f"{name} is not defined by the installed vLLM"


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package `prometheus`) is not installed"
)
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each dashboard query, as a recording rule, passes `promtool check rules` (the PromQL parser)."""
    rules = []
    for path in DASHBOARDS:
        for i, expr in enumerate(dashboard_exprs(path)):
            if not expr.startswith("label_values("):
                rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{i}", "expr": expr})
    file = tmp_path / "dashboards.rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_docs_list_every_metric() -> None:
    """docs/metrics.md has one table row per metric of core/metrics.py, with its type and labels."""
    text = (REPO / "docs" / "metrics.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`ft_"):
            rows[cells[0].strip("`")] = cells
    declared = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            declared[value._name + ("_total" if value._type == "counter" else "")] = value
    assert set(rows) == set(declared), f"docs/metrics.md differs: {sorted(set(rows) ^ set(declared))}"
    for name, metric in declared.items():
        _, kind, labels, meaning, _ = rows[name]
        assert kind == metric._type, name
        assert labels == (", ".join(f"`{label}`" for label in metric._labelnames) or "—"), name
        assert meaning.startswith(metric._documentation.rstrip(".")), name
    for name in VLLM_SERIES:
        assert f"`{name}" in text, name
    alerts = [
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]
    for alert in alerts + sorted(recorded()):
        assert f"`{alert}`" in text, f"{alert} is not documented"
