"""Renders and lints charts/slurm-asset-operator with the real Helm engine (helm-python-sdk,
which bundles Helm's Go library) and checks the objects it produces."""

import pathlib

import pytest
import yaml
from helm_python import chart as helm

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "slurm-asset-operator"


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


@pytest.mark.parametrize("values", [{}, {"rbac": {"clusterWide": False}, "replicas": 3, "serviceMonitor": {"enabled": True}}])
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
    assert c["image"].endswith(":0.1.0")


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
