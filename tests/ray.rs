//! The Ray launcher (issue 13) against the real Slurm test cluster and in local mode: a head
//! on the first node and a worker on the other, the payload connected with
//! `ray.init(address="auto")`, Pipes as usual, and no Ray process left behind — after
//! success, a payload failure and `scancel`. The test cluster's nodes share one host, so two
//! Ray jobs on the same nodes also prove that their ports do not collide.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A Ray payload: reports the alive nodes and the hosts its tasks ran on; logs `started`
/// first; `RAYTEST_HOLD` makes it wait (up to 5 minutes) for a file `go` in its run dir,
/// `RAYTEST_FAIL` makes it raise after connecting.
const PAYLOAD: &str = r#"import os, socket, time
import ray
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as p:
    ray.init(address="auto")
    p.log.info("started on " + os.environ["RAY_ADDRESS"])
    alive = [n for n in ray.nodes() if n["Alive"]]
    @ray.remote(num_cpus=1)
    def where():
        time.sleep(0.5)
        return socket.gethostname()
    hosts = sorted(set(ray.get([where.remote() for _ in range(4)])))
    if os.environ.get("RAYTEST_HOLD"):
        deadline = time.time() + 300
        while not os.path.exists("go") and time.time() < deadline:
            time.sleep(0.2)
    if os.environ.get("RAYTEST_FAIL"):
        raise RuntimeError("the payload failed on purpose")
    print("ray cluster of", len(alive), "nodes", flush=True)
    p.report_asset_materialization(metadata={"alive_nodes": len(alive), "hosts": ",".join(hosts)})
"#;

/// A 2-node Ray asset on `hpc` with extra spec lines (indented by two spaces).
fn ray_asset(name: &str, ray_env: &str, extra: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n  assetKey: ray/{name}\n  clusterRef: hpc\n  launcher: {{type: ray, ray: {{objectStoreMemory: 100M}}}}\n  resources: {{nodes: 2, mem: 900M, timeLimit: \"00:10:00\"}}\n  environment: {{preDeployedEnvPath: {ray_env}}}\n{extra}  payload: {{path: payload.py}}\n"
    )
}

/// Ray's first start on a busy machine can take a while.
const LONG: Duration = Duration::from_secs(240);

#[test]
fn a_ray_asset_spans_two_nodes_reports_while_running_and_leaves_nothing_behind() {
    let (dir, c) = slurm_dir("ray-two-nodes");
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "a.yaml",
        &ray_asset(
            "a",
            &c.ray_env,
            "  env: [{name: RAYTEST_HOLD, value: \"1\"}]\n",
        ),
    );
    let _op = Operator::start_logged(dir.path(), None);
    // The payload's Pipes log reaches the status while it runs (it holds until `go`).
    let running = wait_object(
        dir.path(),
        "a",
        "the payload's first Pipes log",
        LONG,
        |v| {
            v["status"]["pipes"]["logs"].as_array().is_some_and(|l| {
                l.iter().any(|m| {
                    m["message"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("started on")
                })
            })
        },
    );
    assert_eq!(phase(&running), "Running");
    let launcher = &running["status"]["launcher"];
    assert_eq!(launcher["type"], "ray");
    assert_eq!(launcher["nodesJoined"], 2, "{launcher}");
    assert_eq!(launcher["nodesExpected"], 2);
    let head = launcher["headAddress"].as_str().unwrap();
    assert!(
        head.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
        "{head}"
    );
    let rd = run_dir(&running);
    assert!(
        !processes_of(&rd).is_empty(),
        "the Ray processes are found while they run"
    );
    std::fs::write(Path::new(&rd).join("go"), "").unwrap();
    let done = wait_object(dir.path(), "a", "the end", LONG, terminal);
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done["status"]);
    assert_eq!(metadata(&done, "alive_nodes"), 2);
    let stderr = done["status"]["logTail"]["stderr"].as_str().unwrap_or("");
    assert!(
        stderr.contains("[ray "),
        "Ray's own lines reach the log tail: {stderr}"
    );
    let stdout = done["status"]["logTail"]["stdout"].as_str().unwrap_or("");
    assert!(stdout.contains("ray cluster of 2 nodes"), "{stdout}");
    // Accounting can record the end a moment after the exit file: its figures follow.
    let metered = wait_object(dir.path(), "a", "metrics", LONG, |v| {
        !v["status"]["metrics"]["allocNodes"].is_null()
    });
    assert_eq!(metered["status"]["metrics"]["allocNodes"], 2);
    assert_nothing_left(&rd);
}

#[test]
fn two_ray_jobs_on_the_same_nodes_do_not_collide() {
    let (dir, c) = slurm_dir("ray-two-jobs");
    write(dir.path(), "payload.py", PAYLOAD);
    let same_nodes = "  resources: {nodes: 2, mem: 900M, timeLimit: \"00:10:00\", extraSbatchArgs: [\"--nodelist=n2,n3\"]}\n";
    for name in ["left", "right"] {
        let m = ray_asset(
            name,
            &c.ray_env,
            "  env: [{name: RAYTEST_HOLD, value: \"1\"}]\n",
        )
        .replace(
            "  resources: {nodes: 2, mem: 900M, timeLimit: \"00:10:00\"}\n",
            same_nodes,
        );
        write(dir.path(), &format!("{name}.yaml"), &m);
    }
    let _op = Operator::start_logged(dir.path(), None);
    // Both clusters up at once, on the same two nodes, before either payload goes on.
    let started = |v: &Value| v["status"]["launcher"]["nodesJoined"] == 2 && phase(v) == "Running";
    let x = wait_object(dir.path(), "left", "left cluster", LONG, started);
    let y = wait_object(dir.path(), "right", "right cluster", LONG, started);
    assert_eq!(x["status"]["nodes"], y["status"]["nodes"]);
    assert_ne!(
        x["status"]["launcher"]["headAddress"], y["status"]["launcher"]["headAddress"],
        "two heads on one node listen on different ports"
    );
    for v in [&x, &y] {
        std::fs::write(Path::new(&run_dir(v)).join("go"), "").unwrap();
    }
    for name in ["left", "right"] {
        let done = wait_object(dir.path(), name, "the end", LONG, terminal);
        assert_eq!(phase(&done), "Succeeded", "{:#?}", done["status"]);
        // Each payload saw its own cluster only.
        assert_eq!(metadata(&done, "alive_nodes"), 2, "{name}");
    }
    assert_nothing_left(&run_dir(&x));
    assert_nothing_left(&run_dir(&y));
}

#[test]
fn a_failing_payload_and_a_scancel_both_tear_the_cluster_down() {
    let (dir, c) = slurm_dir("ray-teardown");
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "fails.yaml",
        &ray_asset(
            "fails",
            &c.ray_env,
            "  env: [{name: RAYTEST_FAIL, value: \"1\"}]\n",
        ),
    );
    write(
        dir.path(),
        "cancelled.yaml",
        &ray_asset(
            "cancelled",
            &c.ray_env,
            "  env: [{name: RAYTEST_HOLD, value: \"1\"}]\n",
        ),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let running = wait_object(dir.path(), "cancelled", "the cluster", LONG, |v| {
        v["status"]["pipes"]["logs"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
    });
    let rd = run_dir(&running);
    assert!(!processes_of(&rd).is_empty());
    let job = running["status"]["jobId"].as_str().unwrap();
    assert!(Command::new("scancel").arg(job).status().unwrap().success());
    let cancelled = wait_object(dir.path(), "cancelled", "the end", LONG, terminal);
    assert_ne!(phase(&cancelled), "Succeeded");
    assert_nothing_left(&rd);

    let failed = wait_object(dir.path(), "fails", "the end", LONG, terminal);
    assert_eq!(phase(&failed), "Failed");
    assert_eq!(
        failed["status"]["reason"], "NonZeroExit",
        "{:#?}",
        failed["status"]
    );
    let stderr = failed["status"]["logTail"]["stderr"].as_str().unwrap_or("");
    assert!(stderr.contains("failed on purpose"), "{stderr}");
    assert_nothing_left(&run_dir(&failed));
}

#[test]
fn a_cluster_that_does_not_start_fails_the_asset_naming_the_node() {
    let (dir, c) = slurm_dir("ray-no-start");
    write(dir.path(), "payload.py", PAYLOAD);
    // The head cannot start within one second; an environment without Ray cannot start at all.
    write(
        dir.path(),
        "slow.yaml",
        &ray_asset("slow", &c.ray_env, "").replace(
            "objectStoreMemory: 100M",
            "objectStoreMemory: 100M, startTimeout: 1s",
        ),
    );
    write(
        dir.path(),
        "noray.yaml",
        &ray_asset("noray", &c.env_path, "").replace("nodes: 2, mem: 900M", "nodes: 1, mem: 100M"),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let slow = wait_object(dir.path(), "slow", "the end", LONG, terminal);
    assert_eq!(phase(&slow), "Failed");
    assert_eq!(
        slow["status"]["reason"], "LauncherFailed",
        "{:#?}",
        slow["status"]
    );
    let msg = slow["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("head on n") && msg.contains("within 1s"),
        "{msg}"
    );
    assert_nothing_left(&run_dir(&slow));
    let noray = wait_object(dir.path(), "noray", "the end", LONG, terminal);
    assert_eq!(noray["status"]["reason"], "LauncherFailed");
    assert!(
        noray["status"]["message"]
            .as_str()
            .unwrap()
            .contains("ray is not installed")
    );
}

#[test]
fn local_mode_runs_a_single_node_ray_the_same_way() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "cluster.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: hpc}\nspec: {mode: local, pollInterval: 1s}\n",
    );
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "a.yaml",
        &ray_asset("a", &c.ray_env, "  debug: true\n")
            .replace("nodes: 2, mem: 900M", "cpusPerTask: 2"),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let done = wait_object(dir.path(), "a", "the end", LONG, terminal);
    assert_eq!(phase(&done), "Succeeded", "{:#?}", done["status"]);
    assert_eq!(metadata(&done, "alive_nodes"), 1);
    assert_eq!(done["status"]["launcher"]["nodesJoined"], 1);
    assert_nothing_left(&run_dir(&done));
}
