"""The monitoring that ships with poolwatch: deploy/prometheus/alerts.yml (promtool check rules, and unit tests
with `promtool test rules` that make alerts fire and others not), the example deploy/prometheus/prometheus.yml,
the Grafana dashboard deploy/grafana/poolwatch.json, and that every metric they name is one the daemon
exports (a real Metrics behind the real MetricsServer, scraped over HTTP). Plus the per-source metrics'
own behaviour: the label cap, record_source, the health gauge read at scrape time.

promtool comes with the Debian package `prometheus` (scripts/system-deps.sh). Without it the promtool tests
are skipped, unless CI=true, where a missing promtool fails them."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from poolwatch.daemon.metrics import NOVELTY_BUCKETS, OTHER_SOURCE, QUALITY_FLAGS, VERDICTS, Metrics, MetricsServer, SourceLabels

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "poolwatch.json"
METRIC_NAME = re.compile(r"\bpoolwatch_[a-z0-9_]+")
# Grafana's variables, replaced by what they stand for so that promtool can parse the expressions.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$instance": ".*", "$source": ".*"}


# ---- helpers ---------------------------------------------------------------------------------------------
def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed ({proc.returncode}):\n{output}"
    return output


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            if panel.get("type") == "row":
                yield from walk(panel.get("panels", []))  # a collapsed row holds its panels
            else:
                yield panel

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def dashboard_variable_queries() -> list[str]:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return [v["query"]["query"] for v in variables if v["type"] == "query"]


def for_promtool(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):  # $__rate_interval before $__range
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def exported_names(text: str) -> set[str]:
    """The series names a PromQL query can select, from the families (with or without samples)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
                "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(s.name for s in family.samples)
    return names


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics(CollectorRegistry())
    server = MetricsServer(metrics, "127.0.0.1", 0, lambda: (True, "all parts alive"))
    server.start()
    try:
        yield metrics, server
    finally:
        assert server.stop()


# ---- (a) promtool accepts the rules and the example configuration ----------------------------------------
def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    out = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_promtool_checks_the_example_prometheus_config(promtool: str) -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert "alerts.yml" in config["rule_files"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["poolwatch"]  # the job the alerts select
    out = run_promtool(promtool, "check", "config", str(PROM_CONFIG), cwd=PROM_CONFIG.parent)
    assert "SUCCESS: 1 rule files found" in out and f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_every_alert_is_complete() -> None:
    rules = alert_rules()
    expected = {"PoolwatchNoSuccessfulRun", "PoolwatchSourceCorruptShareHigh", "PoolwatchSourceNearDuplicateShareHigh",
                "PoolwatchWorkerStalled", "PoolwatchWatcherOutage", "PoolwatchDown", "PoolwatchComponentRestarting"}
    assert expected <= set(rules), expected - set(rules)
    for name, rule in rules.items():
        assert rule.get("for"), f"{name} has no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """promtool has no offline PromQL parser of its own here: the dashboard's expressions (Grafana variables
    replaced) become recording rules, which `promtool check rules` parses."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr_{i}", "expr": for_promtool(e)}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


# ---- (b) the rules are real: promtool test rules ---------------------------------------------------------
def render(template: str, labels: dict[str, str], value: str) -> str:
    """The alert's annotation with its labels and (formatted) value filled in, as Prometheus renders it."""
    out = re.sub(r"\{\{ \$labels\.([a-z_]+) \}\}", lambda m: labels[m.group(1)], template)
    out = re.sub(r"\{\{ \$value[^}]*\}\}", value, out)
    assert "{{" not in out, f"a template the test cannot render: {template}"
    return out


def firing(alert: str, value: str, **labels: str) -> dict[str, Any]:
    rule = alert_rules()[alert]
    all_labels = {**labels, **rule["labels"]}
    return {"exp_labels": all_labels,
            "exp_annotations": {k: render(v, all_labels, value) for k, v in rule["annotations"].items()}}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {"job": "poolwatch", "instance": "d:9464", **labels}.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def test_alert_rules_fire_as_intended(promtool: str, tmp_path: Path) -> None:
    d = {"job": "poolwatch", "instance": "d:9464"}
    img = "poolwatch_source_images_total"
    steady = {  # 2 h of a healthy daemon: sources sending, components healthy, a fresh start
        "interval": "1m",
        "input_series": [
            series("up", "1x180"),
            series("poolwatch_start_time_seconds", "0x180"),
            series("poolwatch_last_successful_run_timestamp_seconds", "0x180"),
            # cam1: a stuck camera, 3 near duplicates a minute to 1 ok (75 %)
            series(img, "0+1x180", source="cam1", verdict="ok"),
            series(img, "0+3x180", source="cam1", verdict="near_duplicate"),
            series(img, "0x180", source="cam1", verdict="corrupt"),
            # cam2: healthy, 2 ok a minute, a corrupt image now and then (1 %)
            series(img, "0+2x180", source="cam2", verdict="ok"),
            series(img, "0+0.02x180", source="cam2", verdict="corrupt"),
            series(img, "0x180", source="cam2", verdict="near_duplicate"),
            # cam3: little volume (12 an hour), 75 % near duplicates, 25 % corrupt: below the minimum volumes
            series(img, "0+0.15x180", source="cam3", verdict="near_duplicate"),
            series(img, "0+0.05x180", source="cam3", verdict="corrupt"),
            series(img, "0x180", source="cam3", verdict="ok"),
            # the worker stalls at 100 min; the watcher stays healthy
            series("poolwatch_component_healthy", "1x100 0x80", component="worker"),
            series("poolwatch_component_healthy", "1x180", component="watcher"),
            series("poolwatch_watcher_outage", "0x180", root="/data/in"),
            series("poolwatch_component_restarts_total", "1x180", component="sampler"),
        ],
        "alert_rule_test": [
            {"eval_time": "120m", "alertname": "PoolwatchSourceNearDuplicateShareHigh",
             "exp_alerts": [firing("PoolwatchSourceNearDuplicateShareHigh", "75%", **d, source="cam1")]},
            {"eval_time": "120m", "alertname": "PoolwatchWorkerStalled",
             "exp_alerts": [firing("PoolwatchWorkerStalled", "0", **d, component="worker")]},
            {"eval_time": "103m", "alertname": "PoolwatchWorkerStalled", "exp_alerts": []},  # not yet `for` 5m
            *({"eval_time": "120m", "alertname": name, "exp_alerts": []} for name in (
                "PoolwatchSourceCorruptShareHigh", "PoolwatchComponentUnhealthy", "PoolwatchDown", "PoolwatchAbsent",
                "PoolwatchNoSuccessfulRun", "PoolwatchWatcherOutage", "PoolwatchComponentRestarting",
                "PoolwatchSourceSilent")),
        ],
    }
    trouble = {  # the other alerts, one problem each
        "interval": "1m",
        "input_series": [
            series("up", "1x30 0x30"),  # down from 30 min
            series(img, "0+2x60", source="cam2", verdict="ok"),
            series(img, "0+0.5x60", source="cam2", verdict="corrupt"),  # 20 %
            series("poolwatch_watcher_outage", "0x20 1x40", root="/data/in"),
            series("poolwatch_component_restarts_total", "1 1 2 3 4 4 4 4 4 4 4x50", component="watcher"),
        ],
        "alert_rule_test": [
            {"eval_time": "60m", "alertname": "PoolwatchDown", "exp_alerts": [firing("PoolwatchDown", "0", **d)]},
            {"eval_time": "60m", "alertname": "PoolwatchSourceCorruptShareHigh",
             "exp_alerts": [firing("PoolwatchSourceCorruptShareHigh", "20%", **d, source="cam2")]},
            {"eval_time": "60m", "alertname": "PoolwatchWatcherOutage",
             "exp_alerts": [firing("PoolwatchWatcherOutage", "1", **d, root="/data/in")]},
            {"eval_time": "60m", "alertname": "PoolwatchComponentRestarting",
             "exp_alerts": [firing("PoolwatchComponentRestarting", "3", **d, component="watcher")]},
        ],
    }
    hours = 26 * 60  # PoolwatchNoSuccessfulRun after 24 h, for three daemons
    no_run = {
        "interval": "1m",
        "input_series": [
            # never succeeded, up since t=0: fires after 24 h
            series("poolwatch_start_time_seconds", f"0x{hours}", instance="never:9464"),
            series("poolwatch_last_successful_run_timestamp_seconds", f"0x{hours}", instance="never:9464"),
            # never succeeded, but (re)started at 24.5 h: does not fire
            series("poolwatch_start_time_seconds", f"_x1470 88200x{hours - 1470}", instance="fresh:9464"),
            series("poolwatch_last_successful_run_timestamp_seconds", f"_x1470 0x{hours - 1470}", instance="fresh:9464"),
            # up since t=0, a run succeeded at 20 h: does not fire
            series("poolwatch_start_time_seconds", f"0x{hours}", instance="ran:9464"),
            series("poolwatch_last_successful_run_timestamp_seconds", f"0x1200 72000x{hours - 1200}", instance="ran:9464"),
        ],
        "alert_rule_test": [
            {"eval_time": "1445m", "alertname": "PoolwatchNoSuccessfulRun", "exp_alerts": []},  # 24 h 5 min: `for` 10m
            {"eval_time": "1500m", "alertname": "PoolwatchNoSuccessfulRun",
             "exp_alerts": [firing("PoolwatchNoSuccessfulRun", "1d 1h 0m 0s", job="poolwatch", instance="never:9464")]},
        ],
    }
    absent = {"interval": "1m", "input_series": [series("up", "_x5")],
              "alert_rule_test": [{"eval_time": "20m", "alertname": "PoolwatchAbsent",
                                   "exp_alerts": [{"exp_labels": {"job": "poolwatch", "severity": "warning"},
                                                   "exp_annotations": alert_rules()["PoolwatchAbsent"]["annotations"]}]}]}
    silent = {
        "interval": "5m",
        "input_series": [
            series(img, "0+10x72 720x100", source="cam4", verdict="ok"),  # 6 h of images, then none
            series(img, "0+10x172", source="cam5", verdict="ok"),  # keeps sending
            series(img, "0x172", source="cam6", verdict="ok"),  # has never sent anything: not silent
        ],
        "alert_rule_test": [
            {"eval_time": "13h", "alertname": "PoolwatchSourceSilent",
             "exp_alerts": [firing("PoolwatchSourceSilent", "0", **d, source="cam4")]},
            {"eval_time": "8h", "alertname": "PoolwatchSourceSilent", "exp_alerts": []},
        ],
    }
    tests = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [steady, trouble, no_run, absent, silent]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run_promtool(promtool, "test", "rules", str(path))


# ---- (c) every metric the dashboard and the alerts name is exported ---------------------------------------
def test_dashboard_and_alerts_name_only_exported_metrics(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.record_source("cam1", "ok", ["blurry"], 0.4)
    metrics.watch_health(lambda: {"worker": True, "watcher": True})
    text = scrape(server.port)
    got = samples(text)
    assert got[("poolwatch_source_images_total", frozenset({("source", "cam1"), ("verdict", "ok")}))] == 1
    assert got[("poolwatch_component_healthy", frozenset({("component", "worker")}))] == 1
    exported = exported_names(text)
    referenced: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", dashboard_exprs()), ("dashboard variables", dashboard_variable_queries()),
                         ("alerts", [r["expr"] for r in alert_rules().values()])):
        for expr in exprs:
            for name in METRIC_NAME.findall(expr):
                referenced.setdefault(name, set()).add(where)
    assert len(referenced) >= 15, sorted(referenced)  # the regex found the expressions' metrics
    missing = {name: sorted(where) for name, where in referenced.items() if name not in exported}
    assert not missing, f"named but not exported by the daemon: {missing}"
    # and the dashboard covers what issue 15 asks of it
    for name in ("poolwatch_images_ingested_total", "poolwatch_ingest_queue_depth", "poolwatch_compute_efficiency",
                 "poolwatch_images_per_second", "poolwatch_source_images_total", "poolwatch_source_novelty_distance_bucket",
                 "poolwatch_source_quality_flags_total", "poolwatch_last_successful_run_timestamp_seconds",
                 "poolwatch_near_duplicate_threshold", "poolwatch_near_duplicate_index_vectors",
                 "poolwatch_component_healthy", "poolwatch_watcher_outage"):
        assert "dashboard" in referenced.get(name, set()), f"the dashboard shows no {name}"


def test_exposition_passes_promtool_lint(promtool: str, served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.record_source("cam1", "near_duplicate", ["dark"], 0.02)
    metrics.watch_health(lambda: {"worker": False})
    proc = subprocess.run([promtool, "check", "metrics"], input=scrape(server.port), capture_output=True, text=True,
                          timeout=60)
    new = [line for line in (proc.stdout + proc.stderr).splitlines()
           if any(n in line for n in ("poolwatch_source_", "poolwatch_near_duplicate", "poolwatch_component_healthy",
                                      "poolwatch_start_time"))]
    assert not new, "promtool check metrics complains about the new metrics:\n" + "\n".join(new)


# ---- (d) the dashboard --------------------------------------------------------------------------------------
def test_dashboard_is_importable_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "source"):
        assert variables[name]["query"]["query"].startswith("label_values("), variables[name]
    panels = dashboard_panels()
    assert len(panels) >= 12
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    per_source = [t["expr"] for p in panels for t in p["targets"] if "poolwatch_source_" in t["expr"]]
    assert per_source and all('source=~"$source"' in e for e in per_source)


# ---- (e) the per-source metrics themselves -------------------------------------------------------------------
def test_source_labels_cap_and_other() -> None:
    labels = SourceLabels(3)
    assert [labels(s) for s in ("a", "b", "a", "c", "d", "e", "b")] == ["a", "b", "a", "c", OTHER_SOURCE, OTHER_SOURCE, "b"]
    assert labels.admitted() == {"a", "b", "c"}
    assert labels("d") == OTHER_SOURCE  # refused stays refused, admitted stays admitted
    assert SourceLabels(0)("a") == OTHER_SOURCE
    with pytest.raises(ValueError):
        SourceLabels(-1)


def test_source_labels_are_thread_safe() -> None:
    labels = SourceLabels(50)
    results: list[list[tuple[str, str]]] = []

    def feed(offset: int) -> None:
        names = [f"s{(offset + i) % 200}" for i in range(2000)]
        results.append([(name, labels(name)) for name in names])

    threads = [threading.Thread(target=feed, args=(k * 37,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = labels.admitted()
    assert len(admitted) == 50
    seen: dict[str, set[str]] = {}
    for got in results:
        for name, label in got:
            seen.setdefault(name, set()).add(label)
    # one answer per source, whichever thread asked: its own name if admitted, `other` if not
    assert all(got == ({name} if name in admitted else {OTHER_SOURCE}) for name, got in seen.items())


def test_record_source_increments_the_right_series() -> None:
    m = Metrics(CollectorRegistry(), source_cap=2)
    m.record_source("cam1", "ok", [], 0.5)
    m.record_source("cam1", "near_duplicate", ["blurry", "dark"], 0.03)
    m.record_source("cam2", "corrupt", [], None)
    m.record_source("cam3", "duplicate", ["odd_aspect"], 1.0)  # beyond the cap
    m.record_source("cam4", "ok", [], float("nan"))  # beyond the cap; NaN is not observed
    r = m.registry

    def v(name: str, **labels: str) -> float:
        value = r.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    assert v("poolwatch_source_images_total", source="cam1", verdict="ok") == 1
    assert v("poolwatch_source_images_total", source="cam1", verdict="near_duplicate") == 1
    assert v("poolwatch_source_images_total", source="cam1", verdict="corrupt") == 0  # all verdicts exist from the start
    assert v("poolwatch_source_images_total", source="cam2", verdict="corrupt") == 1
    assert v("poolwatch_source_images_total", source=OTHER_SOURCE, verdict="duplicate") == 1
    assert v("poolwatch_source_images_total", source=OTHER_SOURCE, verdict="ok") == 1
    assert r.get_sample_value("poolwatch_source_images_total", {"source": "cam3", "verdict": "duplicate"}) is None
    assert sum(v("poolwatch_source_images_total", source=s, verdict=x) for s in ("cam1", "cam2", OTHER_SOURCE)
               for x in VERDICTS) == 5  # one verdict per image
    assert v("poolwatch_source_quality_flags_total", source="cam1", flag="blurry") == 1
    assert v("poolwatch_source_quality_flags_total", source="cam1", flag="dark") == 1
    assert v("poolwatch_source_quality_flags_total", source="cam1", flag="bright") == 0
    assert v("poolwatch_source_quality_flags_total", source=OTHER_SOURCE, flag="odd_aspect") == 1
    assert all(v("poolwatch_source_quality_flags_total", source="cam2", flag=f) == 0 for f in QUALITY_FLAGS)
    assert v("poolwatch_source_novelty_distance_count", source="cam1") == 2
    assert v("poolwatch_source_novelty_distance_sum", source="cam1") == pytest.approx(0.53)
    assert v("poolwatch_source_novelty_distance_bucket", source="cam1", le="0.05") == 1
    assert v("poolwatch_source_novelty_distance_bucket", source="cam1", le="0.5") == 2
    assert v("poolwatch_source_novelty_distance_count", source="cam2") == 0  # no novelty measured
    assert v("poolwatch_source_novelty_distance_count", source=OTHER_SOURCE) == 1
    assert NOVELTY_BUCKETS[0] <= 0.001 and 2.0 in NOVELTY_BUCKETS and NOVELTY_BUCKETS[-1] > 2.0
    with pytest.raises(ValueError, match="verdict"):
        m.record_source("cam1", "weird", [], None)
    with pytest.raises(ValueError, match="flag"):
        m.record_source("cam1", "ok", ["sparkly"], None)
    assert v("poolwatch_source_images_total", source="cam1", verdict="ok") == 1  # a refused call counts nothing
    assert v("poolwatch_near_duplicate_threshold") == -1  # not calibrated yet
    assert v("poolwatch_near_duplicate_index_vectors") == 0


def test_health_gauge_reads_the_callback_at_each_scrape(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    key = ("poolwatch_component_healthy", frozenset({("component", "worker")}))
    assert not any(name == "poolwatch_component_healthy" for name, _ in samples(scrape(server.port)))  # nothing yet
    state = {"worker": True, "watcher": True}
    metrics.watch_health(lambda: state)
    first = samples(scrape(server.port))
    assert first[key] == 1
    state["worker"] = False
    state["sampler"] = True  # a component that appears later
    second = samples(scrape(server.port))
    assert second[key] == 0
    assert second[("poolwatch_component_healthy", frozenset({("component", "sampler")}))] == 1

    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    metrics.watch_health(broken)  # a failing callback costs its samples, not the scrape
    third = samples(scrape(server.port))
    assert key not in third and ("poolwatch_images_discovered_total", frozenset()) in third
