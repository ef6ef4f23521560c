//! The command line as a new user meets it (issue 15): each documented mistake gets one clear
//! message and a non-zero exit; logs carry no colour codes when nobody watches a terminal;
//! `~` and `$HOME` expand in local paths; a missing key file fails at once; and a
//! standalone operator that exits closes its SSH master connection (real Slurm, real sshd).

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running the operator")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `args`, expects a failure whose stderr holds every one of `wants`, and returns it.
fn fails_saying(args: &[&str], wants: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {err}");
    for w in wants {
        assert!(err.contains(w), "{args:?}: {w:?} not in {err:?}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CLUSTER: &str = "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: c}\nspec: {mode: local}\n";

#[test]
fn every_argument_has_help_text() {
    for sub in ["standalone", "render", "status", "run", "crds"] {
        let o = run(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help");
        let help = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = help.lines().collect();
        let indent = |l: &str| l.len() - l.trim_start().len();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            // An option or argument: its text on the same line, or (clap wraps long names)
            // on the next, indented deeper.
            if t.starts_with('-') || t.starts_with('<') {
                let same = t.split("  ").filter(|w| !w.trim().is_empty()).count() >= 2;
                let next = lines.get(i + 1).is_some_and(|n| {
                    indent(n) > indent(line)
                        && !n.trim().is_empty()
                        && !n.trim_start().starts_with('-')
                });
                assert!(same || next, "{sub}: no help text for {t:?}");
            }
        }
    }
}

#[test]
fn a_missing_directory_is_named_once() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing");
    let err = fails_saying(
        &["standalone", "--dir", s(&missing)],
        &[s(&missing), "No such file or directory"],
    );
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the OS error once: {err}"
    );
    let err = fails_saying(
        &["status", "--dir", s(&missing)],
        &[s(&missing), "No such file or directory"],
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn an_empty_directory_says_it_found_no_manifests() {
    let d = tempfile::tempdir().unwrap();
    fails_saying(
        &["standalone", "--once", "--dir", s(d.path())],
        &["no manifests found", s(d.path())],
    );
    // Without status files, `status` says so and how to get them.
    let d = tempfile::tempdir().unwrap();
    fails_saying(
        &["status", "--dir", s(d.path())],
        &["no status here", "standalone --dir"],
    );
}

#[test]
fn render_says_what_is_wrong_with_the_file_it_was_given() {
    let d = tempfile::tempdir().unwrap();
    let only_cluster = write(d.path(), "c.yaml", CLUSTER);
    fails_saying(
        &["render", s(&only_cluster)],
        &["no SlurmAsset in this file", "SlurmCluster c"],
    );
    let two = write(
        d.path(),
        "two.yaml",
        &format!("{}\n---\n{}", asset("a", "echo a"), asset("b", "echo b")),
    );
    fails_saying(
        &["render", s(&two)],
        &["2 SlurmAssets (a, b)", "pick one with --name"],
    );
    fails_saying(
        &["render", s(&two), "--name", "nope"],
        &["no SlurmAsset named \"nope\"", "the file has: a, b"],
    );
    let err = fails_saying(
        &["render", s(d.path())],
        &["is a directory", "one manifest file"],
    );
    assert!(!err.contains("os error"), "{err}");
    let o = run(&["render", s(&two), "--name", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("/runs/default/b/"));
    // A bare file name finds its cluster beside it, as ./FILE does.
    write(d.path(), "c.yaml", CLUSTER);
    let onc = write(
        d.path(),
        "onc.yaml",
        &asset("onc", "echo c").replace("  payload:", "  clusterRef: c\n  payload:"),
    );
    assert!(onc.exists());
    let o = Command::new(BIN)
        .args(["render", "onc.yaml"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn status_shows_manifest_errors_and_why_each_asset_failed_without_colour() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "ok.yaml", &asset("fine", "echo fine"));
    write(d.path(), "bad.yaml", &asset("boom", "echo going; exit 7"));
    write(d.path(), "broken.yaml", "kind: SlurmAsset\nmetadata: [\n");
    let o = run_once(d.path(), None);
    assert!(!o.status.success(), "a failure makes --once exit 1");
    let log = stderr(&o);
    assert!(log.contains("Failed"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "no ANSI codes when stderr is not a terminal: {log:?}"
    );
    let o = run(&["status", "--dir", s(d.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("manifest errors (errors.yaml):"), "{out}");
    assert!(out.contains("broken.yaml: "), "{out}");
    assert!(out.contains("failed:\n"), "{out}");
    assert!(
        out.contains("default/boom: NonZeroExit: the payload exited with code 7"),
        "{out}"
    );
    assert!(!out.contains("default/fine:"), "{out}");
    assert!(!out.contains('\x1b'));
    // Local clusters alone: no SSH or scheduler counters (they do not apply), and every
    // timestamp in whole seconds.
    let m = operator_metrics(d.path());
    assert!(m["envPacks"].is_number(), "{m:#}");
    assert!(
        m.get("sshConnects").is_none() && m.get("schedulerPolls").is_none(),
        "{m:#}"
    );
    let text =
        std::fs::read_to_string(d.path().join(".status/default/SlurmAsset/boom.yaml")).unwrap();
    let stamps: Vec<&str> = text
        .split('"')
        .filter(|w| w.len() >= 20 && w.as_bytes()[4] == b'-' && w.ends_with('Z'))
        .collect();
    assert!(!stamps.is_empty(), "{text}");
    for t in stamps {
        assert_eq!(t.len(), 20, "whole seconds: {t}");
    }
}

/// Processes whose command line holds `needle`, but not the `pgrep` itself.
fn processes_with(needle: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "-f", needle])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn home_expands_in_key_paths_a_missing_key_fails_at_once_and_exit_closes_the_ssh_master() {
    let c = test_cluster();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".ssh")).unwrap();
    std::fs::copy(&c.key, home.path().join(".ssh/id_test")).unwrap();
    std::fs::copy(&c.known_hosts, home.path().join("known_hosts")).unwrap();
    let cluster = |name: &str, key: &str, kh: &str| {
        c.manifest(name, &remote_base("cli-home"))
            .replace(&format!("keyPath: {}", c.key), &format!("keyPath: {key}"))
            .replace(
                &format!("knownHosts: {{path: {}}}", c.known_hosts),
                &format!("knownHosts: {{path: {kh:?}}}"),
            )
    };
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "cluster.yaml",
        &cluster("hpc", "~/.ssh/id_test", "$HOME/known_hosts"),
    );
    write(d.path(), "a.yaml", &slurm_asset("viahome", "echo hi", ""));
    let child = Command::new(BIN)
        .args(["standalone", "--once", "--dir", s(d.path())])
        .env("HOME", home.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        phase(&read_object(d.path(), "viahome").unwrap_or_default()),
        "Succeeded"
    );
    // Its master connection (named after its PID) went with it, not 5 minutes later.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left = processes_with(&format!("sao-ssh-{pid}-"));
    assert!(left.is_empty(), "SSH master left behind: {left:?}");

    // Stopped by SIGTERM while a job runs and polls are under way: the master goes too.
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "cluster.yaml",
        &cluster("hpc", "~/.ssh/id_test", "$HOME/known_hosts"),
    );
    write(d.path(), "a.yaml", &slurm_asset("long", "sleep 30", ""));
    let mut child = Command::new(BIN)
        .args(["standalone", "--dir", s(d.path())])
        .env("HOME", home.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_object(
        d.path(),
        "long",
        "running",
        std::time::Duration::from_secs(60),
        |o| phase(o) == "Running",
    );
    assert!(
        !processes_with(&format!("sao-ssh-{pid}-")).is_empty(),
        "a master while it runs"
    );
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left = processes_with(&format!("sao-ssh-{pid}-"));
    assert!(
        left.is_empty(),
        "SSH master left behind after SIGTERM: {left:?}"
    );

    // A key file that is not there fails the asset at once, naming the field and the file.
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "cluster.yaml",
        &cluster("hpc", "~/.ssh/absent", "$HOME/known_hosts"),
    );
    write(d.path(), "a.yaml", &slurm_asset("nokey", "echo hi", ""));
    let mut child = Command::new(BIN)
        .args(["standalone", "--once", "--dir", s(d.path())])
        .env("HOME", home.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A retry loop would never end: stop it and say so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let code = loop {
        if let Some(code) = child.try_wait().unwrap() {
            break code;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "still retrying a missing key: {:#}",
                status(d.path(), "nokey")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!code.success());
    let st = read_object(d.path(), "nokey").unwrap_or_default();
    assert_eq!(phase(&st), "Failed", "{st:#}");
    let msg = st["status"]["message"].as_str().unwrap_or_default();
    let absent = home.path().join(".ssh/absent");
    assert!(
        msg.contains("spec.ssh.keyPath")
            && msg.contains(s(&absent))
            && msg.contains("No such file"),
        "{msg}"
    );
    // Fixing the cluster runs the asset again.
    // Killed on drop, also when an assertion fails.
    let _op = Operator(
        Command::new(BIN)
            .args(["standalone", "--dir", s(d.path())])
            .env("HOME", home.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    write(
        d.path(),
        "cluster.yaml",
        &cluster("hpc", "~/.ssh/id_test", "$HOME/known_hosts"),
    );
    let done = wait_object(
        d.path(),
        "nokey",
        "a run after the fix",
        std::time::Duration::from_secs(60),
        |o| phase(o) == "Succeeded",
    );
    assert_eq!(done["status"]["logTail"]["stdout"], "hi\n");
}

#[test]
fn the_binary_the_chart_and_the_image_share_one_version() {
    let o = run(&["--version"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(out.trim(), format!("slurm-asset-operator {version}"));
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/slurm-asset-operator/Chart.yaml"
    ))
    .unwrap();
    assert!(
        chart.contains(&format!("appVersion: \"{version}\"")),
        "Chart.yaml's appVersion (the image tag's default) is Cargo's version"
    );
}
