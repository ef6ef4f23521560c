//! End-to-end tests of Slurm mode against the real test cluster (`tests/cluster/up`): real
//! slurmctld/slurmd/slurmdbd, real sshd, the real dagster-pipes package. No mocks.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

fn setup(test: &str) -> (tempfile::TempDir, TestCluster) {
    slurm_dir(test)
}

fn metric(s: &Value, k: &str) -> f64 {
    s["metrics"][k]
        .as_f64()
        .unwrap_or_else(|| panic!("metrics.{k} missing: {s:#}"))
}

#[test]
fn success_metrics_and_pipes_over_slurm() {
    let (dir, _) = setup("success");
    let d = dir.path();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/train.py"),
        d.join("train.py"),
    )
    .unwrap();
    write(
        d,
        "train.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {name: train}\nspec:\n  assetKey: analytics/train\n  clusterRef: hpc\n  payload: {path: train.py}\n  extras: {rows: 42}\n",
    );
    write(
        d,
        "busy.yaml",
        &slurm_asset(
            "busy",
            "end=$((SECONDS+4)); while [ $SECONDS -lt $end ]; do :; done; echo busy done",
            "",
        ),
    );
    write(
        d,
        "sleepy.yaml",
        &slurm_asset("sleepy", "sleep 4; echo slept", ""),
    );
    let out = run_once(d, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let train = status(d, "train");
    assert_eq!(train["phase"], "Succeeded", "{train:#}");
    assert!(train["jobId"].as_str().unwrap().parse::<u64>().is_ok());
    assert!(!train["nodes"].as_array().unwrap().is_empty());
    let m = &train["pipes"]["materializations"][0];
    assert_eq!(m["metadata"]["rows"]["raw_value"], 42);
    assert_eq!(m["metadata"]["model"]["raw_value"], "ridge");
    assert!(
        train["logTail"]["stdout"]
            .as_str()
            .unwrap()
            .starts_with("trained, checksum ")
    );
    // Its run dir was removed after the success: status no longer names it.
    assert!(train.get("remoteRunDir").is_none(), "{train:#}");

    let busy = status(d, "busy");
    assert_eq!(busy["slurmState"], "COMPLETED");
    assert!(metric(&busy, "cpuEfficiency") > 0.5, "{busy:#}");
    assert!(metric(&busy, "elapsedSeconds") >= 4.0);
    assert!(
        busy["metrics"]["maxRssBytes"].as_u64().unwrap() > 0,
        "{busy:#}"
    );
    let sleepy = status(d, "sleepy");
    assert!(metric(&sleepy, "cpuEfficiency") < 0.1, "{sleepy:#}");
    assert_eq!(sleepy["logTail"]["stdout"], "slept\n");
}

#[test]
fn two_node_job_with_srun_counts_both_nodes_and_the_step() {
    let (dir, _) = setup("twonode");
    let d = dir.path();
    // A fixed amount of CPU work per task (~2 s), whatever the load of the machine.
    let script = "srun --ntasks=2 --ntasks-per-node=1 bash -c 'i=0; while [ $i -lt 1500000 ]; do i=$((i+1)); done; hostname'";
    write(
        d,
        "two.yaml",
        &slurm_asset("two", script, "  resources: {nodes: 2, ntasks: 2}\n"),
    );
    let out = run_once(d, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(d, "two");
    assert_eq!(s["metrics"]["allocNodes"], 2, "{s:#}");
    assert_eq!(s["nodes"].as_array().unwrap().len(), 2, "{s:#}");
    let elapsed = metric(&s, "elapsedSeconds");
    assert!((metric(&s, "nodeHours") - elapsed * 2.0 / 3600.0).abs() < 1e-6);
    // Two tasks of ~2 CPU-seconds each: the srun step's CPU time is counted (the batch step,
    // which only waits for srun, is ~0).
    assert!(metric(&s, "totalCpuSeconds") > 2.0, "{s:#}");
}

#[test]
fn failures_exit_code_timeout_and_memory() {
    let (dir, _) = setup("failures");
    let d = dir.path();
    write(
        d,
        "three.yaml",
        &slurm_asset("three", "echo partial; echo broken >&2; exit 3", ""),
    );
    write(
        d,
        "slow.yaml",
        &slurm_asset("slow", "sleep 300", "  resources: {timeLimit: '1'}\n"),
    );
    write(
        d,
        "hog.yaml",
        &slurm_asset(
            "hog",
            "python3 -c 'import time; x = bytearray(300 * 1024 * 1024); time.sleep(20)'",
            "  resources: {mem: 50M}\n",
        ),
    );
    let out = run_once(d, None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let three = status(d, "three");
    assert_eq!(three["phase"], "Failed");
    assert_eq!(three["exitCode"], 3);
    assert_eq!(three["logTail"]["stdout"], "partial\n");
    assert_eq!(three["logTail"]["stderr"], "broken\n");
    let slow = status(d, "slow");
    assert_eq!(slow["phase"], "Failed");
    assert_eq!(slow["reason"], "TIMEOUT", "{slow:#}");
    let hog = status(d, "hog");
    assert_eq!(hog["phase"], "Failed");
    assert_eq!(hog["reason"], "OUT_OF_MEMORY", "{hog:#}");
}

#[test]
fn deleting_a_running_asset_cancels_its_job() {
    let (dir, _) = setup("delete");
    let d = dir.path();
    write(d, "long.yaml", &slurm_asset("long", "sleep 300", ""));
    let _op = Operator::start(d);
    let running = wait_for(d, "long", "running", |o| phase(o) == "Running");
    let job = running["status"]["jobId"].as_str().unwrap().to_string();
    std::fs::remove_file(d.join("long.yaml")).unwrap();
    let obj = wait_for(d, "long", "cancelled", |o| phase(o) == "Cancelled");
    assert_eq!(obj["status"]["reason"], "Deleted");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new("sacct")
            .args(["-X", "-P", "-n", "-o", "State", "-j", &job])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state.starts_with("CANCELLED") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sacct state of {job}: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL right after submissions and at pseudo-random points of a run of 20 assets: every
/// asset ends with its true outcome and sacct shows exactly one job per asset run.
#[test]
fn sigkill_at_random_points_never_duplicates_jobs() {
    let (dir, _) = setup("sigkill");
    let d = dir.path();
    for i in 0..20 {
        let code = if i % 5 == 0 { 2 } else { 0 };
        write(
            d,
            &format!("a{i}.yaml"),
            &slurm_asset(
                &format!("a{i}"),
                &format!("sleep {}; exit {code}", 1 + i % 4),
                "",
            ),
        );
    }
    // Deterministic "random" kill points (ms after start), spread over the run.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for round in 0..6 {
        let mut op = Operator::start(d);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = if round == 0 { 300 } else { 200 + seed % 1500 };
        std::thread::sleep(Duration::from_millis(wait));
        op.sigkill();
    }
    let out = run_once(d, None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..20 {
        let obj = read_object(d, &format!("a{i}")).unwrap();
        let s = &obj["status"];
        let want = if i % 5 == 0 { "Failed" } else { "Succeeded" };
        assert_eq!(s["phase"], want, "a{i}: {s:#}");
        assert_eq!(s["run"], 1);
        let uid = obj["metadata"]["uid"].as_str().unwrap();
        let jobs = sacct_jobs(&format!("sao.{uid}.1."));
        assert_eq!(jobs.len(), 1, "a{i}: exactly one job for run 1: {jobs:?}");
        assert_eq!(jobs[0].2, s["jobId"].as_str().unwrap());
    }
}

#[test]
fn fifty_assets_share_one_connection_and_batched_polls() {
    let (dir, _) = setup("fifty");
    let d = dir.path();
    for i in 0..50 {
        write(
            d,
            &format!("f{i}.yaml"),
            &slurm_asset(&format!("f{i}"), "sleep 2", "  resources: {mem: 10M}\n"),
        );
    }
    let start = std::time::Instant::now();
    let out = run_once(d, None);
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = operator_metrics(d);
    assert_eq!(m["sshConnects"], 1, "{m:#}");
    let polls = m["schedulerPolls"].as_f64().unwrap();
    // One squeue+sacct round per 1 s interval for all 50 jobs, never one per asset.
    assert!(polls <= secs + 2.0, "{polls} polls in {secs:.1}s: {m:#}");
    assert!(polls < 50.0, "{m:#}");
}

#[test]
fn password_login_is_multiplexed_too() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = c.manifest("hpc", &remote_base("password")).replace(
        &format!("keyPath: {}", c.key),
        "passwordEnv: SAO_TEST_PASSWORD",
    );
    write(d, "cluster.yaml", &manifest);
    for i in 0..3 {
        write(
            d,
            &format!("p{i}.yaml"),
            &slurm_asset(&format!("p{i}"), "echo via password", ""),
        );
    }
    let out = std::process::Command::new(BIN)
        .args(["standalone", "--once", "--dir"])
        .arg(d)
        .env("SAO_TEST_PASSWORD", &c.password)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains(&c.password),
        "the password never reaches the log"
    );
    for i in 0..3 {
        assert_eq!(
            status(d, &format!("p{i}"))["logTail"]["stdout"],
            "via password\n"
        );
    }
    assert_eq!(operator_metrics(d)["sshConnects"], 1);
    let all = walk_text(d);
    assert!(
        !all.contains(&c.password),
        "the password is in no written file"
    );
}

#[test]
fn password_and_one_time_code_login() {
    // The second sshd of the test cluster asks for the password, then a TOTP code, through
    // PAM's pam_google_authenticator: the operator answers both prompts itself.
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = c
        .manifest("hpc", &remote_base("totp"))
        .replace(
            &format!("keyPath: {}", c.key),
            "passwordEnv: SAO_TEST_PASSWORD, totpEnv: SAO_TEST_TOTP",
        )
        .replace(
            &format!("port: {}", c.port),
            &format!("port: {}", c.otp_port),
        );
    write(d, "cluster.yaml", &manifest);
    write(
        d,
        "otp.yaml",
        &slurm_asset("otp", "echo via one-time code", ""),
    );
    let run = |seed: &str| {
        std::process::Command::new(BIN)
            .args(["standalone", "--once", "--dir"])
            .arg(d)
            .env("SAO_TEST_PASSWORD", &c.password)
            .env("SAO_TEST_TOTP", seed)
            .output()
            .unwrap()
    };
    let out = run(&c.totp_seed.to_lowercase());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let s = status(d, "otp");
    assert_eq!(s["logTail"]["stdout"], "via one-time code\n", "{s:#}");
    assert_eq!(operator_metrics(d)["sshConnects"], 1);
    let all = walk_text(d) + &stderr;
    assert!(!all.contains(&c.totp_seed), "the seed is in no file or log");
    assert!(
        !all.contains(&c.password),
        "the password is in no file or log"
    );

    // A wrong seed is refused by the server: the submission waits and retries, it does not fail.
    std::fs::remove_dir_all(d.join(".status")).unwrap();
    let mut op = std::process::Command::new(BIN)
        .args(["standalone", "--dir"])
        .arg(d)
        .env("SAO_TEST_PASSWORD", &c.password)
        .env("SAO_TEST_TOTP", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = wait_for(d, "otp", "a login failure", |o| {
        o["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cluster unreachable"))
    });
    let _ = op.kill();
    let _ = op.wait();
    assert_eq!(phase(&waiting), "Submitting", "{waiting:#}");
    assert!(waiting["status"]["jobId"].is_null(), "{waiting:#}");
    assert!(
        waiting["status"]["message"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{waiting:#}"
    );
}

#[test]
fn key_and_one_time_code_login() {
    // The third sshd of the test cluster wants the key, then a TOTP code.
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = |with_code: bool| {
        c.manifest("hpc", &remote_base("key-totp"))
            .replace(
                &format!("keyPath: {}", c.key),
                &format!(
                    "keyPath: {}{}",
                    c.key,
                    if with_code {
                        ", totpEnv: SAO_TEST_TOTP"
                    } else {
                        ""
                    }
                ),
            )
            .replace(
                &format!("port: {}", c.port),
                &format!("port: {}", c.key_otp_port),
            )
    };
    write(d, "k.yaml", &slurm_asset("k", "echo key and code", ""));
    let run = || {
        std::process::Command::new(BIN)
            .args(["standalone", "--once", "--dir"])
            .arg(d)
            .env("SAO_TEST_TOTP", &c.totp_seed)
            .output()
            .unwrap()
    };
    write(d, "cluster.yaml", &manifest(true));
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(status(d, "k")["logTail"]["stdout"], "key and code\n");
    assert!(!(walk_text(d) + &stderr).contains(&c.totp_seed));

    // The key alone does not get in: the server really asks for the code.
    std::fs::remove_dir_all(d.join(".status")).unwrap();
    write(d, "cluster.yaml", &manifest(false));
    let mut op = Operator::start(d);
    let waiting = wait_for(d, "k", "a refused login", |o| {
        o["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Permission denied"))
    });
    op.sigkill();
    assert!(waiting["status"]["jobId"].is_null(), "{waiting:#}");
}

#[test]
fn jump_hosts_log_in_with_the_clusters_key_and_known_hosts() {
    // The jump hosts are the test cluster's own sshd (it forwards TCP), twice: the login goes
    // operator -> jump -> jump -> login node. The operator runs as root, whose ~/.ssh holds
    // neither the key nor the host key: each hop gets in only with the cluster's keyPath and
    // knownHosts. Key and known hosts sit under a path with blanks, a quote and `%` tokens,
    // which ssh's token expansion, its config parsing and the hops' shell must leave intact.
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = tempfile::tempdir().unwrap();
    let odd = keys.path().join("k e'y %h%%");
    std::fs::create_dir(&odd).unwrap();
    let key = odd.join("id");
    std::fs::copy(&c.key, &key).unwrap();
    let known_hosts = odd.join("known hosts");
    std::fs::copy(&c.known_hosts, &known_hosts).unwrap();
    let cluster = |jumps: &str| {
        c.manifest("hpc", &remote_base("jump"))
            .replace(
                &format!("keyPath: {}", c.key),
                &format!("keyPath: {:?}, jumpHosts: [{jumps}]", key.to_str().unwrap()),
            )
            .replace(
                &format!("path: {}", c.known_hosts),
                &format!("path: {:?}", known_hosts.to_str().unwrap()),
            )
    };
    let hop = |host: &str| format!("{{host: {host}, port: {}}}", c.port);
    write(
        d,
        "cluster.yaml",
        &cluster(&format!("{}, {}", hop("127.0.0.1"), hop("127.0.0.1"))),
    );
    write(d, "j.yaml", &slurm_asset("j", "echo through two jumps", ""));
    let out = std::process::Command::new(BIN)
        .args(["standalone", "--once", "--dir"])
        .arg(d)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let s = status(d, "j");
    assert_eq!(s["logTail"]["stdout"], "through two jumps\n", "{s:#}");

    // The jump's host key is checked strictly against knownHosts too: `localhost` is not in
    // it (only [127.0.0.1]:port is), so the first hop is refused and nothing is submitted.
    std::fs::remove_dir_all(d.join(".status")).unwrap();
    write(d, "cluster.yaml", &cluster(&hop("localhost")));
    let mut op = Operator::start(d);
    let waiting = wait_for(d, "j", "a refused jump host", |o| {
        o["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cluster unreachable"))
    });
    op.sigkill();
    let message = waiting["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("Host key verification failed"),
        "{waiting:#}"
    );
    assert!(waiting["status"]["jobId"].is_null(), "{waiting:#}");
}

fn walk_text(dir: &std::path::Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            s.push_str(&walk_text(&p));
        } else if let Ok(t) = std::fs::read_to_string(&p) {
            s.push_str(&t);
        }
    }
    s
}

#[test]
fn shell_metacharacters_stay_intact_and_inert() {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = format!("{} $(touch pwned-base) 'q'", remote_base("meta"));
    write(d, "cluster.yaml", &c.manifest("hpc", &base));
    let sub = d.join("we ird;$(touch pwned-dir)");
    std::fs::create_dir(&sub).unwrap();
    let script = "printf '%s\\n' \"$VALUE\"; for a in \"$@\"; do printf '<%s>' \"$a\"; done; echo";
    std::fs::write(sub.join("pay load's `x`.sh"), script).unwrap();
    let value = "a'b\"c $(touch pwned-env) `touch pwned-bt`; echo no > pwned-redirect";
    let manifest = format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: meta}}\nspec:\n  assetKey: weird/meta\n  clusterRef: hpc\n  payload:\n    path: \"pay load's `x`.sh\"\n    args: [\"$(touch pwned-arg)\", \"a b\", \"'\", \";|&\"]\n  env:\n    - name: VALUE\n      value: {}\n  extras: {{\"k$(x)\": \"v`y`\"}}\n  debug: true\n",
        serde_json::to_string(value).unwrap()
    );
    write(&sub, "meta.yaml", &manifest);
    write(d, "cluster.yaml", &c.manifest("hpc", &base));
    let out = run_once(d, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(d, "meta");
    let stdout = s["logTail"]["stdout"].as_str().unwrap();
    assert_eq!(
        stdout,
        format!("{value}\n<$(touch pwned-arg)><a b><'><;|&>\n"),
        "{s:#}"
    );
    assert!(
        s["remoteRunDir"]
            .as_str()
            .unwrap()
            .contains("$(touch pwned-base) 'q'")
    );
    let found = std::process::Command::new("find")
        .args([
            "/home/saotest",
            "/tmp",
            d.to_str().unwrap(),
            "-name",
            "pwned*",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&found.stdout),
        "",
        "nothing a string contained was executed"
    );
}

/// A job killed without running its last line (`scancel --batch --signal=KILL`: no exit file)
/// is not noticed by the exit-file watcher; the batched scheduler poll, the safety net, still
/// brings it to its true end.
#[test]
fn a_job_killed_before_writing_its_exit_file_ends_through_the_safety_net() {
    let (dir, _) = setup("killed");
    let d = dir.path();
    write(d, "victim.yaml", &slurm_asset("victim", "sleep 300", ""));
    let _op = Operator::start(d);
    let running = wait_for(d, "victim", "running", |o| phase(o) == "Running");
    let job = running["status"]["jobId"].as_str().unwrap().to_string();
    let run_dir = running["status"]["remoteRunDir"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new("scancel")
        .args(["--batch", "--signal=KILL", &job])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let obj = wait_for(d, "victim", "failed", |o| phase(o) == "Failed");
    let s = &obj["status"];
    assert!(
        !std::path::Path::new(&run_dir).join("exit").exists(),
        "the job must have died without its exit file"
    );
    let slurm_state = s["slurmState"].as_str().unwrap_or_default();
    assert!(
        !slurm_state.contains("exit file"),
        "the end came from the scheduler, not an exit file: {s:#}"
    );
    assert!(
        s["exitCode"] == 137 || s["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{s:#}"
    );
}
