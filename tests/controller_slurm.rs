//! Kubernetes mode end to end against the REAL Slurm test cluster (`tests/cluster/up`: real
//! slurmctld/slurmd/slurmdbd and sshd). Only the Kubernetes API server is MOCKED (a stateful
//! tower-test fake, `common::fake_api`), since none can run on these machines: the objects a
//! user would `kubectl apply` — a Secret with the SSH key and known hosts, a ConfigMap payload,
//! a SlurmCluster and SlurmAssets — are stored in it, and the controller's reconcile runs in a
//! loop the way kube-runtime would call it.

mod common;
use common::fake_api::{FakeApi, asset_path, path};
use common::*;
use kube::core::error_boundary::DeserializeGuard;
use serde_json::{Value, json};
use slurm_asset_operator::api::SlurmAsset;
use slurm_asset_operator::controller::{Context, FINALIZER, reconcile};
use slurm_asset_operator::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SECRET_TOKEN: &str = "s3cr3t-token-value";

/// The user's objects: SSH Secret, env Secret, payload ConfigMap and the SlurmCluster.
fn apply_cluster(api: &FakeApi, c: &TestCluster, base: &str) -> (String, String) {
    let key = std::fs::read_to_string(&c.key).unwrap();
    let known = std::fs::read_to_string(&c.known_hosts).unwrap();
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "slurm-ssh", "namespace": "default"},
        "data": {"ssh-privatekey": b64(&key), "known_hosts": b64(&known)},
    }));
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "app", "namespace": "default"},
        "data": {"token": b64(SECRET_TOKEN)},
    }));
    api.put(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "payloads", "namespace": "default"},
        "data": {"busy.sh": "end=$((SECONDS+3)); while [ $SECONDS -lt $end ]; do :; done\necho \"greeting=$GREETING token-length=${#TOKEN}\"\n"},
    }));
    api.put(c.cluster_object(
        base,
        &c.port,
        "slurm-ssh",
        json!({"keySecretRef": {"name": "slurm-ssh", "key": "ssh-privatekey"}}),
    ));
    (key, known)
}

fn apply_asset(api: &FakeApi, name: &str, spec: Value) {
    api.put(json!({
        "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmAsset",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }));
}

/// Reconciles the asset, as the controller would on each event and requeue, until `done`
/// holds for the stored object (or it is gone, which `done` sees as `Null`).
async fn reconcile_until(
    api: &FakeApi,
    ctx: &Arc<Context>,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let obj = api.get(&asset_path(name)).unwrap_or(Value::Null);
        if done(&obj) {
            return obj;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}: {what}; last object: {obj:#}"
        );
        let guard: DeserializeGuard<SlurmAsset> = serde_json::from_value(obj).unwrap();
        if let Err(e) = reconcile(Arc::new(guard), ctx.clone()).await {
            // Only a deletion waiting for its cancel may ask to be retried.
            assert!(e.to_string().contains("cancel"), "reconcile failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn phase(obj: &Value) -> &str {
    obj["status"]["phase"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_runs_on_slurm_to_succeeded_and_delete_cancels() {
    let c = test_cluster();
    let work = tempfile::tempdir().unwrap();
    let (api, client) = FakeApi::start();
    let base = remote_base("k8s");
    let (key, _) = apply_cluster(&api, &c, &base);
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        client,
        BIN.into(),
        work.path().to_path_buf(),
        metrics.clone(),
    ));

    // 1. An asset with a ConfigMap payload and a Secret env value runs to Succeeded.
    apply_asset(
        &api,
        "busy",
        json!({
            "assetKey": "analytics/busy",
            "clusterRef": "hpc",
            "payload": {"configMapRef": {"name": "payloads", "key": "busy.sh"}},
            "env": [
                {"name": "GREETING", "value": "it's $(not) run"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app", "key": "token"}}},
            ],
            "resources": {"mem": "100M", "timeLimit": "00:05:00"},
        }),
    );
    let done = reconcile_until(&api, &ctx, "busy", "Succeeded", |o| {
        matches!(phase(o), "Succeeded" | "Failed")
    })
    .await;
    let s = &done["status"];
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    assert_eq!(done["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(s["observedGeneration"], 1);
    let job_id = s["jobId"].as_str().unwrap().to_string();
    assert!(job_id.parse::<u64>().is_ok(), "{s:#}");
    assert!(
        s["metrics"]["elapsedSeconds"].as_f64().unwrap() >= 3.0,
        "{s:#}"
    );
    assert!(
        s["metrics"]["cpuEfficiency"].as_f64().unwrap() > 0.5,
        "a busy loop: {s:#}"
    );
    assert_eq!(s["metrics"]["allocNodes"], 1, "{s:#}");
    assert_eq!(
        s["logTail"]["stdout"],
        format!(
            "greeting=it's $(not) run token-length={}",
            SECRET_TOKEN.len()
        )
    );
    assert!(
        s["remoteRunDir"]
            .as_str()
            .unwrap()
            .starts_with(&format!("/home/{}/{base}/runs/default/busy/1-1", c.user)),
        "{s:#}"
    );
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Complete" && c["status"] == "True"),
        "{s:#}"
    );
    let tag = format!("sao.{}.1.1", done["metadata"]["uid"].as_str().unwrap());
    // Accounting may record the job a moment after the operator saw it end.
    let deadline = Instant::now() + Duration::from_secs(15);
    while sacct_jobs(&tag).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sacct = sacct_jobs(&tag);
    assert_eq!(sacct.len(), 1, "exactly one Slurm job: {sacct:?}");
    assert_eq!(sacct[0].2, job_id);

    // The SlurmCluster's status says what the connection learnt.
    let cluster = api
        .get(&path(
            "dagster-slurm.io/v1alpha1",
            "slurmclusters",
            "default",
            "hpc",
        ))
        .unwrap();
    let cs = &cluster["status"];
    assert_eq!(cs["conditions"][0]["type"], "Reachable", "{cs:#}");
    assert_eq!(cs["conditions"][0]["status"], "True", "{cs:#}");
    assert_eq!(cs["accountingAvailable"], true, "{cs:#}");
    assert!(
        cs["slurmVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())),
        "{cs:#}"
    );
    assert!(
        cs["platform"].as_str().unwrap().starts_with("linux-"),
        "{cs:#}"
    );

    // Every status write was server-side apply to the status subresource with our manager,
    // and each one changed something (no write of an unchanged status).
    let log = api.log();
    let writes: Vec<_> = log
        .iter()
        .filter(|r| r.uri.contains("/slurmassets/busy/status"))
        .collect();
    assert!(writes.len() >= 2, "{writes:#?}");
    for w in &writes {
        assert_eq!(w.method, "PATCH");
        assert_eq!(w.content_type, "application/apply-patch+yaml");
        assert!(
            w.uri.contains("fieldManager=slurm-asset-operator"),
            "{}",
            w.uri
        );
    }
    for pair in writes.windows(2) {
        assert_ne!(
            pair[0].body, pair[1].body,
            "an unchanged status was written"
        );
    }
    // An Event per phase change, ending with the success.
    let events: Vec<_> = log
        .iter()
        .filter(|r| r.method == "POST" && r.uri.contains("/events"))
        .map(|r| r.body["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(events.iter().any(|r| r == "Completed"), "{events:?}");
    // Secrets stay secret: not in any request the operator made (status, events).
    for r in &log {
        let text = r.body.to_string();
        assert!(!text.contains(SECRET_TOKEN), "token leaked in {r:?}");
        assert!(!text.contains("PRIVATE KEY"), "key leaked in {r:?}");
    }
    // The key went to a private file in the work dir.
    let ssh_dir = work.path().join("ssh");
    for f in std::fs::read_dir(&ssh_dir).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let f = f.unwrap();
        let mode = f.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.path().display());
        if f.file_name().to_string_lossy().ends_with("-key") {
            assert_eq!(std::fs::read_to_string(f.path()).unwrap(), key);
        }
    }

    // 2. Deleting a running asset cancels its Slurm job, then releases the object.
    apply_asset(
        &api,
        "long",
        json!({
            "assetKey": "analytics/long",
            "clusterRef": "hpc",
            "payload": {"inline": "echo started; sleep 300"},
        }),
    );
    let running = reconcile_until(&api, &ctx, "long", "Running", |o| phase(o) == "Running").await;
    let long_id = running["status"]["jobId"].as_str().unwrap().to_string();
    api.delete(&asset_path("long"));
    reconcile_until(&api, &ctx, "long", "released", |o| o.is_null()).await;
    let release = api
        .log()
        .into_iter()
        .rev()
        .find(|r| r.uri.contains("/slurmassets/long/status"))
        .unwrap();
    assert_eq!(release.body["status"]["phase"], "Cancelled", "{release:#?}");
    assert_eq!(release.body["status"]["reason"], "Deleted");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = sacct_jobs(&format!(
            "sao.{}.1.1",
            running["metadata"]["uid"].as_str().unwrap()
        ));
        if jobs.len() == 1 && jobs[0].1.starts_with("CANCELLED") {
            assert_eq!(jobs[0].2, long_id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not cancelled in sacct: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // One SSH master for both assets; the scheduler is polled in batches.
    assert_eq!(metrics.counters.ssh_connects.load(Ordering::Relaxed), 1);
    assert!(metrics.counters.scheduler_polls.load(Ordering::Relaxed) >= 1);
    let text = metrics.render();
    for line in [
        "slurm_asset_operator_submit_latency_seconds_count 2",
        "slurm_asset_operator_assets{phase=\"Succeeded\"} 1",
        "slurm_asset_operator_assets{phase=\"Running\"} 0",
        "slurm_asset_operator_ssh_connects_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_one_time_code_from_secrets() {
    // The test cluster's second sshd asks for the password, then a TOTP code (PAM).
    let c = test_cluster();
    let work = tempfile::tempdir().unwrap();
    let (api, client) = FakeApi::start();
    let known = std::fs::read_to_string(&c.known_hosts).unwrap();
    let login = |seed: &str| {
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "login", "namespace": "default"},
            "data": {"password": b64(&c.password), "totp": b64(seed), "known_hosts": b64(&known)},
        })
    };
    api.put(login(&c.totp_seed));
    api.put(c.cluster_object(
        &remote_base("k8s-totp"),
        &c.otp_port,
        "login",
        json!({"passwordSecretRef": {"name": "login", "key": "password"},
               "totpSecretRef": {"name": "login", "key": "totp"}}),
    ));
    apply_asset(
        &api,
        "otp",
        json!({"assetKey": "t/otp", "clusterRef": "hpc", "payload": {"inline": "echo via otp"}}),
    );
    let ctx = Arc::new(Context::new(
        client,
        BIN.into(),
        work.path().to_path_buf(),
        Arc::new(Metrics::default()),
    ));
    let done = reconcile_until(&api, &ctx, "otp", "Succeeded", |o| {
        matches!(phase(o), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!(done["status"]["phase"], "Succeeded", "{done:#}");
    assert_eq!(done["status"]["logTail"]["stdout"], "via otp");
    for r in api.log() {
        let text = r.body.to_string();
        assert!(!text.contains(&c.totp_seed), "seed leaked in {r:?}");
        assert!(!text.contains(&c.password), "password leaked in {r:?}");
    }
    // Password and seed stay in memory: no file of the work dir holds them.
    for f in walkdir(work.path()) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        assert!(!text.contains(&c.totp_seed), "{}", f.display());
        assert!(!text.contains(&c.password), "{}", f.display());
    }

    // A Secret whose seed is not base32 is named in the status, never echoed.
    api.put(login("not a seed!"));
    apply_asset(
        &api,
        "bad-seed",
        json!({"assetKey": "t/bad", "clusterRef": "hpc", "payload": {"inline": "true"}}),
    );
    let bad = reconcile_until(&api, &ctx, "bad-seed", "Failed", |o| phase(o) == "Failed").await;
    let message = bad["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.ssh.totpSecretRef") && message.contains("not a base32 TOTP seed"),
        "{message}"
    );
    assert!(!message.contains("not a seed!"), "{message}");
    // Fixing the Secret (its watch re-reconciles the asset) lets the same spec run.
    api.put(login(&c.totp_seed));
    let fixed = reconcile_until(&api, &ctx, "bad-seed", "Succeeded", |o| {
        phase(o) == "Succeeded"
    })
    .await;
    assert_eq!(fixed["status"]["observedGeneration"], 1);
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_asset_reconciles_share_one_scheduler_poll_per_interval() {
    let c = test_cluster();
    let work = tempfile::tempdir().unwrap();
    let (api, client) = FakeApi::start();
    apply_cluster(&api, &c, &remote_base("k8s-batch"));
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        client,
        BIN.into(),
        work.path().to_path_buf(),
        metrics.clone(),
    ));
    let names: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    for n in &names {
        apply_asset(
            &api,
            n,
            json!({"assetKey": format!("t/{n}"), "clusterRef": "hpc",
                   "payload": {"inline": "sleep 3; echo ok"}}),
        );
    }
    // Every asset reconciled on its own, over and over, as the controller's requeues do.
    let started = Instant::now();
    let mut reconciles = 0;
    loop {
        let mut done = 0;
        for n in &names {
            let obj = api.get(&asset_path(n)).unwrap();
            if phase(&obj) == "Succeeded" {
                done += 1;
                continue;
            }
            assert!(phase(&obj) != "Failed", "{obj:#}");
            let guard: DeserializeGuard<SlurmAsset> = serde_json::from_value(obj).unwrap();
            reconcile(Arc::new(guard), ctx.clone()).await.unwrap();
            reconciles += 1;
        }
        if done == names.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not all succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let polls = metrics.counters.scheduler_polls.load(Ordering::Relaxed);
    let bound = started.elapsed().as_secs() + 2; // pollInterval is 1s
    assert!(
        polls <= bound,
        "{polls} scheduler polls for {reconciles} reconciles in {:?}",
        started.elapsed()
    );
    assert!(
        reconciles > 3 * polls as usize,
        "{reconciles} reconciles, {polls} polls"
    );
    assert_eq!(metrics.counters.ssh_connects.load(Ordering::Relaxed), 1);
    for n in &names {
        assert_eq!(
            api.get(&asset_path(n)).unwrap()["status"]["logTail"]["stdout"],
            "ok"
        );
    }
}
