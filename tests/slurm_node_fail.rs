//! Retry after an infrastructure failure, for real: a node is taken down under a running job.
//! A test binary of its own, because cargo runs test binaries one after another: no other
//! test's job can be on the node when it goes down.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn scontrol(args: &[&str]) {
    let out = Command::new("scontrol")
        .args(args)
        .output()
        .expect("scontrol");
    assert!(
        out.status.success(),
        "scontrol {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_failure_is_retried_and_counted() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "cluster.yaml",
        &c.manifest("hpc", &remote_base("nodefail")),
    );
    // Pinned to n3 and not requeued by Slurm itself, so the node failure reaches the operator.
    write(
        d,
        "pinned.yaml",
        &slurm_asset(
            "pinned",
            "sleep 4; echo done",
            "  retry: {limit: 1, backoff: 1s}\n  resources: {extraSbatchArgs: ['--nodelist=n3', '--no-requeue']}\n",
        ),
    );
    let _op = Operator::start(d);
    let first = wait_for(d, "pinned", "running", |o| phase(o) == "Running");
    let first_job = first["status"]["jobId"].as_str().unwrap().to_string();
    scontrol(&["update", "nodename=n3", "state=down", "reason=sao-test"]);
    wait_for(d, "pinned", "second attempt", |o| {
        o["status"]["attempts"] == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    // With ReturnToService=2 the node may already be back when its slurmd re-registers.
    let _ = Command::new("scontrol")
        .args(["update", "nodename=n3", "state=resume"])
        .output();
    let done = wait_for(d, "pinned", "succeeded", |o| phase(o) == "Succeeded");
    let s = &done["status"];
    assert_eq!(s["attempts"], 2);
    assert_eq!(s["run"], 1);
    assert_ne!(s["jobId"].as_str().unwrap(), first_job);
    assert_eq!(s["logTail"]["stdout"], "done\n");
    let uid = done["metadata"]["uid"].as_str().unwrap();
    // The end came from the exit file; accounting records the job a moment later.
    wait_for(d, "pinned", "metrics", |o| {
        o["status"]["metrics"]["elapsedSeconds"].is_number()
    });
    let jobs = sacct_jobs(&format!("sao.{uid}.1."));
    assert_eq!(jobs.len(), 2, "one job per attempt: {jobs:?}");
    assert!(jobs.iter().any(|j| j.1 == "NODE_FAIL"), "{jobs:?}");
}
