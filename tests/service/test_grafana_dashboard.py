"""contrib/grafana's dashboard and contrib/prometheus's alert rules, against what is exported.

The exported names come from :class:`appservice.metrics.Metrics` itself (the families on its
registry, their types and label names), so a family renamed or added there without the dashboard
following fails here. PromQL is not fully parsed: metric names, label matchers, ``by``/``without``
/``on``/``ignoring`` clauses, ``label_replace`` and ``histogram_quantile`` are read with regular
expressions and balanced parentheses, which covers what the two files use. When ``promtool`` is
``promtool`` (Debian's ``prometheus`` package, installed by scripts/ensure-promtool.sh) also checks
the rules file and every dashboard query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from appservice.metrics import Metrics
from tests.support.api_server import Api

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "matrix-identity-appservice.json"
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "metrics.md"

METRIC_NAME = re.compile(r"\bmatrix_identity_[a-z0-9_]+")
# Labels Prometheus attaches to every scraped series (the target's).
TARGET_LABELS = frozenset({"instance", "job"})
# Series that Prometheus itself makes for each target, and their labels.
PROMETHEUS_SERIES = {"up": TARGET_LABELS}
AGGREGATIONS = "sum|min|max|avg|group|stddev|stdvar|count|count_values|bottomk|topk|quantile"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
# Grafana's variables, as promtool sees them after Grafana replaced them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".+",
}


@dataclass(frozen=True)
class Family:
    """One exported family: its name (without ``_total``), type and label names."""

    name: str
    type: str
    labels: frozenset[str]

    def sample_names(self) -> frozenset[str]:
        """The sample names Prometheus stores for this family (``_created`` left out: nothing
        should be built on it)."""
        if self.type == "counter":
            return frozenset({f"{self.name}_total"})
        if self.type == "histogram":
            return frozenset(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        if self.type == "summary":
            return frozenset({self.name, f"{self.name}_sum", f"{self.name}_count"})
        if self.type == "info":
            return frozenset({f"{self.name}_info"})
        return frozenset({self.name})

    def sample_labels(self, sample: str) -> frozenset[str]:
        """The labels a stored sample of this family has (``le`` on histogram buckets)."""
        extra = {"le"} if self.type == "histogram" and sample.endswith("_bucket") else set()
        return self.labels | TARGET_LABELS | extra


@cache
def exported_families() -> dict[str, Family]:
    """Every family a server's Metrics registers, by family name.

    Types and names come from each collector's own description (a labelled family without
    children has no samples in ``registry.collect()``, so samples cannot tell); label names from
    the collector (prometheus_client keeps them as ``_labelnames``).
    """
    metrics = Metrics()
    families: dict[str, Family] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = frozenset(collector._labelnames)
        for described in collector.describe():
            families[described.name] = Family(described.name, described.type, labels)
    registered = {family.name for family in metrics.registry.collect()}
    assert set(families) == registered, "every family on the registry is an attribute of Metrics"
    return families


@cache
def sample_index() -> dict[str, Family]:
    """Exported sample name -> its family."""
    return {
        sample: family
        for family in exported_families().values()
        for sample in family.sample_names()
    }


def labels_of(sample: str) -> frozenset[str]:
    if sample in PROMETHEUS_SERIES:
        return PROMETHEUS_SERIES[sample]
    return sample_index()[sample].sample_labels(sample)


# --- PromQL, the parts these files use -----------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_REPLACE_ARGS = re.compile(
    r'label_replace\s*\(.*?,\s*"([^"]*)"\s*,\s*"[^"]*"\s*,\s*"([^"]*)"\s*,\s*"[^"]*"\s*\)', re.S
)
_RANGE_FUNCTION = re.compile(
    r"\b(rate|irate|increase|delta|idelta|deriv|resets|changes)\s*\(\s*([a-zA-Z_:][\w:]*)"
)


def mask_strings(expr: str) -> str:
    """The expression with the inside of every string literal blanked (same length), so that
    parentheses and names in regular expressions or replacements do not count."""
    return _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)


def group_after(text: str, start: int) -> str:
    """The inside of the parenthesised group opening at or after ``start``."""
    opening = text.index("(", start)
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[opening + 1 : i]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def group_before(text: str, end: int) -> str:
    """The inside of the parenthesised group whose ``)`` is the last one before ``end``."""
    closing = text.rindex(")", 0, end)
    depth = 0
    for i in range(closing, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            depth -= 1
            if depth == 0:
                return text[i + 1 : closing]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def series_names(expr: str) -> list[str]:
    """The identity server's metric names (and Prometheus's own series) an expression reads."""
    masked = mask_strings(expr)
    names = METRIC_NAME.findall(masked)
    names += [n for n in re.findall(r"\b[a-z_]+\b", masked) if n in PROMETHEUS_SERIES]
    return names


def created_labels(expr: str) -> set[str]:
    """Labels that ``label_replace`` makes in the expression."""
    return {dst for dst, _ in _LABEL_REPLACE_ARGS.findall(expr)}


def label_problems(expr: str) -> Iterator[str]:
    """What in ``expr`` uses a label its series do not have (empty when all is well)."""
    masked = mask_strings(expr)
    all_names = series_names(expr)
    union = set().union(*(labels_of(n) for n in all_names)) if all_names else set()
    made = created_labels(expr)

    for match in _SELECTOR.finditer(masked):
        name = match.group(1)
        if name not in sample_index() and name not in PROMETHEUS_SERIES:
            continue
        for label in _MATCHER.findall(match.group(2)):
            if label not in labels_of(name):
                yield f"{name} has no label {label!r} (matcher)"

    for _, source in _LABEL_REPLACE_ARGS.findall(expr):
        if source not in union:
            yield f"label_replace reads {source!r}, which none of {all_names} has"

    for match in _CLAUSE.finditer(masked):
        keyword, labels = (
            match.group(1),
            [s.strip() for s in match.group(2).split(",") if s.strip()],
        )
        before = masked[: match.start()].rstrip()
        if keyword in ("by", "without"):
            if re.search(rf"\b({AGGREGATIONS})$", before):
                scope = group_after(masked, match.end())
            else:
                assert before.endswith(")"), f"{keyword} clause without aggregation in {expr!r}"
                scope = group_before(masked, len(before))
            names = series_names(scope)
            for label in labels:
                if label in made:
                    continue
                for name in names:
                    if label not in labels_of(name):
                        yield f"{keyword} ({label}) over {name}, which has no such label"
        else:  # vector matching: the label must be on some operand
            for label in labels:
                if label not in union | made:
                    yield f"{keyword} ({label}): none of {all_names} has it"


def structural_problems(expr: str) -> Iterator[str]:
    """Counters and buckets under rate(), gauges not; histogram_quantile over buckets by le."""
    masked = mask_strings(expr)
    index = sample_index()
    for match in _RANGE_FUNCTION.finditer(masked):
        function, name = match.groups()
        if name in index and index[name].type not in ("counter", "histogram", "summary"):
            yield f"{function}() over the {index[name].type} {name}"
    for match in METRIC_NAME.finditer(masked):
        name = match.group()
        if name not in index or index[name].type not in ("counter", "histogram"):
            continue
        window = masked[max(0, match.start() - 40) : match.start()]
        if not re.search(r"\b(rate|irate|increase)\s*\(\s*$", window):
            yield f"the {index[name].type} {name} is read without rate() or increase()"
    for match in re.finditer(r"\bhistogram_quantile\s*\(", masked):
        inner = group_after(masked, match.start())
        names = series_names(inner)
        if not names or not all(n.endswith("_bucket") for n in names):
            yield f"histogram_quantile over {names}, not buckets"
        grouped = [m.group(2) for m in _CLAUSE.finditer(inner) if m.group(1) == "by"]
        if not any("le" in [s.strip() for s in g.split(",")] for g in grouped):
            yield "histogram_quantile over buckets not kept by le"


def unknown_names(expr: str) -> list[str]:
    index = sample_index()
    return [n for n in METRIC_NAME.findall(mask_strings(expr)) if n not in index]


def family_of(sample: str) -> str:
    return sample_index()[sample].name


# --- The dashboard ------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every query the dashboard runs, its variables' too."""
    exprs = [
        (f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
        for p in query_panels(dashboard)
        for t in p["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            exprs.append((f"variable {variable['name']}", text))
    return exprs


def test_dashboard_is_importable() -> None:
    dashboard = load_dashboard()
    for key in ("__inputs", "__requires", "panels", "templating", "title", "uid", "time"):
        assert key in dashboard, key
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # an export: Grafana gives it an id on import
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    assert ("datasource", "prometheus") in required
    panel_types = {p["type"] for p in query_panels(dashboard)}
    assert {("panel", t) for t in panel_types} <= required

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["datasource"] == DATASOURCE
    assert instance["definition"] == "label_values(matrix_identity_http_requests_total, instance)"
    assert instance["query"]["query"] == instance["definition"]
    assert instance["multi"] and instance["includeAll"]


def test_panels_have_unique_ids_and_queries_on_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert any(p["type"] == "row" for p in panels), "the panels are grouped in rows"
    titles = [p["title"] for p in query_panels(dashboard)]
    assert len(titles) == len(set(titles)), "panel titles are unique"
    for panel in query_panels(dashboard):
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == DATASOURCE, where
        assert panel.get("description"), where
        targets = panel["targets"]
        assert targets, where
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target["datasource"] == DATASOURCE, where
            assert isinstance(target["expr"], str) and target["expr"].strip(), where


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes: list[tuple[str, int, int, int, int]] = []
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        where = f"panel {panel['id']} {panel['title']!r}"
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1, where
        assert x + w <= GRID_COLUMNS, where
        if panel["type"] == "row":
            assert (x, w, h) == (0, GRID_COLUMNS, 1), where
        for other, ox, oy, ow, oh in boxes:
            overlap = x < ox + ow and ox < x + w and y < oy + oh and oy < y + h
            assert not overlap, f"{where} overlaps {other}"
        boxes.append((where, x, y, w, h))


def test_every_query_filters_on_the_instance_variable() -> None:
    for where, expr in dashboard_exprs(load_dashboard()):
        if where.startswith("variable"):
            continue
        for match in _SELECTOR.finditer(expr):
            assert 'instance=~"$instance"' in match.group(2), f"{where}: {match.group()}"
        bare = re.findall(r"\b(?:matrix_identity_[a-z0-9_]+|up)\b(?!\s*\{)", mask_strings(expr))
        assert not bare, f"{where}: {bare} read without the instance filter"


def test_dashboard_queries_read_only_exported_samples_and_their_labels() -> None:
    for where, expr in dashboard_exprs(load_dashboard()):
        assert series_names(expr), f"{where}: reads no series"
        assert not unknown_names(expr), f"{where}: not exported: {unknown_names(expr)}"
        assert not list(label_problems(expr)), f"{where}: {list(label_problems(expr))}"
        if where.startswith("variable"):
            continue  # label_values() is Grafana's, not PromQL
        assert not list(structural_problems(expr)), f"{where}: {list(structural_problems(expr))}"


def test_every_exported_family_is_on_the_dashboard() -> None:
    used = {
        family_of(name)
        for _, expr in dashboard_exprs(load_dashboard())
        for name in METRIC_NAME.findall(mask_strings(expr))
    }
    missing = set(exported_families()) - used
    assert not missing, f"families on no panel: {sorted(missing)}"


def test_the_checks_catch_mistakes() -> None:
    """The helpers above refuse what they are meant to refuse."""
    assert unknown_names("rate(matrix_identity_mails_sent[5m])") == ["matrix_identity_mails_sent"]
    assert unknown_names("matrix_identity_store_invites_created") == [
        "matrix_identity_store_invites_created"
    ]
    assert list(label_problems('matrix_identity_onbind_pending{route="/x"}'))
    assert (
        list(label_problems("sum by (template) (rate(matrix_identity_sms_sent_total[5m]))")) == []
    )
    assert list(label_problems("sum by (medium) (rate(matrix_identity_sms_sent_total[5m]))"))
    assert list(label_problems("sum(rate(matrix_identity_sms_sent_total[5m])) by (medium)"))
    assert list(label_problems("sum by (le) (rate(matrix_identity_mails_sent_total[5m]))"))
    assert list(label_problems('label_replace(up, "a", "$1", "route", "(.*)")'))
    assert list(structural_problems("rate(matrix_identity_onbind_pending[5m])"))
    assert list(structural_problems("matrix_identity_store_invites_total"))
    assert list(
        structural_problems(
            "histogram_quantile(0.9, sum by (route)"
            " (rate(matrix_identity_http_request_duration_seconds_bucket[5m])))"
        )
    )


# --- The alert rules -----------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert isinstance(data, dict) and isinstance(data["groups"], list) and data["groups"]
    rules: list[dict[str, Any]] = []
    for group in data["groups"]:
        assert isinstance(group["name"], str) and group["name"]
        assert isinstance(group["rules"], list) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_have_the_usual_shape() -> None:
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        name = rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert re.fullmatch(r"\d+[smhdw]", rule["for"]), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_alert_rules_read_only_exported_samples_and_their_labels() -> None:
    for rule in load_rules():
        where, expr = rule["alert"], rule["expr"]
        assert series_names(expr), f"{where}: reads no series"
        assert not unknown_names(expr), f"{where}: not exported: {unknown_names(expr)}"
        assert not list(label_problems(expr)), f"{where}: {list(label_problems(expr))}"
        assert not list(structural_problems(expr)), f"{where}: {list(structural_problems(expr))}"


def test_alert_annotations_name_labels_the_alert_has() -> None:
    for rule in load_rules():
        expr = mask_strings(rule["expr"])
        kept = [
            {s.strip() for s in m.group(2).split(",")}
            for m in _CLAUSE.finditer(expr)
            if m.group(1) == "by"
        ]
        names = series_names(rule["expr"])
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.([a-zA-Z_]\w*)", text):
                if kept:  # aggregated: the outer by () decides; each one keeps the label here
                    assert all(label in k for k in kept), (rule["alert"], label)
                else:
                    assert all(label in labels_of(n) for n in names), (rule["alert"], label)


def test_alert_job_is_the_documented_scrape_job() -> None:
    jobs = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    assert jobs == {"matrix-identity-appservice"}
    assert "job_name: matrix-identity-appservice" in DOCS.read_text()


def test_docs_list_every_exported_family() -> None:
    docs = DOCS.read_text()
    for family in exported_families().values():
        exported = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"| `{exported}`" in docs, f"{exported} is not in the table of docs/metrics.md"
    for rule in load_rules():
        assert f"| `{rule['alert']}` |" in docs, f"{rule['alert']} has no runbook line"


# promtool comes with Debian's prometheus package (scripts/ensure-promtool.sh, run by
# scripts/test.sh).
PROMTOOL = shutil.which("promtool")


def promtool_check_rules(path: Path) -> None:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed: scripts/ensure-promtool.sh")
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    promtool_check_rules(ALERTS)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = []
    for where, expr in dashboard_exprs(load_dashboard()):
        if where.startswith("variable"):
            continue  # label_values() is Grafana's, not PromQL
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr.replace("${1}", ""), f"{where}: a variable promtool cannot read"
        record = "dashboard:" + re.sub(r"[^a-zA-Z0-9_]", "_", where)
        rules.append({"record": record, "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool_check_rules(path)


# --- A real server's scrape ----------------------------------------------------------------------


async def test_a_servers_scrape_describes_every_family_the_dashboard_reads(api: Api) -> None:
    host, port = await api.server.serve_metrics(port=0)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    described = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    used = {
        family_of(name)
        for _, expr in dashboard_exprs(load_dashboard())
        for name in METRIC_NAME.findall(mask_strings(expr))
    }
    families = exported_families()
    for name in sorted(used):
        exported = f"{name}_total" if families[name].type == "counter" else name
        assert exported in described, f"{exported} is not in the scrape"
