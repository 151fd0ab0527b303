"""Writes deploy/grafana/cpn.json, the Grafana dashboard of a cpn network (run: python make_dashboard.py).

Panels are listed here as data so they are reviewed as code; the JSON is what operators import
(Dashboards -> New -> Import, pick the Prometheus data source). Every expression uses only
families a live hub exports (tests/e2e/test_operations_metrics.py checks that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
INFER_ROUTES = "/v1/chat/completions|/v1/completions|/v1/infer"

_next_id = 0


def _id() -> int:
    global _next_id
    _next_id += 1
    return _next_id


def target(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": "ABCDEFGH"[0],
            "instant": instant, "range": not instant}


def stat(title: str, expr: str, x: int, y: int, *, unit: str = "none", thresholds: list[tuple[float | None, str]] | None = None,
         desc: str = "") -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "id": _id(), "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": 4, "w": 4, "x": x, "y": y},
        "targets": [target(expr, instant=True)],
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background",
                    "graphMode": "area", "textMode": "auto", "justifyMode": "auto", "orientation": "auto"},
    }


def series(title: str, exprs: list[tuple[str, str]], x: int, y: int, *, unit: str = "short", w: int = 12, h: int = 8,
           stack: bool = False, desc: str = "") -> dict[str, Any]:
    targets = []
    for i, (expr, legend) in enumerate(exprs):
        t = target(expr, legend)
        t["refId"] = "ABCDEFGH"[i]
        targets.append(t)
    return {
        "id": _id(), "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                                                               "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                                                               "showPoints": "never"}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def row(title: str, y: int) -> dict[str, Any]:
    return {"id": _id(), "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [row("Network", 0)]
    out += [
        stat("Sites up", "sum(cpn_site_up)", 0, 1, thresholds=[(None, "red"), (1, "green")]),
        stat("Sites lost", "count(cpn_site_up == 0) or vector(0)", 4, 1, thresholds=[(None, "green"), (1, "red")],
             desc="Sites without a heartbeat for longer than the detection period (3 s by default)."),
        stat("Hub ready", "min(cpn_ready)", 8, 1, thresholds=[(None, "red"), (1, "green")], desc="/readyz: 1 ready, 0 not"),
        stat("NATS connected", "min(cpn_nats_connected)", 12, 1, thresholds=[(None, "red"), (1, "green")]),
        stat("Jobs queued", 'sum(cpn_jobs{state="queued"})', 16, 1),
        stat("Oldest queued job", "max(cpn_job_queue_oldest_seconds)", 20, 1, unit="s",
             thresholds=[(None, "green"), (3600, "orange"), (14400, "red")]),
    ]
    out += [
        series("Sites up by tier", [("sum by (tier) (cpn_site_up)", "{{tier}}")], 0, 5, stack=True),
        series("Cards busy by accelerator", [('sum by (accelerator) (cpn_cards{state="busy"})', "{{accelerator}} busy"),
                                             ('sum by (accelerator) (cpn_cards{state="free"})', "{{accelerator}} free")],
               12, 5, desc="From the sites' heartbeats; a lost site's cards count as neither."),
    ]
    out.append(row("Inference", 13))
    out += [
        series("Requests/s by tenant", [(f'sum by (tenant) (rate(cpn_tenant_requests_total[$__rate_interval]))', "{{tenant}}")],
               0, 14, unit="reqps", stack=True),
        series("Tokens/s by model", [('sum by (model, kind) (rate(cpn_tokens_total[$__rate_interval]))', "{{model}} {{kind}}")],
               12, 14, unit="short", stack=True),
        series("Error share (5xx) of inference requests",
               [(f'sum(rate(cpn_http_requests_total{{route=~"{INFER_ROUTES}",status=~"5.."}}[$__rate_interval])) / '
                 f'sum(rate(cpn_http_requests_total{{route=~"{INFER_ROUTES}"}}[$__rate_interval]))', "5xx share"),
                ('sum by (reason) (rate(cpn_route_decisions_total{reason=~"refused:.*"}[$__rate_interval])) / '
                 'scalar(sum(rate(cpn_route_decisions_total[$__rate_interval])))', "{{reason}}")],
               0, 22, unit="percentunit"),
        series("Time to first token (hub-measured)",
               [('histogram_quantile(0.5, sum by (le, model) (rate(cpn_inference_ttft_seconds_bucket[$__rate_interval])))', "p50 {{model}}"),
                ('histogram_quantile(0.99, sum by (le, model) (rate(cpn_inference_ttft_seconds_bucket[$__rate_interval])))', "p99 {{model}}")],
               12, 22, unit="s"),
        series("Answer time p99 by site",
               [('histogram_quantile(0.99, sum by (le, site) (rate(cpn_inference_seconds_bucket[$__rate_interval])))', "{{site}}")],
               0, 30, unit="s"),
        series("Requests/s by serving site", [('sum by (site) (rate(cpn_inference_requests_total[$__rate_interval]))', "{{site}}")],
               12, 30, unit="reqps", stack=True),
        series("Replicas by model and state", [("sum by (model, state) (cpn_replicas)", "{{model}} {{state}}")], 0, 38),
        series("Deployments by state", [("sum by (state) (cpn_deployments)", "{{state}}")], 12, 38, stack=True),
    ]
    out.append(row("Training", 46))
    out += [
        series("Jobs by state", [("sum by (state) (cpn_jobs)", "{{state}}")], 0, 47, stack=True),
        series("Queue: oldest wait and cards asked", [("max(cpn_job_queue_oldest_seconds)", "oldest wait (s)"),
                                                      ("sum(cpn_job_queue_cards)", "cards asked by queued jobs")], 12, 47),
        series("Training card-hours per hour", [("sum(rate(cpn_training_card_seconds_total[$__rate_interval]))", "cards in training (card-hours per hour)")],
               0, 55, desc="Card-seconds recorded on jobs per second = cards busy with training on average."),
        series("Site queue depth", [("topk(10, cpn_site_queue_depth)", "{{site}}")], 12, 55),
    ]
    out.append(row("Hub process and NATS", 63))
    out += [
        series("NATS errors/s by kind", [("sum by (kind) (rate(cpn_nats_errors_total[$__rate_interval]))", "{{kind}}"),
                                         ("sum(rate(cpn_malformed_messages_total[$__rate_interval]))", "malformed"),
                                         ("sum(rate(cpn_nats_permission_violations_total[$__rate_interval]))", "permission violations")],
               0, 64),
        series("HTTP p99 by route", [('histogram_quantile(0.99, sum by (le, route) (rate(cpn_http_request_seconds_bucket[$__rate_interval])))', "{{route}}")],
               12, 64, unit="s"),
        series("Hub CPU", [("rate(process_cpu_seconds_total{job=~\"$job\"}[$__rate_interval])", "{{instance}}")], 0, 72, unit="percentunit"),
        series("Hub memory", [("process_resident_memory_bytes{job=~\"$job\"}", "{{instance}}")], 12, 72, unit="bytes"),
    ]
    return out


def dashboard() -> dict[str, Any]:
    return {
        "__inputs": [], "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "uid": "cpn-network", "title": "cpn — computing power network", "tags": ["cpn"],
        "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source", "current": {}, "hide": 0},
            {"name": "job", "type": "query", "datasource": DS, "query": "label_values(cpn_hub_info, job)", "refresh": 1,
             "includeAll": True, "multi": True, "current": {}, "label": "Job", "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def main() -> None:
    out = Path(__file__).with_name("cpn.json")
    out.write_text(json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
