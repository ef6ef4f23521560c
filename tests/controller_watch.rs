//! The whole Kubernetes controller (`controller::run`: list/watch of SlurmAssets, SlurmClusters
//! and Secrets, the reconcile loop, finalizers, status, Events) against a MOCKED API server
//! (`common::fake_api`, stateful, with list and watch), since no real API server can run on
//! these machines. Payloads run for real in local mode; the Slurm path of the same reconcile
//! is covered against the real Slurm in `controller_slurm.rs`.

mod common;
use common::fake_api::{FakeApi, asset_path, path};
use common::*;
use serde_json::{Value, json};
use slurm_asset_operator::controller::{Context, FINALIZER, run};
use slurm_asset_operator::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn asset(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmAsset",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

async fn wait_for(api: &FakeApi, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let obj = api.get(&asset_path(name)).unwrap_or(Value::Null);
        if pred(&obj) {
            return obj;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}: {what}; last object: {obj:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn phase(o: &Value) -> &str {
    o["status"]["phase"].as_str().unwrap_or("")
}

fn message(o: &Value) -> &str {
    o["status"]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_drive_assets_and_dependencies_wake_them() {
    let work = tempfile::tempdir().unwrap();
    let (api, client) = FakeApi::start();
    api.put(asset(
        "hello",
        json!({"assetKey": "t/hello", "payload": {"inline": "echo hello"}}),
    ));
    api.put(asset(
        "needs-cluster",
        json!({"assetKey": "t/c", "clusterRef": "later", "payload": {"inline": "echo on the cluster"}}),
    ));
    api.put(asset(
        "needs-secret",
        json!({"assetKey": "t/s", "payload": {"inline": "echo \"len=${#TOKEN}\""},
               "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app", "key": "token"}}}]}),
    ));
    // Malformed: the watch yields it through DeserializeGuard; it must not stop the others.
    api.put(asset(
        "broken",
        json!({"assetKey": "t/b", "payload": {"inline": "true"}, "resources": {"mem": "lots"}}),
    ));

    let ctx = Arc::new(
        Context::new(
            client,
            BIN.into(),
            work.path().to_path_buf(),
            Arc::new(Metrics::default()),
        )
        // These tests run payloads locally, which an administrator must allow.
        .with_local_execution(true),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run(ctx, Some("default".into()), async {
        let _ = stopped.await;
    }));

    let hello = wait_for(&api, "hello", "Succeeded", |o| phase(o) == "Succeeded").await;
    assert_eq!(hello["status"]["logTail"]["stdout"], "hello");
    assert_eq!(hello["metadata"]["finalizers"], json!([FINALIZER]));
    let broken = wait_for(&api, "broken", "Failed", |o| phase(o) == "Failed").await;
    assert!(
        message(&broken).contains("invalid memory quantity \"lots\""),
        "{broken:#}"
    );
    let c = wait_for(&api, "needs-cluster", "Failed", |o| phase(o) == "Failed").await;
    assert!(
        message(&c).contains("spec.clusterRef: SlurmCluster \"later\" not found"),
        "{c:#}"
    );
    let s = wait_for(&api, "needs-secret", "Failed", |o| phase(o) == "Failed").await;
    assert!(
        message(&s).contains("spec.env[0].valueFrom.secretKeyRef: Secret \"app\" not found"),
        "{s:#}"
    );

    // Creating what they lack wakes them through the SlurmCluster and Secret watches.
    api.put(json!({
        "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
        "metadata": {"name": "later", "namespace": "default"},
        "spec": {"mode": "local"},
    }));
    let c = wait_for(&api, "needs-cluster", "Succeeded", |o| {
        phase(o) == "Succeeded"
    })
    .await;
    assert_eq!(c["status"]["logTail"]["stdout"], "on the cluster");
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "app", "namespace": "default"},
        "data": {"token": "c2VjcmV0"},
    }));
    let s = wait_for(&api, "needs-secret", "Succeeded", |o| {
        phase(o) == "Succeeded"
    })
    .await;
    assert_eq!(s["status"]["logTail"]["stdout"], "len=6");

    // Deleting a finished asset releases it: the finalizer goes, the object with it.
    api.delete(&asset_path("hello"));
    wait_for(&api, "hello", "released", |o| o.is_null()).await;

    let log = api.log();
    // Secrets are listed and watched by metadata only; values are read by single GETs.
    let secret_watches: Vec<_> = log
        .iter()
        .filter(|r| r.uri.starts_with("/api/v1/namespaces/default/secrets?"))
        .collect();
    assert!(
        secret_watches.iter().any(|r| r.uri.contains("watch=true")),
        "{secret_watches:#?}"
    );
    for r in &secret_watches {
        assert!(
            r.accept.contains("as=PartialObjectMetadata"),
            "a Secret list/watch asked for values: {r:?}"
        );
    }
    assert!(
        log.iter()
            .any(|r| r.method == "GET"
                && r.uri.starts_with(&path("v1", "secrets", "default", "app")))
    );
    // The malformed object got one status write, not one per resync.
    let broken_writes = log
        .iter()
        .filter(|r| r.uri.contains("/slurmassets/broken/status"))
        .count();
    assert_eq!(broken_writes, 1);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), controller)
        .await
        .expect("the controller stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_holds_a_deletion_until_forced() {
    use kube::core::error_boundary::DeserializeGuard;
    use slurm_asset_operator::api::SlurmAsset;
    use slurm_asset_operator::controller::{FORCE_RELEASE, reconcile};
    let work = tempfile::tempdir().unwrap();
    let (api, client) = FakeApi::start();
    // Nothing listens on port 1: every connection is refused.
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ssh", "namespace": "default"},
        "data": {"key": "bm90IGEga2V5"},
    }));
    api.put(json!({
        "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
        "metadata": {"name": "gone", "namespace": "default"},
        "spec": {"mode": "slurm", "ssh": {"host": "127.0.0.1", "port": 1, "user": "u",
                 "keySecretRef": {"name": "ssh", "key": "key"}, "connectTimeout": "1s"}},
    }));
    let mut running = asset(
        "orphan",
        json!({"assetKey": "t/o", "clusterRef": "gone", "payload": {"inline": "sleep 1000"}}),
    );
    running["metadata"]["finalizers"] = json!([FINALIZER]);
    running["status"] = json!({"phase": "Running", "run": 1, "attempts": 1, "jobId": "4242",
                               "observedGeneration": 1, "remoteRunDir": "/nowhere/1-1"});
    api.put(running);
    api.delete(&asset_path("orphan"));
    let ctx = Arc::new(
        Context::new(
            client,
            BIN.into(),
            work.path().to_path_buf(),
            Arc::new(Metrics::default()),
        )
        // These tests run payloads locally, which an administrator must allow.
        .with_local_execution(true),
    );
    let current = || -> Arc<DeserializeGuard<SlurmAsset>> {
        Arc::new(serde_json::from_value(api.get(&asset_path("orphan")).unwrap()).unwrap())
    };

    // The cancel cannot reach the cluster: the object is held, not reported Cancelled.
    let err = reconcile(current(), ctx.clone()).await.unwrap_err();
    assert!(err.to_string().contains("cancel not confirmed"), "{err}");
    let held = api.get(&asset_path("orphan")).unwrap();
    assert_eq!(held["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(phase(&held), "Running");
    assert!(
        message(&held).contains("cancel not confirmed yet"),
        "{held:#}"
    );
    let warned = api
        .log()
        .into_iter()
        .filter(|r| r.body["reason"] == "CancelNotConfirmed")
        .count();
    assert_eq!(warned, 1, "a Warning Event when the cancel first fails");
    let gone = api
        .get(&path(
            "dagster-slurm.io/v1alpha1",
            "slurmclusters",
            "default",
            "gone",
        ))
        .unwrap();
    let reachable = &gone["status"]["conditions"][0];
    assert_eq!(reachable["type"], "Reachable", "{gone:#}");
    assert_eq!(reachable["status"], "False", "{gone:#}");
    assert_eq!(reachable["reason"], "ConnectFailed", "{gone:#}");

    // The annotation releases it at once, with a Warning Event that names the job.
    let mut forced = api.get(&asset_path("orphan")).unwrap();
    forced["metadata"]["annotations"] = json!({FORCE_RELEASE: "true"});
    api.put(forced);
    reconcile(current(), ctx.clone()).await.unwrap();
    assert!(api.get(&asset_path("orphan")).is_none(), "released");
    let warning = api
        .log()
        .into_iter()
        .find(|r| r.method == "POST" && r.body["reason"] == "ReleasedWithoutCancel")
        .expect("a Warning Event");
    assert_eq!(warning.body["type"], "Warning");
    assert!(
        warning.body["note"].as_str().unwrap().contains("job 4242"),
        "{warning:?}"
    );

    // Without the annotation, the wait is bounded: past the grace period it is released too.
    let mut stale = asset(
        "stale",
        json!({"assetKey": "t/s", "clusterRef": "gone", "payload": {"inline": "sleep 1000"}}),
    );
    stale["metadata"]["finalizers"] = json!([FINALIZER]);
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(11 * 60);
    stale["metadata"]["deletionTimestamp"] = json!(long_ago.to_string());
    stale["status"] = json!({"phase": "Queued", "run": 1, "attempts": 1, "jobId": "4343",
                             "observedGeneration": 1, "remoteRunDir": "/nowhere/1-1"});
    api.put(stale);
    let guard = Arc::new(serde_json::from_value(api.get(&asset_path("stale")).unwrap()).unwrap());
    reconcile(guard, ctx).await.unwrap();
    assert!(
        api.get(&asset_path("stale")).is_none(),
        "released after the grace period"
    );
    assert!(api.log().iter().any(|r| {
        r.body["reason"] == "ReleasedWithoutCancel"
            && r.body["note"]
                .as_str()
                .unwrap_or("")
                .contains("after the grace period")
    }));
}

#[test]
fn the_fake_api_refuses_statuses_a_real_server_would_refuse_or_prune() {
    use common::fake_api::{crd_schema, fits_schema};
    let schema = crd_schema("SlurmAsset");
    let status = &schema["properties"]["status"];
    let good = json!({"phase": "Succeeded", "run": 1, "exitCode": 0, "metrics": {"cpuEfficiency": 0.5},
                      "conditions": [{"type": "Complete", "status": "True", "reason": "Completed",
                                      "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                      "pipes": {"materializations": [{"assetKey": "a", "metadata": {"rows": {"raw_value": 1, "type": "int"}}}]}});
    fits_schema(&good, status, "status").unwrap();
    for (bad, why) in [
        (json!({"phase": "Done"}), "not one of"),
        (json!({"bogus": 1}), "unknown field"),
        (json!({"run": "one"}), "expected an integer"),
        (
            json!({"conditions": [{"type": "A", "status": "True", "reason": "r", "message": "",
                                "lastTransitionTime": "yesterday"}]}),
            "date-time",
        ),
    ] {
        let err = fits_schema(&bad, status, "status").unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}
