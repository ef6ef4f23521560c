"""The PromQL of the chart's PrometheusRule and Grafana dashboard, rendered by the real Helm
engine and parsed by promql-parser (Prometheus' grammar).

Usage: chart_promql.py — prints a JSON list of {"source", "expr", "selectors": [{"name",
"labels"}]}, one per expression (used by tests/observability.rs, which compares the metric names
with the operator's /metrics).
"""

import json
import pathlib
import re
import sys

import promql_parser
import yaml
from helm_python import chart as helm

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "slurm-asset-operator"
VALUES = {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}

# Grafana's variables, as a query would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def rendered(values=None):
    out = helm.Chart.load(str(CHART)).render(values or VALUES, name="sao", namespace="ops")
    return [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d]


def expressions(objs):
    """(source, PromQL) of every alert and every dashboard query and variable."""
    exprs = []
    for o in objs:
        if o["kind"] == "PrometheusRule":
            for group in o["spec"]["groups"]:
                for rule in group["rules"]:
                    exprs.append((f"PrometheusRule {rule.get('alert') or rule.get('record')}", rule["expr"]))
        elif o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {}):
            for key, text in o["data"].items():
                exprs += dashboard_expressions(f"dashboard {key}", json.loads(text))
    return exprs


def dashboard_expressions(source, dashboard):
    exprs = []

    def panels(items):
        for panel in items:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    exprs.append((f"{source} panel {panel['title']!r}", grafana(target["expr"])))
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert m, f"{source} variable {var['name']}: a label_values(SELECTOR, LABEL) query expected: {query}"
        exprs.append((f"{source} variable {var['name']}", grafana(m[1])))
    return exprs


def grafana(expr):
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def selectors(expr):
    """The vector selectors of a PromQL expression: metric name and the labels it matches on.
    Raises ValueError when the expression does not parse."""
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = sorted({m.name for m in node.matchers.matchers if m.name != "__name__"})
            found.append({"name": node.name, "labels": labels})
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def main() -> None:
    out = [{"source": s, "expr": e, "selectors": selectors(e)} for s, e in expressions(rendered())]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
