//! The operator binary's Kubernetes mode as deployed: `slurm-asset-operator run` with a
//! kubeconfig, leader election, the metrics server, and a real Slurm job behind it. The API
//! server is a real kube-apiserver (`common::k8s`, found through KUBECONFIG); Slurm and sshd
//! are the real test cluster.

mod common;
use common::k8s::{Namespace, kubeconfig};
use common::*;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Replica {
    child: Child,
    metrics_port: u16,
}

impl Replica {
    fn start(ns: &str, work: &std::path::Path, name: &str) -> Replica {
        let metrics_port = free_port();
        let child = Command::new(BIN)
            .args([
                "run",
                "--leader-election",
                &format!("--namespace={ns}"),
                &format!("--lease-namespace={ns}"),
                &format!("--metrics-port={metrics_port}"),
            ])
            .arg("--work-dir")
            .arg(work.join(name))
            .env("KUBECONFIG", kubeconfig())
            .env("POD_NAME", name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Replica {
            child,
            metrics_port,
        }
    }

    /// GET on the metrics server; `None` until it answers.
    async fn get(&self, what: &str) -> Option<String> {
        let port = self.metrics_port;
        let what = what.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            write!(
                s,
                "GET {what} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
        .await
        .unwrap()
    }

    async fn metric(&self, name: &str) -> Option<String> {
        let text = self.get("/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_string)
    }

    fn terminate(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sacct_comment(job_id: &str) -> String {
    let out = Command::new("sacct")
        .args(["-X", "-n", "-P", "-j", job_id, "--format=Comment%200"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The fencing epoch of the Lease's holder: creation seconds × 10^6 + transitions + 1.
fn epoch_of(lease: &Value) -> u64 {
    let created: jiff::Timestamp = lease["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    created.as_second() as u64 * 1_000_000
        + lease["spec"]["leaseTransitions"].as_u64().unwrap_or(0)
        + 1
}

fn slurm_asset(name: &str) -> Value {
    json!({
        "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmAsset",
        "metadata": {"name": name},
        "spec": {"assetKey": format!("t/{name}"), "clusterRef": "hpc",
                 "payload": {"inline": format!("echo {name} ran")}},
    })
}

async fn succeeded(ns: &Namespace, name: &str) -> Value {
    ns.wait("slurmasset", name, "Succeeded", |o| {
        o["status"]["phase"] == "Succeeded"
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_leader_election_fences_and_hands_over() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespace::new("run");
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "slurm-ssh"},
        "data": {"ssh-privatekey": b64(&std::fs::read_to_string(&c.key).unwrap()),
                 "known_hosts": b64(&std::fs::read_to_string(&c.known_hosts).unwrap())},
    }));
    ns.apply(c.cluster_object(
        &remote_base("run"),
        &c.port,
        "slurm-ssh",
        json!({"keySecretRef": {"name": "slurm-ssh", "key": "ssh-privatekey"}}),
    ));
    ns.apply(slurm_asset("first"));

    // Replica a leads; b stands by, ready but not leading.
    let mut a = Replica::start(&ns.0, dir.path(), "op-a");
    let first = succeeded(&ns, "first").await;
    let lease = ns.get("lease", "slurm-asset-operator").expect("a Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    let epoch_a = epoch_of(&lease);
    let job = first["status"]["jobId"].as_str().unwrap().to_string();
    assert!(
        sacct_comment(&job).ends_with(&format!("epoch {epoch_a}")),
        "{}",
        sacct_comment(&job)
    );
    assert_eq!(first["status"]["logTail"]["stdout"], "first ran\n");
    let b = Replica::start(&ns.0, dir.path(), "op-b");
    eventually("b ready", async || {
        b.get("/readyz").await.filter(|r| r.contains("200 OK"))
    })
    .await;
    assert_eq!(b.metric("slurm_asset_operator_leader").await.unwrap(), "0");
    let a_metrics = a.get("/metrics").await.unwrap();
    for line in [
        "slurm_asset_operator_leader 1",
        "slurm_asset_operator_ssh_connects_total 1",
        "slurm_asset_operator_submit_latency_seconds_count 1",
    ] {
        assert!(a_metrics.contains(line), "{line} missing:\n{a_metrics}");
    }
    assert!(a.get("/healthz").await.unwrap().contains("200 OK"));

    // a stops (SIGTERM): it releases the Lease, b takes over with a higher epoch.
    a.terminate();
    let status = tokio::task::spawn_blocking(move || a.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let released = Instant::now();
    eventually("b leads", async || {
        b.metric("slurm_asset_operator_leader")
            .await
            .filter(|v| v == "1")
    })
    .await;
    // The standby takes over when the Lease is released, not when it would have expired.
    let takeover = released.elapsed();
    assert!(
        takeover < Duration::from_secs(8),
        "takeover took {takeover:?}"
    );
    let lease = ns.get("lease", "slurm-asset-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "op-b");
    let epoch_b = epoch_of(&lease);
    assert!(epoch_b > epoch_a, "{epoch_b} > {epoch_a}");
    ns.apply(slurm_asset("second"));
    let second = succeeded(&ns, "second").await;
    let job = second["status"]["jobId"].as_str().unwrap();
    assert!(
        sacct_comment(job).ends_with(&format!("epoch {epoch_b}")),
        "{}",
        sacct_comment(job)
    );
    // The first asset was not run again by the new leader.
    let again = ns.get("slurmasset", "first").unwrap();
    assert_eq!(again["status"]["jobId"], first["status"]["jobId"]);

    // The release is reinstalled: every replica stops and the Lease is deleted, so the next
    // Lease starts its transitions at 0. The fencing token must still rise, or assets that
    // ran before would be refused forever.
    let mut b = b;
    b.terminate();
    tokio::task::spawn_blocking(move || b.child.wait().unwrap())
        .await
        .unwrap();
    common::k8s::kubectl_ok(
        &["delete", "lease", "-n", &ns.0, "slurm-asset-operator"],
        None,
    );
    // Creation timestamps have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _c = Replica::start(&ns.0, dir.path(), "op-c");
    let mut rerun = slurm_asset("first");
    rerun["spec"]["runKey"] = json!("after-reinstall");
    ns.apply(rerun);
    let rerun = ns
        .wait("slurmasset", "first", "run 2 succeeded", |o| {
            o["status"]["run"] == 2 && o["status"]["phase"] == "Succeeded"
        })
        .await;
    let lease = ns.get("lease", "slurm-asset-operator").unwrap();
    let epoch_c = epoch_of(&lease);
    assert!(epoch_c > epoch_b, "{epoch_c} > {epoch_b}");
    let job = rerun["status"]["jobId"].as_str().unwrap();
    assert!(sacct_comment(job).ends_with(&format!("epoch {epoch_c}")));
}
