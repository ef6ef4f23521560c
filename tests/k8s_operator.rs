//! Kubernetes mode on a real API server (issue 9): the operator binary runs as a process with
//! a kubeconfig (`common::k8s`, found through KUBECONFIG), objects are created with kubectl,
//! payloads run on the real Slurm test cluster. Each test has a namespace of its own and an
//! operator that watches only that namespace.

mod common;
use common::k8s::{Namespace, kubeconfig, kubectl_ok};
use common::*;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Operator(Child);

impl Operator {
    fn start(ns: &Namespace, work: &std::path::Path, extra: &[&str]) -> Operator {
        Self::start_logging(ns, work, extra, Stdio::null())
    }

    fn start_logging(
        ns: &Namespace,
        work: &std::path::Path,
        extra: &[&str],
        log: impl Into<Stdio>,
    ) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BIN)
            .args(["run", &format!("--namespace={}", ns.0)])
            .arg(format!("--metrics-port={port}"))
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .arg("--work-dir")
            .arg(work)
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Operator(child)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test cluster as the SlurmCluster `hpc` of `ns`, with its key and known_hosts in a Secret.
fn slurm_cluster(ns: &Namespace, test: &str) {
    let c = test_cluster();
    ns.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "slurm-ssh"},
        "data": {"ssh-privatekey": b64(&std::fs::read_to_string(&c.key).unwrap()),
                 "known_hosts": b64(&std::fs::read_to_string(&c.known_hosts).unwrap())},
    }));
    ns.apply(c.cluster_object(
        &remote_base(test),
        &c.port,
        "slurm-ssh",
        json!({"keySecretRef": {"name": "slurm-ssh", "key": "ssh-privatekey"}}),
    ));
}

fn asset(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmAsset",
           "metadata": {"name": name}, "spec": spec})
}

fn phase_is(p: &'static str) -> impl Fn(&Value) -> bool {
    move |o| o["status"]["phase"] == p
}

/// Events about `name`, as (type, reason, note).
fn events(ns: &Namespace, name: &str) -> Vec<(String, String, String)> {
    let out = kubectl_ok(
        &["get", "events.events.k8s.io", "-n", &ns.0, "-o", "json"],
        None,
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("note"))
        })
        .collect()
}

#[test]
fn kubeconfig_errors_name_what_failed() {
    let run = |args: &[&str], env: Option<&str>| -> (bool, String) {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").args(args).arg("--metrics-port=0");
        match env {
            Some(v) => cmd.env("KUBECONFIG", v),
            None => cmd.env_remove("KUBECONFIG"),
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`run {args:?}` kept running with a bad kubeconfig");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--kubeconfig", "/nonexistent/kc"], None);
    assert!(!ok && err.contains("/nonexistent/kc"), "{err}");
    let good = kubeconfig();
    let (ok, err) = run(
        &["--kubeconfig", good.to_str().unwrap(), "--context", "nope"],
        None,
    );
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, err) = run(&[], Some("/missing/kubeconfig"));
    assert!(!ok && err.contains("KUBECONFIG"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_execution_is_off_unless_an_administrator_allows_it() {
    let ns = Namespace::new("nolocal");
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("CANARY");
    let _op = Operator::start(&ns, &work.path().join("op"), &[]);
    ns.apply(asset(
        "here",
        json!({"assetKey": "t/here", "payload": {"inline": format!("touch {}", canary.display())}}),
    ));
    let o = ns
        .wait("slurmasset", "here", "Failed", phase_is("Failed"))
        .await;
    let m = o["status"]["message"].as_str().unwrap();
    assert!(
        m.contains("spec.clusterRef") && m.contains("--allow-local-execution"),
        "{m}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!canary.exists(), "the payload ran on the operator's host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_payloads_follow_the_interpreter_rule_and_wake_on_creation() {
    let ns = Namespace::new("configmap");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-configmap");
    let _op = Operator::start(&ns, work.path(), &[]);
    ns.apply(asset(
        "py",
        json!({"assetKey": "t/py", "clusterRef": "hpc",
               "payload": {"configMapRef": {"name": "scripts", "key": "job.py"}}}),
    ));
    let o = ns
        .wait("slurmasset", "py", "Failed", phase_is("Failed"))
        .await;
    assert!(
        o["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.payload.configMapRef"),
        "{o:#}"
    );
    // The ConfigMap appears: the asset is woken by the ConfigMap watch, and `job.py` runs
    // under python3 (bash would choke on it).
    ns.apply(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "scripts"},
                    "data": {"job.py": "import sys\nprint('python', sys.version_info[0] * 14)\n"}}),
    );
    let o = ns
        .wait("slurmasset", "py", "Succeeded", phase_is("Succeeded"))
        .await;
    assert_eq!(o["status"]["logTail"]["stdout"], "python 42", "{o:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_has_its_own_event_and_metrics_are_rounded() {
    let ns = Namespace::new("runevents");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-runevents");
    let _op = Operator::start(&ns, work.path(), &[]);
    for run in 1..=3 {
        ns.apply(asset(
            "again",
            json!({"assetKey": "t/again", "clusterRef": "hpc", "runKey": format!("r{run}"),
                   "payload": {"inline": "sleep 1; echo again"}}),
        ));
        ns.wait("slurmasset", "again", "the run's success", |o| {
            o["status"]["run"] == run && o["status"]["phase"] == "Succeeded"
        })
        .await;
    }
    let o: Value = serde_json::from_str(&kubectl_ok(
        &[
            "get",
            "-n",
            &ns.0,
            "slurmasset",
            "again",
            "-o",
            "json",
            "--show-managed-fields",
        ],
        None,
    ))
    .unwrap();
    // Every write of the operator's is under its own field manager, the finalizer included.
    let managers: Vec<(String, String)> = o["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or_default().to_string(),
                m["fieldsV1"].to_string(),
            )
        })
        .collect();
    assert!(
        managers
            .iter()
            .any(|(m, f)| m == "slurm-asset-operator" && f.contains("f:finalizers")),
        "{managers:#?}"
    );
    assert!(
        managers.iter().all(|(m, _)| m != "unknown"),
        "{managers:#?}"
    );
    let eff = o["status"]["metrics"]["cpuEfficiency"].as_f64().unwrap();
    assert_eq!(eff, (eff * 1e4).round() / 1e4, "{eff}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notes: Vec<String> = events(&ns, "again").into_iter().map(|e| e.2).collect();
        let done = (1..=3).all(|r| {
            notes
                .iter()
                .any(|n| n.starts_with(&format!("run {r}: ")) && n.contains("→ Succeeded"))
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "one Event per run: {notes:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_gets_a_warning_event() {
    let ns = Namespace::new("unreachable");
    let work = tempfile::tempdir().unwrap();
    let c = test_cluster();
    // A login node that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    std::thread::spawn(move || {
        let mut held = vec![];
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    slurm_cluster(&ns, "k8s-unreachable");
    let mut dead = c.cluster_object(
        &remote_base("k8s-unreachable"),
        &port,
        "slurm-ssh",
        json!({"keySecretRef": {"name": "slurm-ssh", "key": "ssh-privatekey"}}),
    );
    dead["metadata"]["name"] = json!("dead");
    dead["spec"]["ssh"]["connectTimeout"] = json!("2s");
    ns.apply(dead);
    let _op = Operator::start(&ns, work.path(), &[]);
    ns.apply(asset(
        "stuck",
        json!({"assetKey": "t/stuck", "clusterRef": "dead", "payload": {"inline": "true"}}),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let evs = events(&ns, "stuck");
        if evs
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "ClusterUnreachable")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Warning Event for an unreachable cluster: {evs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_ssh_master_and_the_log_tells_the_story() {
    let ns = Namespace::new("sigterm");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-sigterm");
    let log_path = work.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut op = Operator::start_logging(&ns, &work.path().join("op"), &[], log);
    let pid = op.0.id();
    ns.apply(asset(
        "once",
        json!({"assetKey": "t/once", "clusterRef": "hpc", "payload": {"inline": "echo once"}}),
    ));
    ns.wait("slurmasset", "once", "Succeeded", phase_is("Succeeded"))
        .await;
    let masters = || {
        let out = Command::new("pgrep")
            .args(["-f", &format!("sao-ssh-{pid}-")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        !masters().is_empty(),
        "the SSH master should be up while running"
    );
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    while op.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the operator did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(masters(), "", "an SSH master outlived the operator");
    let text = std::fs::read_to_string(&log_path).unwrap();
    for line in [
        "reconciling SlurmAssets",
        "connected to",
        "closing the connection",
        "stopped",
    ] {
        assert!(text.contains(line), "no {line:?} at info level:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_credential_files_are_written_once() {
    use std::os::unix::fs::MetadataExt;
    let ns = Namespace::new("keyfiles");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-keyfiles");
    let _op = Operator::start(&ns, work.path(), &[]);
    let stamp = || -> Vec<(String, u64, i64, i64)> {
        let mut files: Vec<_> = std::fs::read_dir(work.path().join("ssh"))
            .unwrap()
            .flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                assert_eq!(m.mode() & 0o777, 0o600, "{:?}", e.path());
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let run_batch = async |from: usize| {
        for i in from..from + 4 {
            ns.apply(asset(
                &format!("a{i}"),
                json!({"assetKey": format!("t/a{i}"), "clusterRef": "hpc",
                       "payload": {"inline": "echo ok"}}),
            ));
        }
        for i in from..from + 4 {
            ns.wait(
                "slurmasset",
                &format!("a{i}"),
                "Succeeded",
                phase_is("Succeeded"),
            )
            .await;
        }
    };
    run_batch(0).await;
    let before = stamp();
    assert!(before.iter().any(|f| f.0.ends_with("-key")), "{before:?}");
    run_batch(4).await;
    assert_eq!(stamp(), before, "key or known_hosts files were rewritten");
}

#[test]
fn crds_install_without_warnings_and_bound_their_integers() {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");
    let (ok, _, err) = common::k8s::kubectl_run(
        &["apply", "--server-side", "--force-conflicts", "-f", crds],
        None,
    );
    assert!(ok, "{err}");
    assert!(!err.contains("Warning"), "the API server warned: {err}");
    let explain = kubectl_ok(&["explain", "slurmassets"], None);
    assert!(!explain.contains("Auto-generated"), "{explain}");
    let ns = Namespace::new("bounds");
    for (field, value) in [
        ("cpusPerTask", json!(5_000_000_000u64)),
        ("cpusPerTask", json!(0)),
        ("nodes", json!(-1)),
    ] {
        let obj = asset(
            "big",
            json!({"assetKey": "t/big", "clusterRef": "hpc", "payload": {"inline": "true"},
                   "resources": {field: value}}),
        );
        let mut obj = obj;
        obj["metadata"]["namespace"] = json!(ns.0);
        let (ok, _, err) = common::k8s::kubectl_run(
            &["apply", "--server-side", "-f", "-"],
            Some(&obj.to_string()),
        );
        assert!(!ok, "{field}: {value} was admitted");
        assert!(
            err.contains(&format!("spec.resources.{field}")),
            "the refusal names no field: {err}"
        );
    }
}

/// The chart rendered by the real Helm engine (tests/helm/render.py, in the venv that
/// scripts/test-chart prepares).
fn render_chart(release: &str, namespace: &str, values: Value) -> Vec<Value> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-tools/bin/python3");
    assert!(
        std::path::Path::new(python).exists(),
        "run scripts/test-chart first: it prepares the Helm engine"
    );
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm/render.py"))
        .args([release, namespace, &values.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_service_account_is_enough_and_no_more() {
    let ns = Namespace::new("chartrbac");
    let release = format!("r{}", std::process::id());
    let objs = render_chart(
        &release,
        &ns.0,
        json!({"rbac": {"clusterWide": false, "secrets": "namespaced", "secretNamespaces": [ns.0]}}),
    );
    // Install what the chart grants (no Deployment: no kubelet runs it here).
    let mut args = vec![];
    for o in &objs {
        match o["kind"].as_str().unwrap() {
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding" => {
                kubectl_ok(
                    &["apply", "--server-side", "--force-conflicts", "-f", "-"],
                    Some(&o.to_string()),
                );
            }
            "Deployment" => {
                args = o["spec"]["template"]["spec"]["containers"][0]["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .filter(|a| !a.starts_with("--metrics-port") && a != "--log-json")
                    .collect();
            }
            _ => {}
        }
    }
    assert_eq!(args[0], "run");
    let sa = objs.iter().find(|o| o["kind"] == "ServiceAccount").unwrap()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let token = kubectl_ok(&["create", "token", &sa, "-n", &ns.0], None);
    let admin: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(kubeconfig()).unwrap()).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let work = tempfile::tempdir().unwrap();
    let sa_config = work.path().join("sa-kubeconfig");
    std::fs::write(
        &sa_config,
        json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "t", "cluster": cluster}],
            "users": [{"name": "sa", "user": {"token": token.trim()}}],
            "contexts": [{"name": "sa", "context": {"cluster": "t", "user": "sa", "namespace": ns.0}}],
        })
        .to_string(),
    )
    .unwrap();
    // Nothing more than it needs.
    let can = |verb: &str, what: &str| -> bool {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", &sa_config)
            .args(["auth", "can-i", verb, what, "-n", &ns.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("list", "secrets"),
        ("create", "secrets"),
        ("delete", "slurmassets"),
        ("create", "slurmassets"),
        ("get", "pods"),
        ("create", "pods"),
        ("list", "nodes"),
    ] {
        assert!(!can(verb, what), "the operator's account may {verb} {what}");
    }
    for (verb, what) in [
        ("get", "secrets"),
        ("watch", "slurmassets"),
        ("patch", "slurmassets/status"),
        ("create", "events.events.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
    ] {
        assert!(
            can(verb, what),
            "the operator's account may not {verb} {what}"
        );
    }
    // And enough: the operator, with the Deployment's own arguments and only this account,
    // runs an asset on the real Slurm.
    slurm_cluster(&ns, "k8s-chartrbac");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut op = Command::new(BIN)
        .args(&args)
        .arg(format!("--metrics-port={port}"))
        .arg("--kubeconfig")
        .arg(&sa_config)
        .arg("--work-dir")
        .arg(work.path().join("op"))
        .env("POD_NAME", "chart-rbac")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ns.apply(asset(
        "rbac",
        json!({"assetKey": "t/rbac", "clusterRef": "hpc", "payload": {"inline": "echo least privilege"}}),
    ));
    let o = ns
        .wait("slurmasset", "rbac", "Succeeded", phase_is("Succeeded"))
        .await;
    let _ = op.kill();
    let _ = op.wait();
    assert_eq!(o["status"]["logTail"]["stdout"], "least privilege");
    assert!(
        events(&ns, "rbac")
            .iter()
            .any(|e| e.2.contains("→ Succeeded")),
        "Events need their permission too"
    );
}
