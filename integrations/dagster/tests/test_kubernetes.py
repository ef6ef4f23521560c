"""The Pipes client and the sensor against the real Kubernetes API server, with the operator
running in Kubernetes mode over the real Slurm."""

import json
import uuid
from pathlib import Path

import dagster as dg
from conftest import PAYLOADS, kubectl, sacct_jobs, wait_until
from test_client import (
    _check_materialization,
    _materialize_releasing,
    partitioned_asset,
    two_assets_of_one_run_share_its_session,
)

from dagster_slurm_asset import KubernetesStore, PipesSlurmAssetClient, build_slurm_asset_sensor
from dagster_slurm_asset.status import metrics_pending


def test_partitioned_asset_in_kubernetes_mode(k8s_namespace, kubeconfig: str) -> None:
    ns, op = k8s_namespace
    store = KubernetesStore(ns, kubeconfig=kubeconfig)
    release = Path("/tmp") / f"sao-release-{uuid.uuid4().hex}"
    client = PipesSlurmAssetClient(store, cluster="hpc", poll_interval=0.3)
    asset = partitioned_asset(client, {"rows": 7, "release_file": str(release)})
    instance = dg.DagsterInstance.ephemeral()
    try:
        result = _materialize_releasing(instance, asset, release, "2026-11-04")
    except BaseException:
        print(op.log_text())
        raise
    finally:
        release.unlink(missing_ok=True)
    md = _check_materialization(result, "2026-11-04", local=False)
    # `kubectl get sasset -l dagster/run-id=…` finds the objects of one run.
    listed = json.loads(
        kubectl("get", "sasset", "-n", ns, "-l", f"dagster/run-id={result.run_id}", "-o", "json")
    )
    (obj,) = listed["items"]
    assert obj["status"]["jobId"] == md["slurm/job_id"]
    assert obj["metadata"]["labels"]["dagster/asset-key"].startswith("analytics.daily_rows")
    jobs = wait_until("the job in sacct", lambda: sacct_jobs(obj["metadata"]["uid"]))
    assert [j[2] for j in jobs] == [md["slurm/job_id"]]


def test_sensor_reports_kubectl_applied_assets(k8s_namespace, kubeconfig: str) -> None:
    ns, _ = k8s_namespace
    store = KubernetesStore(ns, kubeconfig=kubeconfig)
    manifest = {
        "apiVersion": "dagster-slurm.io/v1alpha1",
        "kind": "SlurmAsset",
        "metadata": {"name": "gitops", "namespace": ns},
        "spec": {
            "assetKey": "lab/gitops",
            "clusterRef": "hpc",
            "payload": {
                "inline": (PAYLOADS / "partitioned.py").read_text(),
                "interpreter": ["python3"],
            },
            "extras": {"rows": 11},
            "pipesContext": {"partitionKey": "p7"},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(manifest))

    # The end comes from the exit file and metrics a moment later; the sensor reports a run
    # once its metrics are settled.
    def settled() -> bool:
        status = (store.get("gitops") or {}).get("status") or {}
        return status.get("phase") == "Succeeded" and not metrics_pending(status)

    wait_until("the applied asset to succeed with its metrics", settled, timeout=180)
    sensor = build_slurm_asset_sensor(store)
    with dg.instance_for_test() as instance:
        result = sensor(dg.build_sensor_context(instance=instance))
        for e in result.asset_events:
            instance.report_runless_asset_event(e)
        mats = [e for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]
        assert [(m.asset_key.to_user_string(), m.partition) for m in mats] == [("lab/gitops", "p7")]
        assert mats[0].metadata["rows"].value == 11
        assert mats[0].metadata["slurm/job_id"].value.isdigit()
        again = sensor(dg.build_sensor_context(instance=instance))
        assert again.asset_events == []


def test_two_assets_of_one_run_share_the_runs_session_in_kubernetes(
    k8s_namespace, kubeconfig: str
) -> None:
    ns, op = k8s_namespace
    try:
        two_assets_of_one_run_share_its_session(KubernetesStore(ns, kubeconfig=kubeconfig))
    except BaseException:
        print(op.log_text())
        raise
