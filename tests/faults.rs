//! Faults against the real daemons of the test cluster (issue 8): slurmdbd stopped while jobs
//! end, slurmctld stopped for longer than the poll interval, sshd restarted with every
//! connection cut. After each: every asset ends with its true outcome and its metrics, and no
//! job was submitted twice (counted by tag in sacct). SIGKILL of the operator at random points
//! of a batch is `slurm.rs::sigkill_at_random_points_never_duplicates_jobs`; one unreachable
//! cluster beside a working one is `adversarial.rs::one_dead_cluster_delays_no_one_else`.
//!
//! These tests stop and start shared daemons, so they run one at a time (a lock), and need
//! root, as the test cluster does.

mod common;
use common::*;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static DAEMONS: Mutex<()> = Mutex::new(());
const STATE: &str = "/var/lib/sao-test-cluster";

fn sh(script: &str) -> bool {
    Command::new("bash")
        .args(["-c", script])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_until(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sacct_answers() -> bool {
    sh("sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1")
}

/// Puts a daemon back however a test ended.
struct Restore(&'static str);
impl Drop for Restore {
    fn drop(&mut self) {
        sh(self.0);
    }
}

/// Stops a daemon and waits until it has exited (a dying daemon still shows in pgrep).
fn stop(name: &str) -> bool {
    sh(&format!(
        "pkill -x {name} || exit 1; for i in $(seq 1 100); do pgrep -x {name} >/dev/null || exit 0; sleep 0.2; done; pkill -KILL -x {name}; sleep 0.5"
    ))
}

const START_SLURMDBD: &str = "for i in $(seq 1 100); do pgrep -x slurmdbd >/dev/null || break; sleep 0.2; done; pgrep -x slurmdbd >/dev/null || slurmdbd";
const START_SLURMCTLD: &str = "for i in $(seq 1 100); do pgrep -x slurmctld >/dev/null || break; sleep 0.2; done; pgrep -x slurmctld >/dev/null || slurmctld";

fn start_slurmdbd() -> bool {
    sh(START_SLURMDBD)
}

fn start_slurmctld() -> bool {
    sh(START_SLURMCTLD)
}

fn start_sshd() -> bool {
    sh(&format!(
        "{{ [ -f {STATE}/sshd.pid ] && kill -0 $(cat {STATE}/sshd.pid) 2>/dev/null; }} || /usr/sbin/sshd -f {STATE}/sshd_config"
    ))
}

fn setup(test: &str, n: usize, script: &str) -> (tempfile::TempDir, Vec<String>) {
    let (dir, _) = slurm_dir(test);
    let names: Vec<String> = (0..n).map(|i| format!("{test}-{i}")).collect();
    for name in &names {
        write(
            dir.path(),
            &format!("{name}.yaml"),
            &slurm_asset(name, script, ""),
        );
    }
    (dir, names)
}

/// Every asset succeeded once: attempts 1, one job by its tag in sacct.
fn assert_once_each(d: &std::path::Path, names: &[String]) {
    for name in names {
        let o = read_object(d, name).unwrap();
        assert_eq!(phase(&o), "Succeeded", "{o:#}");
        assert_eq!(o["status"]["attempts"], 1, "{o:#}");
        let uid = o["metadata"]["uid"].as_str().unwrap();
        // Right after a daemon restart sacct may briefly answer nothing: ask again, but a
        // second job is never excused.
        let mut jobs = sacct_jobs(&format!("sao.{uid}."));
        let deadline = Instant::now() + Duration::from_secs(30);
        while jobs.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            jobs = sacct_jobs(&format!("sao.{uid}."));
        }
        assert_eq!(jobs.len(), 1, "{name} ({uid}): {jobs:?}");
    }
}

#[test]
fn metrics_arrive_after_an_accounting_outage() {
    let _lock = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = Restore(START_SLURMDBD);
    wait_until("sacct to answer", Duration::from_secs(60), sacct_answers);
    // The jobs end only once accounting is down for sure: they wait for this flag.
    let flag = format!("/tmp/sao-dbdown-flag-{}", std::process::id());
    let _ = std::fs::remove_file(&flag);
    let (dir, names) = setup(
        "dbdown",
        3,
        &format!(
            "end=$((SECONDS+3)); while [ $SECONDS -lt $end ]; do :; done\nwhile [ ! -e {flag} ]; do sleep 0.2; done\necho done"
        ),
    );
    let d = dir.path();
    let _op = Operator::start(d);
    for name in &names {
        wait_for(d, name, "running", |o| phase(o) == "Running");
    }
    assert!(stop("slurmdbd"));
    wait_until("sacct to fail", Duration::from_secs(20), || {
        !sacct_answers()
    });
    std::fs::write(&flag, "").unwrap();
    for name in &names {
        let o = wait_for(d, name, "ended", terminal);
        assert_eq!(
            phase(&o),
            "Succeeded",
            "the true outcome, from squeue or the exit file: {o:#}"
        );
        let cond = condition(&o, "MetricsAvailable")
            .unwrap_or_else(|| panic!("no MetricsAvailable condition: {o:#}"));
        assert_eq!(cond["status"], "False", "{o:#}");
        assert_eq!(cond["reason"], "Awaiting");
        assert_ne!(o["status"]["slurmState"], "RUNNING", "{o:#}");
    }
    assert!(start_slurmdbd());
    wait_until(
        "sacct to answer again",
        Duration::from_secs(60),
        sacct_answers,
    );
    for name in &names {
        let o = wait_for(d, name, "metrics after accounting came back", |o| {
            o["status"]["metrics"]["totalCpuSeconds"].as_f64().is_some()
        });
        let m = &o["status"]["metrics"];
        // Two to three seconds of busy loop (three jobs sharing this machine's cores),
        // measured by accounting after it came back.
        assert!(m["totalCpuSeconds"].as_f64().unwrap() >= 0.3, "{o:#}");
        assert!(m["elapsedSeconds"].as_f64().unwrap() >= 3.0, "{o:#}");
        let cond = condition(&o, "MetricsAvailable").unwrap();
        assert_eq!(cond["status"], "True", "{o:#}");
    }
    assert_once_each(d, &names);
}

/// slurmdbd down while the operator first connects: accounting is asked again a minute later
/// (not learnt "absent" for good), so a job that ends after it is back has its metrics.
#[test]
fn accounting_down_at_the_first_connect_is_used_once_it_is_back() {
    let _lock = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = Restore(START_SLURMDBD);
    wait_until("sacct to answer", Duration::from_secs(60), sacct_answers);
    let flag = format!("/tmp/sao-dbfirst-flag-{}", std::process::id());
    let _ = std::fs::remove_file(&flag);
    let (dir, names) = setup(
        "dbfirst",
        1,
        &format!(
            "while [ ! -e {flag} ]; do sleep 0.2; done\nend=$((SECONDS+3)); while [ $SECONDS -lt $end ]; do :; done\necho done"
        ),
    );
    let d = dir.path();
    assert!(stop("slurmdbd"));
    wait_until("sacct to fail", Duration::from_secs(20), || {
        !sacct_answers()
    });
    let started = Instant::now();
    let _op = Operator::start(d);
    wait_for(d, &names[0], "running", |o| phase(o) == "Running");
    let cluster = d.join(".status/default/SlurmCluster/hpc.yaml");
    let text = std::fs::read_to_string(&cluster).unwrap();
    assert!(
        text.contains("accountingAvailable: false"),
        "the premise: the first connect found no accounting: {text}"
    );
    assert!(start_slurmdbd());
    wait_until(
        "sacct to answer again",
        Duration::from_secs(60),
        sacct_answers,
    );
    // The job ends after the operator has had its minute to ask again.
    std::thread::sleep(Duration::from_secs(65).saturating_sub(started.elapsed()));
    std::fs::write(&flag, "").unwrap();
    let o = wait_for(d, &names[0], "metrics", |o| {
        o["status"]["metrics"]["totalCpuSeconds"].as_f64().is_some()
            || terminal(o)
                && condition(o, "MetricsAvailable").is_some_and(|c| c["reason"] != "Awaiting")
    });
    let _ = std::fs::remove_file(&flag);
    assert_eq!(phase(&o), "Succeeded", "{o:#}");
    let cond = condition(&o, "MetricsAvailable").unwrap();
    assert_eq!(cond["status"], "True", "{o:#}");
    assert!(
        o["status"]["metrics"]["elapsedSeconds"].as_f64().unwrap() >= 3.0,
        "{o:#}"
    );
    // The cluster's status says so too.
    wait_until(
        "the cluster status to show accounting",
        Duration::from_secs(60),
        || std::fs::read_to_string(&cluster).is_ok_and(|t| t.contains("accountingAvailable: true")),
    );
    assert_once_each(d, &names);
}

#[test]
fn a_controller_outage_is_no_failure() {
    let _lock = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = Restore(START_SLURMCTLD);
    wait_until("sacct to answer", Duration::from_secs(60), sacct_answers);
    let (dir, names) = setup("ctlddown", 3, "sleep 12; echo done");
    let d = dir.path();
    let _op = Operator::start(d);
    for name in &names {
        wait_for(d, name, "running", |o| phase(o) == "Running");
    }
    assert!(stop("slurmctld"));
    // Well past the 1 s poll interval: every poll's squeue fails meanwhile.
    std::thread::sleep(Duration::from_secs(6));
    for name in &names {
        let o = read_object(d, name).unwrap();
        assert_eq!(
            phase(&o),
            "Running",
            "a failed poll is not an outcome: {o:#}"
        );
    }
    assert!(start_slurmctld());
    for name in &names {
        let o = wait_for(d, name, "ended", terminal);
        assert_eq!(phase(&o), "Succeeded", "{o:#}");
    }
    for name in &names {
        wait_for(d, name, "metrics", |o| {
            o["status"]["metrics"]["elapsedSeconds"].as_f64().is_some()
        });
    }
    assert_once_each(d, &names);
}

#[test]
fn sshd_restarted_with_connections_cut() {
    let _lock = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    wait_until("sacct to answer", Duration::from_secs(60), sacct_answers);
    let (dir, names) = setup("sshdcut", 3, "sleep 8; echo done");
    let d = dir.path();
    let _op = Operator::start(d);
    for name in &names {
        wait_for(d, name, "running", |o| phase(o) == "Running");
    }
    let user = test_cluster().user;
    // Stop the listener, cut every session of the test user (the operator's master among
    // them), and start sshd again a little later.
    let _restore = Restore(concat!(
        "{ [ -f /var/lib/sao-test-cluster/sshd.pid ] && kill -0 $(cat /var/lib/sao-test-cluster/sshd.pid) 2>/dev/null; }",
        " || /usr/sbin/sshd -f /var/lib/sao-test-cluster/sshd_config"
    ));
    assert!(sh(&format!("kill $(cat {STATE}/sshd.pid)")));
    sh(&format!("pkill -KILL -u {user} -x sshd; true"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(start_sshd());
    for name in &names {
        let o = wait_for(d, name, "ended", terminal);
        assert_eq!(phase(&o), "Succeeded", "{o:#}");
        // The end is known from the exit file; accounting records it a moment later.
        wait_for(d, name, "metrics", |o| {
            o["status"]["metrics"]["elapsedSeconds"].as_f64().is_some()
        });
    }
    assert_once_each(d, &names);
    let m = operator_metrics(d);
    assert!(m["sshReconnects"].as_u64().unwrap_or(0) >= 1, "{m:#}");
}
