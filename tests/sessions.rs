//! SlurmSession (issue 13) against the real Slurm test cluster, in standalone mode: assets
//! as steps of one allocation, the concurrency limit, per-step metrics, the idle timeout,
//! a warm Ray cluster shared by Ray assets, deletion, and an operator SIGKILLed while steps
//! run.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A payload that sleeps `SLEEP` seconds and reports where it ran.
const PAYLOAD: &str = r#"import os, socket, time
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as p:
    time.sleep(float(os.environ.get("SLEEP", "3")))
    p.report_asset_materialization(metadata={"host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID", ""), "step": os.environ.get("SLURM_STEP_ID", "")})
"#;

fn session(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmSession\nmetadata: {{name: {name}}}\nspec:\n  clusterRef: hpc\n{extra}"
    )
}

fn step_asset(name: &str, session: &str, extra: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n  assetKey: sess/{name}\n  clusterRef: hpc\n  sessionRef: {session}\n{extra}  payload: {{path: payload.py}}\n"
    )
}

fn session_status(dir: &Path, name: &str) -> Option<Value> {
    let p = dir
        .join(".status/default/SlurmSession")
        .join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(p).ok()?;
    serde_saphyr::from_str(&text).ok()
}

fn done(dir: &Path, name: &str) -> Value {
    wait_until(
        &format!("{name} to end"),
        dir,
        Duration::from_secs(180),
        || read_object(dir, name).filter(terminal),
    )
}

/// sacct rows (JobID|JobName|State) of the job's steps.
fn steps_of(job: &str) -> Vec<(String, String, String)> {
    let out = Command::new("sacct")
        .args(["-j", job, "-P", "-n", "--format=JobID,JobName%100,State"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 3
                && f[0].contains('.')
                && !f[0].ends_with(".batch")
                && !f[0].ends_with(".extern"))
            .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

fn epoch(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_second())
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

#[test]
fn three_assets_run_as_steps_of_one_allocation_within_the_concurrency_limit() {
    let (dir, _c) = slurm_dir("session-steps");
    let dir = dir.path();
    write(dir, "payload.py", PAYLOAD);
    write(
        dir,
        "s1.yaml",
        &session(
            "s1",
            "  resources: {nodes: 1, ntasks: 2, mem: 1000M, timeLimit: \"00:10:00\"}\n  maxConcurrentSteps: 2\n  idleTimeout: 10s\n",
        ),
    );
    for n in ["a1", "a2", "a3"] {
        write(dir, &format!("{n}.yaml"), &step_asset(n, "s1", ""));
    }
    let _op = Operator::start_logged(dir, None);
    let ends: Vec<Value> = ["a1", "a2", "a3"].iter().map(|n| done(dir, n)).collect();
    let job = ends[0]["status"]["jobId"].as_str().unwrap().to_string();
    for e in &ends {
        assert_eq!(phase(e), "Succeeded", "{:#?}", e["status"]);
        assert_eq!(e["status"]["jobId"], job.as_str(), "one allocation for all");
        let step = e["status"]["stepId"].as_str().unwrap();
        assert!(step.starts_with(&format!("{job}.")), "{step}");
        let md = &e["status"]["pipes"]["materializations"][0]["metadata"];
        assert_eq!(md["job"]["raw_value"], job.as_str());
    }
    // Per-step metrics, once accounting has them.
    for n in ["a1", "a2", "a3"] {
        let m = wait_until("step metrics", dir, Duration::from_secs(60), || {
            read_object(dir, n).filter(|v| !v["status"]["metrics"]["elapsedSeconds"].is_null())
        });
        let m = &m["status"]["metrics"];
        assert!(m["elapsedSeconds"].as_f64().unwrap() >= 3.0, "{m}");
        assert_eq!(m["allocCpus"], 1, "{m}");
        assert!(m["maxRssBytes"].as_u64().unwrap() > 0, "{m}");
    }
    let steps = steps_of(&job);
    assert_eq!(steps.len(), 3, "three steps in sacct: {steps:?}");
    let mut names: Vec<&str> = steps.iter().map(|s| s.1.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "each step ran once: {steps:?}");
    // The limit holds: never more than two steps at once, and two did overlap.
    let spans: Vec<(i64, i64)> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| {
            let v = read_object(dir, n).unwrap();
            (
                epoch(&v["status"]["startTime"]),
                epoch(&v["status"]["endTime"]),
            )
        })
        .collect();
    let most = spans
        .iter()
        .map(|(t, _)| spans.iter().filter(|(s, e)| s <= t && t < e).count())
        .max()
        .unwrap();
    assert_eq!(
        most, 2,
        "at most two steps at once, and two at once: {spans:?}"
    );
    // The session lists nothing running any more, and ends after its idle timeout.
    let ended = wait_until("the session to end", dir, Duration::from_secs(90), || {
        session_status(dir, "s1").filter(|s| s["status"]["phase"] == "Ended")
    });
    assert_eq!(ended["status"]["jobId"], job.as_str());
    assert_eq!(ended["status"]["runningCount"], 0);
    let log = ended["status"]["allocation"]["logTail"]["stdout"]
        .as_str()
        .unwrap_or("");
    assert!(log.contains("idle for 10s"), "{log}");
}

#[test]
fn steps_survive_an_operator_sigkill_and_run_once() {
    let (dir, _c) = slurm_dir("session-sigkill");
    let dir = dir.path();
    write(dir, "payload.py", PAYLOAD);
    write(
        dir,
        "s2.yaml",
        &session(
            "s2",
            "  resources: {nodes: 1, ntasks: 2, mem: 1000M, timeLimit: \"00:10:00\"}\n  maxConcurrentSteps: 2\n  idleTimeout: 5s\n",
        ),
    );
    for n in ["k1", "k2", "k3"] {
        write(
            dir,
            &format!("{n}.yaml"),
            &step_asset(n, "s2", "  env: [{name: SLEEP, value: \"6\"}]\n"),
        );
    }
    let mut op = Operator::start_logged(dir, None);
    // Killed while two steps run and the third waits in the session's queue.
    wait_until("two running steps", dir, Duration::from_secs(120), || {
        let running = ["k1", "k2", "k3"]
            .iter()
            .filter(|n| read_object(dir, n).is_some_and(|v| phase(&v) == "Running"))
            .count();
        (running == 2).then_some(())
    });
    op.sigkill();
    std::thread::sleep(Duration::from_secs(2));
    let _op = Operator::start_logged(dir, None);
    let ends: Vec<Value> = ["k1", "k2", "k3"].iter().map(|n| done(dir, n)).collect();
    let job = ends[0]["status"]["jobId"].as_str().unwrap().to_string();
    for e in &ends {
        assert_eq!(phase(e), "Succeeded", "{:#?}", e["status"]);
        assert_eq!(e["status"]["jobId"], job.as_str());
    }
    let steps = steps_of(&job);
    let mut names: Vec<&str> = steps.iter().map(|s| s.1.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        (steps.len(), names.len()),
        (3, 3),
        "no step ran twice: {steps:?}"
    );
    assert_eq!(
        sacct_jobs("sao.")
            .iter()
            .filter(|(_, _, id)| *id == job)
            .count(),
        1
    );
}

#[test]
fn deleting_a_session_cancels_its_steps_and_its_allocation() {
    let (dir, _c) = slurm_dir("session-delete");
    let dir = dir.path();
    write(dir, "payload.py", PAYLOAD);
    write(
        dir,
        "s3.yaml",
        &session(
            "s3",
            "  resources: {nodes: 1, mem: 500M, timeLimit: \"00:10:00\"}\n",
        ),
    );
    write(
        dir,
        "long.yaml",
        &step_asset("long", "s3", "  env: [{name: SLEEP, value: \"300\"}]\n"),
    );
    let _op = Operator::start_logged(dir, None);
    let running = wait_until("the step to run", dir, Duration::from_secs(120), || {
        read_object(dir, "long").filter(|v| phase(v) == "Running")
    });
    let job = running["status"]["jobId"].as_str().unwrap().to_string();
    let s = session_status(dir, "s3").unwrap();
    assert_eq!(s["status"]["phase"], "Running");
    assert_eq!(s["status"]["runningAssets"], serde_json::json!(["long"]));
    assert!(s["status"]["remainingSeconds"].as_i64().unwrap() > 500);
    std::fs::remove_file(dir.join("s3.yaml")).unwrap();
    let end = done(dir, "long");
    assert_eq!(phase(&end), "Cancelled", "{:#?}", end["status"]);
    let state = wait_until(
        "the allocation to end",
        dir,
        Duration::from_secs(60),
        || {
            sacct_jobs("sao.")
                .into_iter()
                .find(|(_, st, id)| *id == job && st != "RUNNING")
        },
    );
    assert!(state.1.starts_with("CANCELLED"), "{state:?}");
}

/// A Ray payload that reports the cluster it joined.
const RAY_PAYLOAD: &str = r#"import os
import ray
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as p:
    ray.init(address="auto")
    alive = [n for n in ray.nodes() if n["Alive"]]
    @ray.remote
    def one():
        return 1
    total = sum(ray.get([one.remote() for _ in range(4)]))
    p.report_asset_materialization(metadata={"address": os.environ["RAY_ADDRESS"], "alive_nodes": len(alive), "total": total})
"#;

#[test]
fn ray_assets_in_a_ray_session_share_one_warm_cluster() {
    let (dir, c) = slurm_dir("session-ray");
    let dir = dir.path();
    write(dir, "payload.py", RAY_PAYLOAD);
    write(
        dir,
        "rs.yaml",
        &session(
            "rs",
            &format!(
                "  resources: {{nodes: 2, mem: 900M, timeLimit: \"00:10:00\"}}\n  ray: {{objectStoreMemory: 100M}}\n  preDeployedEnvPath: {}\n  idleTimeout: 5s\n",
                c.ray_env
            ),
        ),
    );
    for n in ["r1", "r2"] {
        write(
            dir,
            &format!("{n}.yaml"),
            &step_asset(
                n,
                "rs",
                &format!(
                    "  launcher: {{type: ray}}\n  environment: {{preDeployedEnvPath: {}}}\n",
                    c.ray_env
                ),
            ),
        );
    }
    let _op = Operator::start_logged(dir, None);
    let ends: Vec<Value> = ["r1", "r2"].iter().map(|n| done(dir, n)).collect();
    let s = session_status(dir, "rs").unwrap();
    let head = s["status"]["ray"]["headAddress"]
        .as_str()
        .expect("the session's Ray head")
        .to_string();
    assert_eq!(s["status"]["ray"]["nodesJoined"], 2);
    for e in &ends {
        assert_eq!(phase(e), "Succeeded", "{:#?}", e["status"]);
        let md = &e["status"]["pipes"]["materializations"][0]["metadata"];
        assert_eq!(
            md["address"]["raw_value"],
            head.as_str(),
            "the session's cluster"
        );
        assert_eq!(md["alive_nodes"]["raw_value"], 2);
        assert_eq!(md["total"]["raw_value"], 4);
        // The step started no cluster of its own.
        assert!(
            e["status"]["launcher"].is_null(),
            "{:#?}",
            e["status"]["launcher"]
        );
        let err = e["status"]["logTail"]["stderr"].as_str().unwrap_or("");
        assert!(!err.contains("[ray "), "{err}");
    }
    let ended = wait_until("the session to end", dir, Duration::from_secs(90), || {
        session_status(dir, "rs").filter(|s| s["status"]["phase"] == "Ended")
    });
    // One `ray start --head` in the allocation: the head announced its start once.
    let log = ended["status"]["allocation"]["logTail"]["stderr"]
        .as_str()
        .unwrap_or("");
    let heads = log
        .lines()
        .filter(|l| l.contains(" head] ") && l.contains("Ray runtime started"))
        .count();
    assert_eq!(heads, 1, "{log}");
}

/// A step the agent claims when the allocation is too near its end is refused inside the
/// allocation (not started): its asset fails with `SessionEnding`, the running one finishes.
#[test]
fn a_step_claimed_near_the_time_limit_is_refused_by_the_agent() {
    let (dir, _c) = slurm_dir("session-drain");
    let dir = dir.path();
    write(dir, "payload.py", PAYLOAD);
    // Accepted at once (2 min left, 105 s needed), but the agent runs one step at a time:
    // by the time the first has slept 20 s, less than 105 s are left.
    write(
        dir,
        "short.yaml",
        &session(
            "short",
            "  resources: {nodes: 1, timeLimit: \"00:02:00\"}\n  maxConcurrentSteps: 1\n  drainBefore: 105s\n  idleTimeout: 5s\n",
        ),
    );
    write(
        dir,
        "first.yaml",
        &step_asset("first", "short", "  env: [{name: SLEEP, value: \"20\"}]\n"),
    );
    write(
        dir,
        "second.yaml",
        &step_asset("second", "short", "  env: [{name: SLEEP, value: \"1\"}]\n"),
    );
    let _op = Operator::start_logged(dir, None);
    let first = done(dir, "first");
    let second = done(dir, "second");
    assert_eq!(phase(&first), "Succeeded", "{:#?}", first["status"]);
    assert_eq!(phase(&second), "Failed", "{:#?}", second["status"]);
    assert_eq!(
        second["status"]["reason"], "SessionEnding",
        "{:#?}",
        second["status"]
    );
    assert!(
        second["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no new steps")),
        "{:#?}",
        second["status"]
    );
    // It never ran: no step of its own in the allocation.
    assert!(
        second["status"]["stepId"].is_null(),
        "{:#?}",
        second["status"]
    );
    assert!(second["status"]["pipes"]["materializations"].is_null());
}
