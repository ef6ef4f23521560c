//! The Spark launcher (issue 14) against the real Slurm test cluster and in local mode: a
//! standalone master on the first node, a worker on every node, a PySpark payload that finds
//! them through `SPARK_CONF_DIR`, Pipes as usual, and no Spark process left behind — after
//! success, a payload failure and `scancel`. The nodes share one host, so every job's ports
//! are chosen free.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// A PySpark payload: waits for `SPARKTEST_EXECUTORS` executors, counts a generated dataset,
/// reports the Slurm nodes its tasks ran on (the executors inherit their worker's
/// `SLURMD_NODENAME`); `SPARKTEST_HOLD` makes it wait for a file `go`, `SPARKTEST_FAIL` fail.
const PAYLOAD: &str = r#"import os, time
from dagster_pipes import open_dagster_pipes
from pyspark.sql import SparkSession
with open_dagster_pipes() as p:
    spark = SparkSession.builder.appName("sao-count").getOrCreate()
    sc = spark.sparkContext
    want = int(os.environ.get("SPARKTEST_EXECUTORS", "0"))
    deadline = time.time() + 120
    # The driver counts itself among the block managers.
    while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < want and time.time() < deadline:
        time.sleep(0.2)
    p.log.info("started on " + os.environ["SPARK_MASTER_URL"])
    n = sc.parallelize(range(100000), 8).filter(lambda x: x % 3 == 0).count()
    nodes = sorted(set(sc.parallelize(range(32), 16).map(lambda _: os.environ.get("SLURMD_NODENAME", "local")).collect()))
    if os.environ.get("SPARKTEST_HOLD"):
        end = time.time() + 300
        while not os.path.exists("go") and time.time() < end:
            time.sleep(0.2)
    if os.environ.get("SPARKTEST_FAIL"):
        raise RuntimeError("the payload failed on purpose")
    p.report_asset_materialization(metadata={
        "count": n, "nodes": ",".join(nodes), "master": sc.master,
        "executor_memory": sc.getConf().get("spark.executor.memory", ""),
    })
    spark.stop()
"#;

/// A 2-node Spark asset on `hpc` with extra spec lines (indented by two spaces).
fn spark_asset(name: &str, env: &str, extra: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n  assetKey: spark/{name}\n  clusterRef: hpc\n  launcher: {{type: spark, spark: {{executorMemory: 600M, driverMemory: 600M}}}}\n  resources: {{nodes: 2, mem: 1800M, timeLimit: \"00:10:00\"}}\n  environment: {{preDeployedEnvPath: {env}}}\n{extra}  payload: {{path: payload.py}}\n"
    )
}

/// Spark's JVMs start slowly on a busy machine.
const LONG: Duration = Duration::from_secs(240);

#[test]
fn a_pyspark_payload_counts_with_executors_on_both_nodes_and_leaves_nothing_behind() {
    let (dir, c) = slurm_dir("spark-two-nodes");
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "count.yaml",
        &spark_asset(
            "count",
            &c.spark_env,
            "  env: [{name: SPARKTEST_EXECUTORS, value: \"2\"}]\n",
        ),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let running = wait_object(dir.path(), "count", "the payload's log", LONG, |v| {
        v["status"]["pipes"]["logs"].as_array().is_some_and(|l| {
            l.iter()
                .any(|m| m.to_string().contains("started on spark://"))
        }) || terminal(v)
    });
    assert_eq!(phase(&running), "Running", "{:#}", running["status"]);
    let launcher = &running["status"]["launcher"];
    assert_eq!(launcher["type"], "spark", "{launcher:#}");
    assert_eq!(launcher["nodesJoined"], 2, "{launcher:#}");
    assert!(
        launcher["headAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with("spark://")),
        "{launcher:#}"
    );
    assert!(launcher["dashboardPort"].as_u64().is_some(), "{launcher:#}");
    let done = wait_object(dir.path(), "count", "the end", LONG, terminal);
    assert_eq!(phase(&done), "Succeeded", "{:#}", done["status"]);
    assert_eq!(metadata(&done, "count"), 33334);
    assert_eq!(metadata(&done, "nodes"), "n1,n2", "executors on both nodes");
    assert_eq!(metadata(&done, "master"), launcher["headAddress"]);
    assert_eq!(metadata(&done, "executor_memory"), "600m");
    // Spark's own lines reach the log tail, named by node (the master's first: later lines
    // push them out of the tail by the end).
    let err = running["status"]["logTail"]["stderr"]
        .as_str()
        .unwrap_or("");
    assert!(err.contains("[spark n1 master]"), "{err}");
    let err = done["status"]["logTail"]["stderr"].as_str().unwrap_or("");
    assert!(err.contains("[spark n2] "), "{err}");
    assert_nothing_left(&run_dir(&running));
}

#[test]
fn a_failing_payload_and_a_scancel_both_tear_the_cluster_down() {
    let (dir, c) = slurm_dir("spark-teardown");
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "held.yaml",
        &spark_asset(
            "held",
            &c.spark_env,
            "  env: [{name: SPARKTEST_HOLD, value: \"1\"}]\n",
        ),
    );
    write(
        dir.path(),
        "fails.yaml",
        &spark_asset(
            "fails",
            &c.spark_env,
            "  env: [{name: SPARKTEST_FAIL, value: \"1\"}]\n",
        ),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let running = wait_object(dir.path(), "held", "its Spark cluster", LONG, |v| {
        v["status"]["pipes"]["logs"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
            || terminal(v)
    });
    assert_eq!(phase(&running), "Running", "{:#}", running["status"]);
    let job = running["status"]["jobId"].as_str().unwrap().to_string();
    let held_dir = run_dir(&running);
    assert!(!processes_of(&held_dir).is_empty(), "the cluster runs");
    let out = Command::new("scancel").arg(&job).output().unwrap();
    assert!(out.status.success());
    let cancelled = wait_object(dir.path(), "held", "the end", LONG, terminal);
    assert_eq!(phase(&cancelled), "Cancelled", "{:#}", cancelled["status"]);
    assert_nothing_left(&held_dir);
    let failed = wait_object(dir.path(), "fails", "the end", LONG, terminal);
    assert_eq!(phase(&failed), "Failed", "{:#}", failed["status"]);
    assert_eq!(failed["status"]["exitCode"], 1, "{:#}", failed["status"]);
    assert_nothing_left(&run_dir(&failed));
}

#[test]
fn a_cluster_that_cannot_start_fails_the_asset_naming_why() {
    let (dir, c) = slurm_dir("spark-nospark");
    write(dir.path(), "payload.py", PAYLOAD);
    // The Ray environment has no pyspark: there is no Spark to start.
    write(
        dir.path(),
        "nospark.yaml",
        &spark_asset("nospark", &c.ray_env, ""),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let done = wait_object(dir.path(), "nospark", "the end", LONG, terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Failed", "{s:#}");
    assert_eq!(s["reason"], "LauncherFailed", "{s:#}");
    assert!(
        s["launcher"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no Spark in the job's environment")),
        "{s:#}"
    );
}

#[test]
fn local_mode_runs_local_star() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "payload.py", PAYLOAD);
    write(
        dir.path(),
        "local.yaml",
        &format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: local}}\nspec:\n  assetKey: spark/local\n  launcher: {{type: spark}}\n  environment: {{preDeployedEnvPath: {}}}\n  payload: {{path: payload.py}}\n",
            c.spark_env
        ),
    );
    let out = run_once(dir.path(), None);
    let done: Value = read_object(dir.path(), "local").unwrap();
    assert!(
        out.status.success(),
        "{:#}\n{}",
        done["status"],
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metadata(&done, "master"), "local[*]");
    assert_eq!(metadata(&done, "count"), 33334);
    assert_eq!(done["status"]["launcher"]["headAddress"], "local[*]");
}

#[test]
fn spark_submit_runs_a_python_file_on_the_cluster() {
    let (dir, c) = slurm_dir("spark-submit");
    write(
        dir.path(),
        "job.py",
        "from pyspark.sql import SparkSession\nspark = SparkSession.builder.getOrCreate()\nprint('master', spark.sparkContext.master, 'count', spark.sparkContext.parallelize(range(1000), 4).count(), flush=True)\nspark.stop()\n",
    );
    write(
        dir.path(),
        "submit.yaml",
        &format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: submit}}\nspec:\n  assetKey: spark/submit\n  clusterRef: hpc\n  launcher: {{type: spark}}\n  resources: {{nodes: 1, mem: 1800M, timeLimit: \"00:10:00\"}}\n  environment: {{preDeployedEnvPath: {}}}\n  payload: {{path: job.py, interpreter: [spark-submit]}}\n",
            c.spark_env
        ),
    );
    let _op = Operator::start_logged(dir.path(), None);
    let done = wait_object(dir.path(), "submit", "the end", LONG, terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Succeeded", "{s:#}");
    let out = s["logTail"]["stdout"].as_str().unwrap_or("");
    let master = s["launcher"]["headAddress"].as_str().unwrap();
    assert!(
        out.contains(&format!("master {master} count 1000")),
        "spark-submit used the job's cluster: {out}"
    );
}

#[test]
fn a_heterogeneous_jobs_component_runs_its_own_spark_cluster_over_its_own_nodes() {
    let (dir, c) = slurm_dir("spark-hetjob");
    let d = dir.path();
    write(d, "payload.py", PAYLOAD);
    write(
        d,
        "pipeline.yaml",
        &format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: pipeline}}\nspec:\n  assetKey: het/all\n  clusterRef: hpc\n  resources: {{timeLimit: \"00:10:00\"}}\n  environment: {{preDeployedEnvPath: {env}}}\n  env: [{{name: SPARKTEST_EXECUTORS, value: \"2\"}}]\n  components:\n    - name: note\n      assetKey: het/note\n      resources: {{mem: 100M}}\n      payload: {{command: [bash, -c, 'echo note on $SLURMD_NODENAME']}}\n    - name: etl\n      assetKey: het/etl\n      resources: {{nodes: 2, mem: 1800M}}\n      launcher: {{type: spark, spark: {{executorMemory: 600M, driverMemory: 600M}}}}\n      payload: {{path: payload.py}}\n",
            env = c.spark_env
        ),
    );
    let _op = Operator::start_logged(d, None);
    let done = wait_object(d, "pipeline", "the end", LONG, terminal);
    let s = &done["status"];
    assert_eq!(phase(&done), "Succeeded", "{s:#}");
    let [note, etl] = &s["components"].as_array().expect("components")[..] else {
        panic!("two components: {s:#}");
    };
    // The plain component started no cluster; the Spark one spanned its two nodes only.
    assert!(note["launcher"].is_null(), "{note:#}");
    assert!(
        note["logTail"]["stdout"]
            .as_str()
            .is_some_and(|o| o.starts_with("note on n")),
        "{note:#}"
    );
    assert_eq!(etl["launcher"]["type"], "spark", "{etl:#}");
    assert_eq!(etl["launcher"]["nodesJoined"], 2, "{etl:#}");
    let m = &etl["pipes"]["materializations"][0];
    assert_eq!(m["assetKey"], "het/etl", "{etl:#}");
    assert_eq!(m["metadata"]["count"]["raw_value"], 33334);
    let etl_nodes: Vec<&str> = etl["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(etl_nodes.len(), 2, "{etl:#}");
    assert_eq!(
        m["metadata"]["nodes"]["raw_value"],
        etl_nodes.join(","),
        "executors on both of the component's nodes, none on the other's"
    );
    assert!(!etl_nodes.contains(&note["nodes"][0].as_str().unwrap()));
    assert_nothing_left_under(&remote_base("spark-hetjob"));
}
