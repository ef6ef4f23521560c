"""Renders and lints charts/slurm-asset-operator with the real Helm engine (helm-python-sdk,
which bundles Helm's Go library) and checks the objects it produces."""

import json
import pathlib
import re
import tomllib

import pytest
import yaml
from helm_python import chart as helm
from helm_python import errors as helm_errors

import chart_promql

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "slurm-asset-operator"


def cargo_version():
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]


def render(values=None):
    out = helm.Chart.load(str(CHART)).render(values or {}, name="sao", namespace="ops")
    objs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        objs += [d for d in yaml.safe_load_all(text) if d]
    return objs


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def deployment(objs):
    (d,) = by_kind(objs, "Deployment")
    return d


EVERYTHING_ON = {
    "replicas": 2,
    "serviceMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True, "alertLabels": {"team": "hpc"}},
    "grafanaDashboard": {"enabled": True},
    "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
    "sshSecret": {"create": True, "privateKey": "KEY"},
}


@pytest.mark.parametrize("values", [{}, {"rbac": {"clusterWide": False}, "replicas": 3, "serviceMonitor": {"enabled": True}}, EVERYTHING_ON])
def test_lints_clean(values):
    report = helm.lint(str(CHART), values, strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert report["errors"] == [] and errors == [], report


def test_default_objects_are_valid_and_secure():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ClusterRole"] * 3 + ["ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"])
    for o in objs:
        assert o["apiVersion"] and o["metadata"]["name"], o
    d = deployment(objs)
    pod = d["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["args"][0] == "run" and "--leader-election" in c["args"]
    assert "--namespace=ops" not in c["args"], "cluster-wide by default"
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], "ssh needs a writable /tmp"
    assert c["image"].endswith(":" + cargo_version())
    for kind in ["PodDisruptionBudget", "NetworkPolicy", "PrometheusRule", "ServiceMonitor", "ConfigMap", "Secret"]:
        assert by_kind(objs, kind) == [], f"no {kind} by default"


def operator_role(objs, kind="ClusterRole"):
    (role,) = [r for r in by_kind(objs, kind) if r["metadata"]["name"] == "sao-slurm-asset-operator"]
    return role


def test_rbac_is_least_privilege():
    objs = render()
    role = operator_role(objs)
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        if rule["resources"] in (["secrets"], ["configmaps"]):
            assert rule["verbs"] == ["get", "list", "watch"], "credentials are read only"
    verbs = {r: rule["verbs"] for rule in role["rules"] for r in rule["resources"]}
    assert verbs["slurmassets/status"] == ["get", "patch"]
    assert verbs["slurmassets/finalizers"] == ["update"]
    assert "delete" not in verbs["slurmassets"]
    (lease_role,) = [r for r in by_kind(objs, "Role") if r["metadata"]["name"].endswith("leader-election")]
    assert lease_role["rules"][0]["resources"] == ["leases"]


def test_user_roles_aggregate_into_edit_and_view():
    objs = render()
    roles = {r["metadata"]["name"]: r for r in by_kind(objs, "ClusterRole")}
    editor, viewer = roles["slurmasset-editor"], roles["slurmasset-viewer"]
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert "create" in editor["rules"][0]["verbs"] and "slurmassets" in editor["rules"][0]["resources"]
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in viewer["rules"])
    assert by_kind(render({"rbac": {"aggregatedRoles": False}}), "ClusterRole") == [operator_role(objs)]


def test_namespaced_secrets_grant_get_only_where_listed():
    objs = render({"rbac": {"secrets": "namespaced", "secretNamespaces": ["team-a", "team-b"]}})
    rules = [rule for rule in operator_role(objs)["rules"]]
    assert not any("secrets" in rule["resources"] for rule in rules), "no cluster-wide Secrets"
    secret_roles = [r for r in by_kind(objs, "Role") if r["metadata"]["name"].endswith("-secrets")]
    assert sorted(r["metadata"]["namespace"] for r in secret_roles) == ["team-a", "team-b"]
    assert all(r["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}] for r in secret_roles)
    args = deployment(objs)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-secret-watch" in args


def test_namespaced_mode_uses_roles_and_passes_the_namespace():
    objs = render({"rbac": {"clusterWide": False, "aggregatedRoles": False}, "leaderElection": {"enabled": False}})
    assert by_kind(objs, "ClusterRole") == [] and by_kind(objs, "ClusterRoleBinding") == []
    (role,) = by_kind(objs, "Role")
    assert role["metadata"]["namespace"] == "ops"
    args = deployment(objs)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ops" in args and "--leader-election" not in args


def test_non_default_values():
    objs = render({
        "replicas": 3,
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "sshSecret": {"create": True, "privateKey": "KEY", "knownHosts": "host ssh-ed25519 AAAA", "totpSeed": "JBSWY3DP"},
        "image": {"tag": "v9"},
    })
    d = deployment(objs)
    assert d["spec"]["replicas"] == 3
    assert d["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v9")
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    (secret,) = by_kind(objs, "Secret")
    assert secret["stringData"] == {"ssh-privatekey": "KEY", "known_hosts": "host ssh-ed25519 AAAA", "totp-seed": "JBSWY3DP"}


def test_chart_crds_equal_the_generated_ones():
    generated = (ROOT / "crds" / "crds.yaml").read_text()
    assert (CHART / "crds" / "crds.yaml").read_text() == generated, "copy crds/crds.yaml into the chart"
    crds = helm.Chart.load(str(CHART)).crds
    docs = [d for f in crds for d in yaml.safe_load_all(f["data"]) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == ["slurmassets.dagster-slurm.io", "slurmclusters.dagster-slurm.io", "slurmsessions.dagster-slurm.io"]


# --- version in one place -------------------------------------------------------------------

def test_the_version_is_cargos_everywhere():
    version = cargo_version()
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["appVersion"] == version, "Chart.yaml appVersion must equal Cargo.toml's version"
    assert meta["version"] == version, "Chart.yaml version must equal Cargo.toml's version"
    d = deployment(render())
    assert d["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":" + version)
    assert d["metadata"]["labels"]["app.kubernetes.io/version"] == version
    assert "{{ .Values.image.tag | default .Chart.AppVersion }}" in (CHART / "templates" / "deployment.yaml").read_text()


def test_chart_metadata():
    meta = helm.Chart.load(str(CHART)).metadata
    assert meta["kubeVersion"] == ">=1.31.0-0", "the CRDs' selectableFields are on by default from 1.31"
    assert meta["home"].startswith("https://") and meta["sources"] and meta["maintainers"]


# --- schema ----------------------------------------------------------------------------------

def schema():
    return json.loads((CHART / "values.schema.json").read_text())


def leaves(node, values, path=""):
    """(path, schema node, default) of every value that has no sub-properties in the schema."""
    if "properties" in node:
        assert set(node["properties"]) == set(values), f"{path or 'top level'}: schema and values.yaml keys differ"
        for key, sub in node["properties"].items():
            yield from leaves(sub, values[key], f"{path}.{key}" if path else key)
    else:
        yield path, node, values


def test_the_schema_covers_every_value_and_is_closed():
    s = schema()
    assert s["$schema"] == "http://json-schema.org/draft-07/schema#"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    found = list(leaves(s, values))
    assert len(found) > 50
    for path, node, _ in found:
        assert node.get("description"), f"{path} has no description in values.schema.json"

    def closed(node, path="(top level)"):
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, sub in node["properties"].items():
                closed(sub, key)

    closed(s)
    helm.Chart.load(str(CHART)).validate_schema(values)


BAD_VALUES = [
    ({"replicas": "three"}, "/replicas"),
    ({"replicas": 0}, "/replicas"),
    ({"rbac": {"secrets": "bogus"}}, "/rbac/secrets"),
    ({"bogus": True}, "bogus"),
    ({"image": {"tga": "v1"}}, "tga"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"metrics": {"port": 0}}, "/metrics/port"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"leaderElection": {"enabled": "yes"}}, "/leaderElection/enabled"),
    ({"rbac": {"secretNamespaces": ["Not_A_Namespace"]}}, "/rbac/secretNamespaces/0"),
    ({"prometheusRule": {"disabled": ["NoSuchAlert"]}}, "/prometheusRule/disabled/0"),
    ({"prometheusRule": {"stuckPhases": ["Stuck"]}}, "/prometheusRule/stuckPhases/0"),
    ({"prometheusRule": {"stuckFor": "half an hour"}}, "/prometheusRule/stuckFor"),
    ({"networkPolicy": {"ssh": {"ports": [22, 99999]}}}, "/networkPolicy/ssh/ports/1"),
    ({"serviceMonitor": {"interval": 30}}, "/serviceMonitor/interval"),
]


@pytest.mark.parametrize("values,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_the_engine_refuses_a_bad_value(values, where):
    # Rendering (as install, upgrade and template do) and lint both validate against the schema.
    with pytest.raises(helm_errors.HelmValuesError) as refused:
        render(values)
    assert where in str(refused.value), refused.value
    report = helm.lint(str(CHART), values, strict=True)
    assert any(where in e for e in report["errors"]), report


def test_several_replicas_need_leader_election():
    with pytest.raises(helm_errors.HelmRenderError, match="leaderElection.enabled"):
        render({"replicas": 2, "leaderElection": {"enabled": False}})


# --- chart README ------------------------------------------------------------------------------

def test_the_chart_readme_documents_every_value():
    text = (CHART / "README.md").read_text()
    rows = {m[1]: (m[2], m[3]) for m in re.finditer(r"^\| `([^`]+)` \| ([^|]+?) \| `(.*?)` \| .+ \|$", text, re.M)}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    names = {"boolean": "bool", "integer": "int", "number": "number", "string": "string", "array": "list", "object": "object"}
    for path, node, default in leaves(schema(), values):
        assert path in rows, f"{path} is missing from the values table of charts/slurm-asset-operator/README.md"
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        kind = " or ".join(names[t] for t in types)
        if kind == "object" and isinstance(node.get("additionalProperties"), dict):
            kind = "map"
        assert rows[path][0] == kind, f"{path}: README says {rows[path][0]}, the schema {kind}"
        assert json.loads(rows[path][1]) == default, f"{path}: README's default {rows[path][1]} is not values.yaml's"
    assert len(rows) == len(list(leaves(schema(), values))), "the README lists values that do not exist"


# --- PodDisruptionBudget, NetworkPolicy, uninstall safety ---------------------------------------

def test_a_disruption_budget_only_with_several_replicas():
    assert by_kind(render({"replicas": 1}), "PodDisruptionBudget") == []
    (pdb,) = by_kind(render({"replicas": 2}), "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment(render())["spec"]["selector"]["matchLabels"]
    assert by_kind(render({"replicas": 3, "podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget") == []


def test_the_network_policy_allows_metrics_in_and_dns_api_ssh_out():
    assert by_kind(render(), "NetworkPolicy") == []
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    (np,) = by_kind(render({"networkPolicy": {
        "enabled": True,
        "metricsFrom": [monitoring],
        "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
        "ssh": {"cidrs": ["192.0.2.0/24"], "ports": [22, 2222]},
        "extraEgress": [{"to": [{"ipBlock": {"cidr": "198.51.100.7/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}],
    }}), "NetworkPolicy")
    spec = np["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment(render())["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}], "from": [monitoring]}]
    dns, api, ssh, extra = spec["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert api == {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}
    assert ssh == {"ports": [{"port": 22, "protocol": "TCP"}, {"port": 2222, "protocol": "TCP"}],
                   "to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}
    assert extra["to"] == [{"ipBlock": {"cidr": "198.51.100.7/32"}}]
    # Defaults: the metrics port from anywhere; API server and SSH ports to any address.
    (np,) = by_kind(render({"networkPolicy": {"enabled": True}, "metrics": {"port": 9100}}), "NetworkPolicy")
    assert np["spec"]["ingress"] == [{"ports": [{"port": 9100, "protocol": "TCP"}]}]
    assert [r["ports"] for r in np["spec"]["egress"]][1:] == [
        [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}], [{"port": 22, "protocol": "TCP"}]]
    assert all("to" not in r for r in np["spec"]["egress"])


def test_uninstall_leaves_the_crds_and_keeps_the_ssh_secret():
    objs = render(EVERYTHING_ON)
    assert by_kind(objs, "CustomResourceDefinition") == [], "CRDs stay in crds/, which helm never deletes"
    (secret,) = by_kind(objs, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (secret,) = by_kind(render({"sshSecret": {"create": True, "keepOnUninstall": False}}), "Secret")
    assert "helm.sh/resource-policy" not in secret["metadata"].get("annotations", {})
    for o in objs:
        if o["kind"] != "Secret":
            assert "helm.sh/resource-policy" not in o["metadata"].get("annotations", {}), o["kind"]


# --- observability -------------------------------------------------------------------------------

ALERTS = ["SlurmAssetOperatorDown", "SlurmAssetOperatorNoLeader", "SlurmAssetOperatorClusterUnreachable",
          "SlurmAssetOperatorSchedulerPollFailures", "SlurmAssetOperatorReconcileErrors",
          "SlurmAssetOperatorAssetsStuck", "SlurmAssetOperatorSchedulerPollsStalled",
          "SlurmAssetOperatorSshReconnecting", "SlurmAssetOperatorSubmitSlow"]


def rules(values):
    (rule,) = by_kind(render({"prometheusRule": {"enabled": True, **values}}), "PrometheusRule")
    return rule, {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_the_prometheus_rule_renders_only_when_enabled():
    assert by_kind(render(), "PrometheusRule") == []
    rule, alerts = rules({"labels": {"release": "prom"}, "alertLabels": {"team": "hpc"}})
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "ops" and rule["metadata"]["labels"]["release"] == "prom"
    assert list(alerts) == ALERTS
    schema_alerts = schema()["properties"]["prometheusRule"]["properties"]["disabled"]["items"]["enum"]
    assert schema_alerts == ALERTS
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert["labels"]["team"] == "hpc", name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        assert alert["annotations"]["runbook_url"].endswith("docs/kubernetes.md#alerts"), name
        assert 'job="sao-slurm-asset-operator-metrics", namespace="ops"' in alert["expr"], name
        chart_promql.selectors(alert["expr"])  # parses
    assert 'phase=~"Pending|Packing|Uploading|Submitting"' in alerts["SlurmAssetOperatorAssetsStuck"]["expr"]
    assert "[30m]" in alerts["SlurmAssetOperatorAssetsStuck"]["expr"]


def test_alerts_follow_their_values():
    _, alerts = rules({"disabled": ["SlurmAssetOperatorSubmitSlow", "SlurmAssetOperatorDown"],
                       "selector": 'job="sao"', "stuckPhases": ["Pending"], "stuckFor": "2h",
                       "pollStallFor": "1h", "reconcileErrorRatio": 0.25, "sshReconnects": 7})
    assert "SlurmAssetOperatorSubmitSlow" not in alerts and "SlurmAssetOperatorDown" not in alerts
    stuck = alerts["SlurmAssetOperatorAssetsStuck"]["expr"]
    assert 'slurm_asset_operator_assets{job="sao", phase=~"Pending"}' in stuck and "[2h]" in stuck
    assert "[1h]" in alerts["SlurmAssetOperatorSchedulerPollsStalled"]["expr"]
    assert alerts["SlurmAssetOperatorReconcileErrors"]["expr"].rstrip().endswith("> 0.25")
    assert alerts["SlurmAssetOperatorSshReconnecting"]["expr"].endswith("> 7")
    _, alerts = rules({"stuckPhases": []})
    assert "SlurmAssetOperatorAssetsStuck" not in alerts


def test_the_dashboard_ships_as_a_configmap_only_when_enabled():
    assert by_kind(render(), "ConfigMap") == []
    (cm,) = by_kind(render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "HPC"}}}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "HPC"}
    text = cm["data"]["slurm-asset-operator.json"]
    assert json.loads(text) == json.loads((CHART / "dashboards" / "slurm-asset-operator.json").read_text())
    dashboard = json.loads(text)
    assert dashboard["uid"] == "slurm-asset-operator" and dashboard["panels"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), panel["title"]


def test_every_expression_parses_and_uses_the_operators_metrics():
    exprs = chart_promql.expressions(chart_promql.rendered())
    assert len(exprs) > 20
    for source, expr in exprs:
        try:
            found = chart_promql.selectors(expr)
        except ValueError as e:
            pytest.fail(f"{source}: {e}: {expr}")
        assert found, f"{source} selects no metric"
        for sel in found:
            # `up` is Prometheus' own per-target series (the operator-down alert); the names are
            # compared with the operator's real /metrics by tests/observability.rs.
            assert sel["name"].startswith("slurm_asset_operator_") or (sel["name"] == "up" and "OperatorDown" in source), (source, sel)
