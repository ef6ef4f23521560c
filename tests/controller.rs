//! Kubernetes mode's controller glue against a MOCKED API server (tower-test): no Kubernetes
//! API server can run on these machines. Every request the reconciler makes is recorded and
//! asserted; the payloads run for real through the local executor.

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use serde_json::{Value, json};
use slurm_asset_operator::api::{SlurmAsset, SlurmAssetStatus};
use slurm_asset_operator::controller::{Context, FINALIZER, reconcile};
use slurm_asset_operator::metrics::Metrics;
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_slurm-asset-operator");

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

/// A fake API server: answers every request plausibly and records it.
fn mock_client() -> (
    Client,
    Arc<Mutex<Vec<Recorded>>>,
    tokio::task::JoinHandle<()>,
) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = Arc::new(Mutex::new(vec![]));
    let log2 = log.clone();
    let server = tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log2.lock().unwrap().push(Recorded {
                method,
                uri: uri.clone(),
                content_type,
                body: body.clone(),
            });
            // Echo a plausible object: patches and creates answer with an object of the kind.
            let answer = if uri.contains("/events") {
                json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e", "namespace": "default"}, "eventTime": "2026-01-01T00:00:00.000000Z"})
            } else {
                asset_json(&["x"], None)
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "default"), log, server)
}

fn asset_json(finalizers: &[&str], deleting: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "dagster-slurm.io/v1alpha1",
        "kind": "SlurmAsset",
        "metadata": {"name": "a", "namespace": "default", "uid": "uid-1", "generation": 1, "resourceVersion": "1", "finalizers": finalizers},
        "spec": {"assetKey": "k/a", "payload": {"inline": "sleep 300"}},
    });
    if let Some(t) = deleting {
        v["metadata"]["deletionTimestamp"] = json!(t);
    }
    v
}

fn context(client: Client, dir: &std::path::Path) -> Arc<Context> {
    Arc::new(
        Context::new(
            client,
            BIN.into(),
            dir.to_path_buf(),
            Arc::new(Metrics::default()),
        )
        // These tests run payloads locally, which an administrator must allow.
        .with_local_execution(true),
    )
}

fn guard(v: Value) -> Arc<DeserializeGuard<SlurmAsset>> {
    Arc::new(serde_json::from_value(v).unwrap())
}

#[tokio::test]
async fn first_reconcile_adds_the_finalizer() {
    let dir = tempfile::tempdir().unwrap();
    let (client, log, _server) = mock_client();
    reconcile(guard(asset_json(&[], None)), context(client, dir.path()))
        .await
        .unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0].method, "PATCH");
    assert!(
        log[0]
            .uri
            .starts_with("/apis/dagster-slurm.io/v1alpha1/namespaces/default/slurmassets/a?"),
        "{}",
        log[0].uri
    );
    assert_eq!(log[0].content_type, "application/json-patch+json");
    let ops = log[0].body.as_array().unwrap();
    assert!(
        ops.iter().any(|op| op["op"] == "add"
            && op["path"]
                .as_str()
                .unwrap()
                .starts_with("/metadata/finalizers")
            && (op["value"] == json!([FINALIZER]) || op["value"] == json!(FINALIZER))),
        "{ops:#?}"
    );
}

#[tokio::test]
async fn apply_submits_and_writes_status_by_server_side_apply_then_deletion_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let (client, log, _server) = mock_client();
    let ctx = context(client, dir.path());
    reconcile(guard(asset_json(&[FINALIZER], None)), ctx.clone())
        .await
        .unwrap();
    let first: Vec<Recorded> = log.lock().unwrap().drain(..).collect();
    let status_patch = first
        .iter()
        .find(|r| r.uri.contains("/slurmassets/a/status"))
        .unwrap_or_else(|| panic!("no status patch in {first:#?}"));
    assert_eq!(status_patch.method, "PATCH");
    assert_eq!(status_patch.content_type, "application/apply-patch+yaml");
    assert!(
        status_patch
            .uri
            .contains("fieldManager=slurm-asset-operator")
            && status_patch.uri.contains("force=true"),
        "{}",
        status_patch.uri
    );
    let status: SlurmAssetStatus =
        serde_json::from_value(status_patch.body["status"].clone()).unwrap();
    assert_eq!(status.run, 1);
    assert!(
        matches!(status.phase.as_str(), "Queued" | "Running"),
        "{status:?}"
    );
    assert_eq!(status_patch.body["kind"], "SlurmAsset");
    assert!(
        first
            .iter()
            .any(|r| r.method == "POST" && r.uri.contains("/events")),
        "an Event on the phase change: {first:#?}"
    );
    let pid: i32 = status.job_id.clone().unwrap().parse().unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the payload runs"
    );

    // Deletion: the object now carries a deletionTimestamp and the status written above.
    let mut deleting = asset_json(&[FINALIZER], Some(&jiff::Timestamp::now().to_string()));
    deleting["status"] = serde_json::to_value(&status).unwrap();
    reconcile(guard(deleting), ctx.clone()).await.unwrap();
    let second: Vec<Recorded> = log.lock().unwrap().drain(..).collect();
    let cancelled = second
        .iter()
        .find(|r| r.uri.contains("/status"))
        .unwrap_or_else(|| panic!("no status patch in {second:#?}"));
    assert_eq!(cancelled.body["status"]["phase"], "Cancelled");
    assert_eq!(cancelled.body["status"]["reason"], "Deleted");
    let release = second.last().unwrap();
    assert_eq!(release.method, "PATCH");
    assert_eq!(release.content_type, "application/json-patch+json");
    assert!(
        release
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "remove"),
        "finalizer removed last: {second:#?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "the job's process group was terminated"
    );
}

#[tokio::test]
async fn malformed_object_gets_a_condition_and_reconcile_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (client, log, _server) = mock_client();
    let mut bad = asset_json(&[], None);
    bad["spec"]["resources"] = json!({"mem": "lots"});
    // What the watcher yields for an object that does not deserialize: the guard keeps the error.
    let g: DeserializeGuard<SlurmAsset> = serde_json::from_value(bad).unwrap();
    assert!(g.0.is_err());
    let g = Arc::new(g);
    let ctx = context(client, dir.path());
    let action = reconcile(g.clone(), ctx.clone()).await;
    assert!(action.is_ok());
    let sent = log.lock().unwrap().drain(..).collect::<Vec<_>>();
    // A read of the object (to name the failing field), a status patch and an Event.
    assert_eq!(sent.len(), 3, "{sent:#?}");
    assert_eq!(sent[0].method, "GET");
    assert!(sent[0].uri.ends_with("/slurmassets/a"), "{}", sent[0].uri);
    let sent = &sent[1..];
    assert!(sent[0].uri.contains("/slurmassets/a/status"));
    assert_eq!(sent[1].method, "POST");
    assert!(sent[1].uri.contains("/events"), "{}", sent[1].uri);
    assert_eq!(sent[1].body["type"], "Warning");
    assert_eq!(sent[1].body["reason"], "InvalidSpec");
    assert_eq!(sent[1].body["regarding"]["name"], "a");
    // A resync of the same object changes nothing: no write, no second Event.
    reconcile(g, ctx).await.unwrap();
    assert!(log.lock().unwrap().is_empty(), "nothing new to say");
    let s = &sent[0].body["status"];
    assert_eq!(s["phase"], "Failed");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("invalid memory quantity \"lots\""),
        "{s:#}"
    );
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Invalid" && c["status"] == "True")
    );
}

#[test]
fn a_list_with_a_malformed_item_still_yields_the_valid_ones() {
    let mut bad = asset_json(&[], None);
    bad["spec"]["payload"] = json!({"inline": 5, "extra": true});
    let list: Vec<DeserializeGuard<SlurmAsset>> =
        serde_json::from_value(json!([asset_json(&[], None), bad])).unwrap();
    assert!(list[0].0.is_ok());
    let InvalidObject { metadata, .. } = list[1].0.clone().unwrap_err();
    assert_eq!(metadata.name.as_deref(), Some("a"));
}
