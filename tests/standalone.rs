//! End-to-end tests of standalone mode with local execution: the real operator binary, real
//! processes, the real `dagster-pipes` package. No mocks.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn copy_examples(to: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    for e in std::fs::read_dir(src).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn examples_complete_with_metrics_and_pipes_metadata() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let out = run_once(dir.path(), Some(&pipes_path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "failing examples make --once exit 1: {stderr}"
    );
    assert!(
        stderr.contains("2 succeeded, 2 failed, 0 manifest errors"),
        "{stderr}"
    );

    let hello = status(dir.path(), "hello");
    assert_eq!(hello["phase"], "Succeeded");
    assert_eq!(hello["exitCode"], 0);
    // Hostile-looking env values and args arrive intact and unexecuted.
    let out = hello["logTail"]["stdout"].as_str().unwrap();
    assert!(
        out.contains("greeting=it's a 'quoted' $VALUE, args: first arg $(not executed)"),
        "{out}"
    );
    assert_eq!(hello["logTail"]["stderr"], "a line on stderr\n");
    for k in [
        "elapsedSeconds",
        "totalCpuSeconds",
        "cpuEfficiency",
        "maxRssBytes",
        "nodeHours",
        "cpuHours",
    ] {
        assert!(
            hello["metrics"][k].is_number(),
            "metrics.{k} missing: {hello:#}"
        );
    }
    assert!(hello["metrics"]["maxRssBytes"].as_u64().unwrap() > 1 << 20);

    let train = status(dir.path(), "train-model");
    assert_eq!(train["phase"], "Succeeded", "{train:#}");
    let m = &train["pipes"]["materializations"][0];
    assert_eq!(m["assetKey"], "analytics/train_model");
    assert_eq!(m["dataVersion"], "v1");
    assert_eq!(
        m["metadata"]["rows"]["raw_value"], 1000,
        "extras reached the payload"
    );
    assert_eq!(
        m["metadata"]["model"],
        serde_json::json!({"raw_value": "ridge", "type": "text"})
    );
    assert_eq!(
        train["pipes"]["checkResults"][0]["checkName"],
        "loss_below_one"
    );
    assert_eq!(train["pipes"]["checkResults"][0]["passed"], true);
    assert!(
        train["pipes"]["opened"].as_bool().unwrap() && train["pipes"]["closed"].as_bool().unwrap()
    );
    assert!(train["pipes"]["messageCount"].as_u64().unwrap() >= 4);
    // A busy loop of 0.5 s: CPU efficiency is high.
    assert!(
        train["metrics"]["cpuEfficiency"].as_f64().unwrap() > 0.5,
        "{train:#}"
    );

    let failing = status(dir.path(), "failing");
    assert_eq!(failing["phase"], "Failed");
    assert_eq!(failing["exitCode"], 3);
    assert_eq!(failing["reason"], "NonZeroExit");
    assert_eq!(failing["logTail"]["stderr"], "about to fail\n");

    let invalid = status(dir.path(), "invalid-memory");
    assert_eq!(invalid["phase"], "Failed");
    assert_eq!(invalid["reason"], "InvalidSpec");
    assert!(
        invalid["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.resources.mem: invalid memory quantity \"lots\"")
    );

    let table = std::process::Command::new(BIN)
        .args(["status", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    let train_row = table.lines().find(|l| l.contains("train-model")).unwrap();
    let invalid_row = table
        .lines()
        .find(|l| l.contains("invalid-memory"))
        .unwrap();
    assert!(
        invalid_row.contains("examples/invalid") && invalid_row.contains("InvalidSpec"),
        "{table}"
    );
    assert!(
        train_row.contains("analytics/train_model") && train_row.contains("Succeeded"),
        "{table}"
    );
    assert!(
        train_row.contains("MiB") && train_row.contains('%'),
        "{table}"
    );
}

#[test]
fn invalid_manifests_are_reported_and_valid_ones_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "good.yaml", &asset("good", "echo fine"));
    write(
        d,
        "mem.yaml",
        &asset("bad-mem", "echo x").replace("  payload:", "  resources: {mem: 12Q}\n  payload:"),
    );
    write(
        d,
        "unknown.yaml",
        &asset("unknown-field", "echo x").replace("  payload:", "  colour: blue\n  payload:"),
    );
    write(
        d,
        "two.yaml",
        &asset("two-sources", "echo x")
            .replace("    inline: |", "    command: [ls]\n    inline: |"),
    );
    std::fs::create_dir(d.join("sub")).unwrap();
    write(&d.join("sub"), "dup.yaml", &asset("good", "echo duplicate"));
    write(d, "broken.yml", "apiVersion: [unclosed\n");
    write(
        d,
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
    );
    write(d, "notes.txt", "not a manifest");

    let out = run_once(d, None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(status(d, "good")["phase"], "Succeeded");
    assert!(
        status(d, "good")["logTail"]["stdout"] == "fine\n",
        "the first definition wins"
    );
    let msg = |n: &str| {
        status(d, n)["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        msg("bad-mem").starts_with("spec.resources.mem: invalid memory quantity \"12Q\""),
        "{}",
        msg("bad-mem")
    );
    assert!(
        msg("unknown-field").contains("unknown field `colour`"),
        "{}",
        msg("unknown-field")
    );
    assert!(
        msg("unknown-field").starts_with("spec"),
        "{}",
        msg("unknown-field")
    );
    assert_eq!(
        msg("two-sources"),
        "spec.payload: exactly one of path, inline, configMapRef, remotePath, command must be set (found inline, command)"
    );
    for n in ["bad-mem", "unknown-field", "two-sources"] {
        assert_eq!(status(d, n)["phase"], "Failed");
        let invalid = status(d, n)["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Invalid" && c["status"] == "True");
        assert!(invalid, "{n} has an Invalid condition");
    }

    let errors: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(d.join(".status/errors.yaml")).unwrap())
            .unwrap();
    let errors: Vec<String> = errors["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    let find = |needle: &str| {
        errors
            .iter()
            .find(|e| e.contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no error with {needle:?} in {errors:#?}"))
    };
    assert!(find("sub/dup.yaml").contains("metadata.name: duplicate SlurmAsset \"good\""));
    assert!(find("broken.yml").contains("YAML does not parse"));
    assert!(find("pod.yaml").contains("apiVersion") || find("pod.yaml").contains("kind"));
    assert_eq!(errors.len(), 3, "{errors:#?}");
    for e in &errors {
        assert!(stderr.contains(e.as_str()), "logged too: {e}");
    }
}

#[test]
fn editing_the_spec_starts_a_new_run_and_keeps_history() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "a.yaml", &asset("a", "echo v1"));
    let _op = Operator::start(d);
    let first = wait_for(d, "a", "run 1 succeeded", |o| phase(o) == "Succeeded");
    assert_eq!(first["status"]["run"], 1);
    assert_eq!(first["status"]["observedGeneration"], 1);
    assert_eq!(first["metadata"]["generation"], 1);

    write(d, "a.yaml", &asset("a", "echo v2"));
    let second = wait_for(d, "a", "run 2 succeeded", |o| {
        o["status"]["run"] == 2 && phase(o) == "Succeeded"
    });
    let s = &second["status"];
    assert_eq!(s["observedGeneration"], 2);
    assert_eq!(second["metadata"]["generation"], 2);
    assert_eq!(s["logTail"]["stdout"], "v2\n");
    assert_eq!(s["history"][0]["run"], 1);
    assert_eq!(s["history"][0]["phase"], "Succeeded");
    assert_eq!(s["history"][0]["jobId"], first["status"]["jobId"]);

    // A runKey change is an explicit re-run.
    write(
        d,
        "a.yaml",
        &asset("a", "echo v2").replace("  payload:", "  runKey: dagster-run-7\n  payload:"),
    );
    let third = wait_for(d, "a", "run 3 succeeded", |o| {
        o["status"]["run"] == 3 && phase(o) == "Succeeded"
    });
    assert_eq!(third["status"]["runKey"], "dagster-run-7");
    assert_eq!(third["status"]["history"].as_array().unwrap().len(), 2);
}

#[test]
fn deleting_a_running_asset_terminates_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pidfile = d.join("payload.pid");
    // A child process of the payload too: the whole group must go.
    write(
        d,
        "long.yaml",
        &asset(
            "long",
            &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()),
        ),
    );
    let _op = Operator::start(d);
    wait_for(d, "long", "running", |o| phase(o) == "Running");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(sleeper));
    let job: i32 = status(d, "long")["jobId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    std::fs::remove_file(d.join("long.yaml")).unwrap();
    let obj = wait_for(d, "long", "cancelled", |o| phase(o) == "Cancelled");
    assert_eq!(obj["status"]["reason"], "Deleted");
    assert!(obj["metadata"]["deletionTimestamp"].is_string());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pid_alive(sleeper), "the payload's child was terminated");
    assert!(!pid_alive(job), "the supervisor was terminated");
}

/// Counts payload executions in a file outside the run dir: the ground truth for "one run".
fn counting_asset(name: &str, counter: &Path, body: &str) -> String {
    asset(name, &format!("echo run >> {}\n{body}", counter.display()))
}

#[test]
fn sigkill_and_restart_never_duplicates_or_loses_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c_adopt = d.join("adopt.count");
    let c_exit = d.join("exit.count");
    let c_early = d.join("early.count");
    // Adopted while still running after the restart.
    write(
        d,
        "adopt.yaml",
        &counting_asset("adopt", &c_adopt, "sleep 3\nexit 0"),
    );
    // Ends while the operator is down: the outcome comes from the exit file.
    write(
        d,
        "exit.yaml",
        &counting_asset("exit", &c_exit, "sleep 1\nexit 4"),
    );
    let mut op = Operator::start(d);
    wait_for(d, "adopt", "running", |o| phase(o) == "Running");
    wait_for(d, "exit", "running", |o| phase(o) == "Running");
    op.sigkill();
    std::thread::sleep(Duration::from_millis(1500));
    let adopt_job = status(d, "adopt")["jobId"].clone();

    // Killed right after a submission: a new asset appears and the operator dies at once.
    let mut op = Operator::start(d);
    write(
        d,
        "early.yaml",
        &counting_asset("early", &c_early, "sleep 1"),
    );
    wait_for(d, "early", "submitted", |o| o["status"]["run"] == 1);
    op.sigkill();

    let _op = Operator::start(d);
    let adopt = wait_for(d, "adopt", "succeeded", |o| phase(o) == "Succeeded");
    let exit = wait_for(d, "exit", "failed", |o| phase(o) == "Failed");
    let early = wait_for(d, "early", "succeeded", |o| phase(o) == "Succeeded");
    assert_eq!(
        adopt["status"]["jobId"], adopt_job,
        "the running job was adopted"
    );
    assert_eq!(adopt["status"]["run"], 1);
    assert_eq!(
        exit["status"]["exitCode"], 4,
        "true outcome from the exit file"
    );
    assert_eq!(exit["status"]["run"], 1);
    assert_eq!(early["status"]["run"], 1);
    for (name, c) in [("adopt", &c_adopt), ("exit", &c_exit), ("early", &c_early)] {
        let runs = std::fs::read_to_string(c).unwrap().lines().count();
        assert_eq!(runs, 1, "{name} ran exactly once");
    }
}

#[test]
fn render_prints_sbatch_and_script_without_side_effects() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "cluster.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: hpc}\nspec:\n  mode: slurm\n  remoteBase: /scratch/me\n  ssh: {host: login.example.org, user: me, keyPath: /home/me/.ssh/id_ed25519}\n  queue: {partition: batch, timeLimit: '01:00:00'}\n",
    );
    let file = write(d, "a.yaml", &asset("a", "echo \"$(whoami)\"").replace("  payload:", "  clusterRef: hpc\n  resources: {mem: 4G, nodes: 2, extraSbatchArgs: ['--exclusive']}\n  env: [{name: TOKEN, value: \"x; rm -rf ~\"}]\n  payload:"));
    let out = std::process::Command::new(BIN)
        .arg("render")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("sbatch --exclusive --partition=batch --time=01:00:00 --nodes=2 --mem=4G --parsable '--job-name=sao.<uid>.1.1' '--comment=default/a run 1 attempt 1 epoch 0' --chdir=/scratch/me/runs/default/a/1-1 --output=/scratch/me/runs/default/a/1-1/stdout.log --error=/scratch/me/runs/default/a/1-1/stderr.log /scratch/me/runs/default/a/1-1/job.sh"), "{text}");
    assert!(text.contains("export TOKEN='x; rm -rf ~'"), "{text}");
    assert!(
        text.contains("bash /scratch/me/runs/default/a/1-1/payload.sh < /dev/null"),
        "{text}"
    );
    let entries: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 2, "render wrote nothing: {entries:?}");
}

#[test]
fn crds_in_repo_match_the_types() {
    let out = std::process::Command::new(BIN)
        .arg("crds")
        .output()
        .unwrap();
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).unwrap();
    assert!(
        generated == committed,
        "crds/crds.yaml is stale: run `cargo run -- crds > crds/crds.yaml`"
    );
    let chart_copy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/slurm-asset-operator/crds/crds.yaml"
    ))
    .unwrap();
    assert!(
        chart_copy == committed,
        "the chart's CRDs are stale: cp crds/crds.yaml charts/slurm-asset-operator/crds/"
    );
    for kind in [
        "kind: SlurmAsset",
        "kind: SlurmCluster",
        "x-kubernetes-preserve-unknown-fields",
    ] {
        assert!(generated.contains(kind));
    }
}

#[test]
fn a_recreated_manifest_is_a_new_object_with_a_fresh_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let counter = d.join("count");
    write(d, "x.yaml", &counting_asset("x", &counter, "exit 5"));
    let _op = Operator::start(d);
    let first = wait_for(d, "x", "failed", |o| phase(o) == "Failed");
    std::fs::remove_file(d.join("x.yaml")).unwrap();
    wait_for(d, "x", "deleted", |o| {
        o["metadata"]["deletionTimestamp"].is_string()
    });
    write(d, "x.yaml", &counting_asset("x", &counter, "exit 0"));
    let second = wait_for(d, "x", "new object succeeded", |o| phase(o) == "Succeeded");
    assert_ne!(second["metadata"]["uid"], first["metadata"]["uid"]);
    assert_eq!(second["status"]["run"], 1);
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().lines().count(),
        2
    );
}
