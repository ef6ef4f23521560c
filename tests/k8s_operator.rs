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

struct Operator(Child, u16);

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
        let port = free_port();
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
        Operator(child, port)
    }

    /// The value of one metric on /metrics (`None` until the server answers).
    fn metric(&self, name: &str) -> Option<f64> {
        scrape_metrics(self.1)?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
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
    assert_eq!(o["status"]["logTail"]["stdout"], "python 42\n", "{o:#}");
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
    // The end comes from the exit file; accounting's metrics follow within seconds.
    ns.wait("slurmasset", "again", "the last run's metrics", |o| {
        o["status"]["metrics"]["cpuEfficiency"].is_number()
    })
    .await;
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
    // A heterogeneous job whose components carry the payloads has none of its own; an
    // empty payload is still refused.
    let side_by_side = |payload: Option<Value>| {
        let mut spec = json!({"assetKey": "t/het", "clusterRef": "hpc", "components": [
            {"name": "a", "payload": {"inline": "true"}},
            {"name": "b", "payload": {"inline": "true"}}]});
        if let Some(p) = payload {
            spec["payload"] = p;
        }
        let mut obj = asset("het", spec);
        obj["metadata"]["namespace"] = json!(ns.0);
        common::k8s::kubectl_run(
            &["apply", "--server-side", "--dry-run=server", "-f", "-"],
            Some(&obj.to_string()),
        )
    };
    let (ok, _, err) = side_by_side(None);
    assert!(ok, "{err}");
    let (ok, _, err) = side_by_side(Some(json!({})));
    assert!(!ok && err.contains("spec.payload"), "{err}");
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
    let work = tempfile::tempdir().unwrap();
    let sa_config = work.path().join("sa-kubeconfig");
    common::k8s::token_kubeconfig(&kubeconfig(), &token, &ns.0, &sa_config);
    // Nothing more than it needs.
    let can = |verb: &str, what: &str| -> bool {
        let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &sa_config)
            .args(["auth", "can-i", verb, resource, "-n", &ns.0]);
        if !sub.is_empty() {
            cmd.arg(format!("--subresource={sub}"));
        }
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("list", "secrets"),
        ("create", "secrets"),
        ("delete", "slurmassets"),
        ("create", "slurmassets"),
        ("create", "slurmsessions"),
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
        ("watch", "slurmsessions"),
        ("patch", "slurmsessions/status"),
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
    let port = free_port();
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
    assert_eq!(o["status"]["logTail"]["stdout"], "least privilege\n");
    assert!(
        events(&ns, "rbac")
            .iter()
            .any(|e| e.2.contains("→ Succeeded")),
        "Events need their permission too"
    );
}

const SECRET_TOKEN: &str = "s3cr3t-token-value";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_runs_on_slurm_to_succeeded_and_delete_cancels() {
    let ns = Namespace::new("e2e");
    let work = tempfile::tempdir().unwrap();
    let c = test_cluster();
    let base = remote_base("k8s-e2e");
    slurm_cluster(&ns, "k8s-e2e");
    ns.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app"},
                    "data": {"token": b64(SECRET_TOKEN)}}),
    );
    ns.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "payloads"},
        "data": {"busy.sh": "while [ $SECONDS -lt 4 ]; do :; done\necho \"greeting=$GREETING token-length=${#TOKEN}\"\n"}}));
    let op = Operator::start(&ns, work.path(), &[]);
    ns.apply(asset(
        "busy",
        json!({
            "assetKey": "analytics/busy", "clusterRef": "hpc",
            "payload": {"configMapRef": {"name": "payloads", "key": "busy.sh"}},
            "env": [
                {"name": "GREETING", "value": "it's $(not) run"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app", "key": "token"}}},
            ],
            "resources": {"mem": "100M", "timeLimit": "00:05:00"},
        }),
    ));
    // Its run dir while it runs (bash's SECONDS steps in whole seconds: at least 3 s).
    let running = ns
        .wait("slurmasset", "busy", "Running", phase_is("Running"))
        .await;
    ns.wait("slurmasset", "busy", "Succeeded", phase_is("Succeeded"))
        .await;
    // The end comes from the exit file; accounting's metrics follow within seconds.
    let done = ns
        .wait("slurmasset", "busy", "metrics", |o| {
            o["status"]["metrics"]["elapsedSeconds"].is_number()
        })
        .await;
    let s = &done["status"];
    assert_eq!(
        done["metadata"]["finalizers"],
        json!(["dagster-slurm.io/job-cleanup"])
    );
    assert_eq!(s["observedGeneration"], 1);
    let job_id = s["jobId"].as_str().unwrap().to_string();
    assert!(
        s["metrics"]["elapsedSeconds"].as_f64().unwrap() >= 3.0,
        "{s:#}"
    );
    assert!(
        s["metrics"]["cpuEfficiency"].as_f64().unwrap() > 0.5,
        "a busy loop: {s:#}"
    );
    assert_eq!(
        s["logTail"]["stdout"],
        format!(
            "greeting=it's $(not) run token-length={}\n",
            SECRET_TOKEN.len()
        )
    );
    assert!(
        running["status"]["remoteRunDir"]
            .as_str()
            .unwrap()
            .starts_with(&format!("/home/{}/{base}/runs/{}/busy/1-1", c.user, ns.0))
    );
    assert!(
        s.get("remoteRunDir").is_none(),
        "removed, no longer named: {s:#}"
    );
    let tag = format!("sao.{}.1.1", done["metadata"]["uid"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    while sacct_jobs(&tag).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sacct = sacct_jobs(&tag);
    assert_eq!(sacct.len(), 1, "exactly one Slurm job: {sacct:?}");
    assert_eq!(sacct[0].2, job_id);
    // The SlurmCluster's status says what the connection learnt.
    let cluster = ns
        .wait("slurmcluster", "hpc", "Reachable", |o| {
            o["status"]["conditions"][0]["status"] == "True"
        })
        .await;
    let cs = &cluster["status"];
    assert_eq!(cs["conditions"][0]["type"], "Reachable", "{cs:#}");
    assert_eq!(cs["accountingAvailable"], true, "{cs:#}");
    assert!(
        cs["platform"].as_str().unwrap().starts_with("linux-"),
        "{cs:#}"
    );
    // An unchanged status is not written again: the object stays put.
    let version = done["metadata"]["resourceVersion"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = ns.get("slurmasset", "busy").unwrap();
    assert_eq!(
        later["metadata"]["resourceVersion"], version,
        "status rewritten"
    );
    // Secrets stay secret: not in the object, not in its Events.
    let evs = events(&ns, "busy");
    assert!(evs.iter().any(|e| e.1 == "Completed"), "{evs:#?}");
    let text = format!("{later} {evs:?}");
    assert!(!text.contains(SECRET_TOKEN) && !text.contains("PRIVATE KEY"));

    // Deleting a running asset cancels its Slurm job, then releases the object.
    ns.apply(asset(
        "long",
        json!({"assetKey": "analytics/long", "clusterRef": "hpc",
               "payload": {"inline": "echo started; sleep 300"}}),
    ));
    let running = ns
        .wait("slurmasset", "long", "Running", phase_is("Running"))
        .await;
    let long_id = running["status"]["jobId"].as_str().unwrap().to_string();
    ns.delete("slurmasset", "long");
    ns.wait("slurmasset", "long", "released", |o| o.is_null())
        .await;
    let uid = running["metadata"]["uid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = sacct_jobs(&format!("sao.{uid}.1.1"));
        if jobs.len() == 1 && jobs[0].1.starts_with("CANCELLED") {
            assert_eq!(jobs[0].2, long_id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not cancelled in sacct: {jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One SSH master for both assets.
    assert_eq!(
        op.metric("slurm_asset_operator_ssh_connects_total"),
        Some(1.0)
    );
    assert_eq!(
        op.metric("slurm_asset_operator_submit_latency_seconds_count"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_one_time_code_from_secrets() {
    let ns = Namespace::new("totp");
    let work = tempfile::tempdir().unwrap();
    let c = test_cluster();
    let known = std::fs::read_to_string(&c.known_hosts).unwrap();
    let login = |seed: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "login"},
               "data": {"password": b64(&c.password), "totp": b64(seed), "known_hosts": b64(&known)}})
    };
    ns.apply(login(&c.totp_seed));
    ns.apply(c.cluster_object(
        &remote_base("k8s-totp"),
        &c.otp_port,
        "login",
        json!({"passwordSecretRef": {"name": "login", "key": "password"},
               "totpSecretRef": {"name": "login", "key": "totp"}}),
    ));
    let _op = Operator::start(&ns, work.path(), &[]);
    ns.apply(asset(
        "otp",
        json!({"assetKey": "t/otp", "clusterRef": "hpc", "payload": {"inline": "echo via otp"}}),
    ));
    let done = ns
        .wait("slurmasset", "otp", "Succeeded", phase_is("Succeeded"))
        .await;
    assert_eq!(done["status"]["logTail"]["stdout"], "via otp\n");
    // Password and seed stay in memory: in no file of the work dir, not in status.
    let mut stack = vec![work.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                assert!(!text.contains(&c.totp_seed) && !text.contains(&c.password));
            }
        }
    }
    // A seed that is not base32 is named in the status, never echoed; fixing the Secret
    // (its watch wakes the asset) lets the same spec run.
    ns.apply(login("not a seed!"));
    ns.apply(asset(
        "bad-seed",
        json!({"assetKey": "t/bad", "clusterRef": "hpc", "payload": {"inline": "true"}}),
    ));
    let bad = ns
        .wait("slurmasset", "bad-seed", "Failed", phase_is("Failed"))
        .await;
    let message = bad["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.ssh.totpSecretRef") && message.contains("not a base32 TOTP seed"),
        "{message}"
    );
    assert!(!message.contains("not a seed!"), "{message}");
    ns.apply(login(&c.totp_seed));
    let fixed = ns
        .wait("slurmasset", "bad-seed", "Succeeded", phase_is("Succeeded"))
        .await;
    assert_eq!(fixed["status"]["observedGeneration"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uv_environment_from_a_configmap_is_packed_and_reused() {
    // The operator's pod has no checkout: the project's files come from a ConfigMap.
    let ns = Namespace::new("envcm");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-envcm");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/uv-env");
    let read = |f: &str| std::fs::read_to_string(format!("{fixture}/{f}")).unwrap();
    let _op = Operator::start(&ns, work.path(), &[]);
    let spec = |run_key: &str| {
        json!({"assetKey": "t/env", "clusterRef": "hpc", "runKey": run_key,
               "environment": {"packer": "uv", "sourcesConfigMap": "project",
                               "uv": {"python": "/usr/bin/python3"}},
               "payload": {"inline": "import yaml, dagster_pipes\nprint(yaml.__version__)\n",
                           "interpreter": ["python3"]}})
    };
    // The asset comes first: it waits for its ConfigMap, which wakes it once created.
    ns.apply(asset("env", spec("r1")));
    let waiting = ns
        .wait("slurmasset", "env", "waiting for the ConfigMap", |o| {
            o["status"]["reason"] == "EnvRetrying"
        })
        .await;
    let message = waiting["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("sourcesConfigMap") && message.contains("not found"),
        "{message}"
    );
    assert_eq!(waiting["status"]["phase"], "Packing");
    ns.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "project"},
        "data": {"pyproject.toml": read("pyproject.toml"), "uv.lock": read("uv.lock")},
    }));
    let first = ns
        .wait("slurmasset", "env", "Succeeded", phase_is("Succeeded"))
        .await;
    assert_eq!(first["status"]["logTail"]["stdout"], "6.0.4\n", "{first:#}");
    let env = &first["status"]["env"];
    assert_eq!(env["cacheHit"], false, "{env}");
    assert!(env["bytesUploaded"].as_u64().unwrap() > 0);
    let key = env["cacheKey"].as_str().unwrap().to_string();
    ns.apply(asset("env", spec("r2")));
    let second = ns
        .wait("slurmasset", "env", "run r2 Succeeded", |o| {
            o["status"]["runKey"] == "r2" && o["status"]["phase"] == "Succeeded"
        })
        .await;
    assert_eq!(second["status"]["env"]["cacheKey"], key.as_str());
    assert_eq!(second["status"]["env"]["cacheHit"], true);
    assert_eq!(second["status"]["env"]["bytesUploaded"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_asset_reconciles_share_one_scheduler_poll_per_interval() {
    let ns = Namespace::new("batch");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-batch");
    let op = Operator::start(&ns, work.path(), &[]);
    let started = Instant::now();
    let names: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    for n in &names {
        ns.apply(asset(
            n,
            json!({"assetKey": format!("t/{n}"), "clusterRef": "hpc",
                   "payload": {"inline": "sleep 3; echo ok"}}),
        ));
    }
    for n in &names {
        let o = ns
            .wait("slurmasset", n, "Succeeded", phase_is("Succeeded"))
            .await;
        assert_eq!(o["status"]["logTail"]["stdout"], "ok\n");
    }
    let polls = op
        .metric("slurm_asset_operator_scheduler_polls_total")
        .unwrap();
    let reconciles = op.metric("slurm_asset_operator_reconciles_total").unwrap();
    let bound = started.elapsed().as_secs_f64() + 2.0; // pollInterval is 1s
    assert!(
        polls <= bound,
        "{polls} scheduler polls in {:?}",
        started.elapsed()
    );
    assert!(
        reconciles > 3.0 * polls,
        "{reconciles} reconciles, {polls} polls"
    );
    assert_eq!(
        op.metric("slurm_asset_operator_ssh_connects_total"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_wake_assets_and_a_malformed_object_is_reported_once() {
    let ns = Namespace::new("watches");
    let work = tempfile::tempdir().unwrap();
    let _op = Operator::start(&ns, work.path(), &["--allow-local-execution"]);
    ns.apply(asset(
        "hello",
        json!({"assetKey": "t/hello", "payload": {"inline": "echo hello"}}),
    ));
    ns.apply(asset(
        "needs-cluster",
        json!({"assetKey": "t/c", "clusterRef": "later", "payload": {"inline": "echo on the cluster"}}),
    ));
    ns.apply(asset(
        "needs-secret",
        json!({"assetKey": "t/s", "payload": {"inline": "echo \"len=${#TOKEN}\""},
               "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app", "key": "token"}}}]}),
    ));
    // Admitted by the schema, refused by the operator's own parsing: it must not stop the rest.
    ns.apply(asset(
        "broken",
        json!({"assetKey": "t/b", "payload": {"inline": "true"}, "resources": {"mem": "99999999999999999999999G"}}),
    ));
    let hello = ns
        .wait("slurmasset", "hello", "Succeeded", phase_is("Succeeded"))
        .await;
    assert_eq!(hello["status"]["logTail"]["stdout"], "hello\n");
    let broken = ns
        .wait("slurmasset", "broken", "Failed", phase_is("Failed"))
        .await;
    assert!(
        broken["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.resources.mem"),
        "{broken:#}"
    );
    let c = ns
        .wait("slurmasset", "needs-cluster", "Failed", phase_is("Failed"))
        .await;
    assert!(
        c["status"]["message"]
            .as_str()
            .unwrap()
            .contains("SlurmCluster \"later\" not found")
    );
    let s = ns
        .wait("slurmasset", "needs-secret", "Failed", phase_is("Failed"))
        .await;
    assert!(
        s["status"]["message"]
            .as_str()
            .unwrap()
            .contains("Secret \"app\" not found")
    );
    // Creating what they lack wakes them through the SlurmCluster and Secret watches.
    ns.apply(
        json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
                    "metadata": {"name": "later"}, "spec": {"mode": "local"}}),
    );
    let c = ns
        .wait(
            "slurmasset",
            "needs-cluster",
            "Succeeded",
            phase_is("Succeeded"),
        )
        .await;
    assert_eq!(c["status"]["logTail"]["stdout"], "on the cluster\n");
    ns.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app"},
                    "data": {"token": "c2VjcmV0"}}),
    );
    let s = ns
        .wait(
            "slurmasset",
            "needs-secret",
            "Succeeded",
            phase_is("Succeeded"),
        )
        .await;
    assert_eq!(s["status"]["logTail"]["stdout"], "len=6\n");
    // The malformed object: one status write and one Warning Event, not one per resync.
    let version = ns.get("slurmasset", "broken").unwrap()["metadata"]["resourceVersion"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ns.get("slurmasset", "broken").unwrap()["metadata"]["resourceVersion"],
        version
    );
    let warnings: Vec<_> = events(&ns, "broken")
        .into_iter()
        .filter(|e| e.0 == "Warning" && e.1 == "InvalidSpec")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    // Deleting a finished asset releases it.
    ns.delete("slurmasset", "hello");
    ns.wait("slurmasset", "hello", "released", |o| o.is_null())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_holds_a_deletion_until_forced_or_the_grace_ends() {
    let ns = Namespace::new("holddelete");
    let work = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: every connection is refused.
    ns.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssh"},
                    "data": {"key": "bm90IGEga2V5"}}),
    );
    ns.apply(
        json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
        "metadata": {"name": "gone"},
        "spec": {"mode": "slurm", "ssh": {"host": "127.0.0.1", "port": 1, "user": "u",
                 "keySecretRef": {"name": "ssh", "key": "key"}, "connectTimeout": "1s"}}}),
    );
    let _op = Operator::start(&ns, work.path(), &["--release-grace=60s"]);
    for name in ["orphan", "stale"] {
        ns.apply(asset(
            name,
            json!({"assetKey": format!("t/{name}"), "clusterRef": "gone", "payload": {"inline": "sleep 1000"}}),
        ));
        ns.wait("slurmasset", name, "submitting", |o| {
            o["status"]["phase"] == "Submitting"
                && o["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
        })
        .await;
    }
    // The cancel cannot reach the cluster: the object is held, not reported Cancelled.
    ns.delete("slurmasset", "orphan");
    let deleting = Instant::now();
    ns.delete("slurmasset", "stale");
    let held = ns
        .wait("slurmasset", "orphan", "held", |o| {
            o["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cancel not confirmed"))
        })
        .await;
    assert_eq!(held["status"]["phase"], "Submitting", "{held:#}");
    let gone = ns
        .wait("slurmcluster", "gone", "unreachable", |o| {
            o["status"]["conditions"][0]["reason"] == "ConnectFailed"
        })
        .await;
    assert_eq!(gone["status"]["conditions"][0]["status"], "False");
    // The annotation releases it at once, with a Warning Event.
    kubectl_ok(
        &[
            "annotate",
            "-n",
            &ns.0,
            "slurmasset",
            "orphan",
            "dagster-slurm.io/force-release=true",
        ],
        None,
    );
    ns.wait("slurmasset", "orphan", "released", |o| o.is_null())
        .await;
    assert!(
        deleting.elapsed() < Duration::from_secs(60),
        "forced before the grace period"
    );
    let evs = events(&ns, "orphan");
    assert!(
        evs.iter()
            .any(|e| e.0 == "Warning" && e.1 == "CancelNotConfirmed"),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e.0 == "Warning" && e.1 == "ReleasedWithoutCancel"),
        "{evs:#?}"
    );
    // Without the annotation the wait is bounded: past the grace period it is released too.
    ns.wait("slurmasset", "stale", "released after the grace", |o| {
        o.is_null()
    })
    .await;
    assert!(deleting.elapsed() >= Duration::from_secs(60));
    assert!(
        events(&ns, "stale")
            .iter()
            .any(|e| e.2.contains("after the grace period"))
    );
}

#[test]
fn the_default_charts_account_reads_what_it_reconciles_and_nothing_else() {
    // Cluster-wide RBAC (the default): applied and probed only, since an operator watching
    // every namespace would reconcile the other tests' objects too.
    let ns = Namespace::new("chartdefault");
    let release = format!("d{}", std::process::id());
    let objs = render_chart(&release, &ns.0, json!({}));
    for o in &objs {
        if matches!(
            o["kind"].as_str().unwrap(),
            "ServiceAccount" | "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding"
        ) {
            kubectl_ok(
                &["apply", "--server-side", "--force-conflicts", "-f", "-"],
                Some(&o.to_string()),
            );
        }
    }
    let sa = format!(
        "system:serviceaccount:{}:{release}-slurm-asset-operator",
        ns.0
    );
    let can = |verb: &str, what: &str, namespace: &str| -> bool {
        let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
        let sub = format!("--subresource={sub}");
        let mut args = vec![
            "auth", "can-i", verb, resource, "-n", namespace, "--as", &sa,
        ];
        if sub != "--subresource=" {
            args.push(&sub);
        }
        let (_, out, _) = common::k8s::kubectl_run(&args, None);
        out.trim() == "yes"
    };
    for (verb, what) in [
        ("watch", "slurmassets"),
        ("patch", "slurmassets/status"),
        ("update", "slurmassets/finalizers"),
        ("watch", "slurmsessions"),
        ("patch", "slurmsessions/status"),
        ("update", "slurmsessions/finalizers"),
        ("watch", "configmaps"),
        // The documented trade-off of rbac.secrets=cluster.
        ("watch", "secrets"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(can(verb, what, "default"), "cannot {verb} {what}");
    }
    assert!(can("update", "leases.coordination.k8s.io", &ns.0));
    for (verb, what) in [
        ("create", "secrets"),
        ("delete", "slurmassets"),
        ("create", "slurmassets"),
        ("update", "slurmassets"),
        ("delete", "slurmsessions"),
        ("create", "pods"),
        ("get", "pods"),
        ("update", "leases.coordination.k8s.io"),
    ] {
        assert!(!can(verb, what, "default"), "may {verb} {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_local_jobs_never_see_the_operators_credentials() {
    let ns = Namespace::new("localcreds");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-localcreds");
    let _op = Operator::start(&ns, work.path(), &["--allow-local-execution"]);
    // A Slurm asset first: its connection writes the SSH key into the work dir.
    ns.apply(asset(
        "remote",
        json!({"assetKey": "t/remote", "clusterRef": "hpc", "payload": {"inline": "echo remote"}}),
    ));
    ns.wait("slurmasset", "remote", "Succeeded", phase_is("Succeeded"))
        .await;
    let ssh = work.path().join("ssh");
    let keys = std::fs::read_dir(&ssh).unwrap().count();
    assert!(keys >= 2, "the key and known_hosts files are there");
    // A local asset looks for them, and for the operator's environment.
    ns.apply(asset(
        "snoop",
        json!({"assetKey": "t/snoop", "payload": {"inline": format!(
            "echo \"files=$(ls -A {dir} | wc -l)\"\ncat {dir}/*-key >/dev/null 2>&1 && echo key-read || echo key-hidden\necho \"kube=${{KUBERNETES_SERVICE_HOST:-none}}\"",
            dir = ssh.display()
        )}}),
    ));
    let o = ns
        .wait("slurmasset", "snoop", "ended", |o| {
            matches!(o["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
        })
        .await;
    assert_eq!(o["status"]["phase"], "Succeeded", "{o:#}");
    assert_eq!(
        o["status"]["logTail"]["stdout"], "files=0\nkey-hidden\nkube=none\n",
        "{o:#}"
    );
    // Hidden from the job only: the operator still reads its files.
    assert_eq!(std::fs::read_dir(&ssh).unwrap().count(), keys);
}

/// A SlurmSession in Kubernetes mode (issue 13): steps created before their session wait for
/// it and are woken by it; they run as steps of its one allocation; the session lists them;
/// deleting it cancels a running step (its asset ends `Cancelled`) and the allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_one_allocation_for_its_steps_and_deletion_cancels_them() {
    let ns = Namespace::new("session");
    let work = tempfile::tempdir().unwrap();
    slurm_cluster(&ns, "k8s-session");
    let _op = Operator::start(&ns, work.path(), &[]);
    let step = |name: &str, script: &str| {
        asset(
            name,
            json!({"assetKey": format!("s/{name}"), "clusterRef": "hpc", "sessionRef": "warm",
                   "payload": {"inline": script}, "resources": {"mem": "100M"}}),
        )
    };
    let report = "echo \"in $SLURM_JOB_ID.$SLURM_STEP_ID\"; sleep 2";
    ns.apply(step("a", report));
    ns.apply(step("b", report));
    ns.wait("slurmasset", "a", "waiting for its session", |o| {
        o["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("waiting for SlurmSession \"warm\""))
    })
    .await;
    ns.apply(
        json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmSession",
        "metadata": {"name": "warm"},
        "spec": {"clusterRef": "hpc", "maxConcurrentSteps": 2, "idleTimeout": "5m",
                 "resources": {"cpusPerTask": 2, "mem": "400M", "timeLimit": "00:10:00"}}}),
    );
    let a = ns
        .wait("slurmasset", "a", "Succeeded", phase_is("Succeeded"))
        .await;
    let b = ns
        .wait("slurmasset", "b", "Succeeded", phase_is("Succeeded"))
        .await;
    let s = ns
        .wait("slurmsession", "warm", "Running", |o| {
            o["status"]["phase"] == "Running"
        })
        .await;
    let job = s["status"]["jobId"].as_str().unwrap().to_string();
    assert!(
        s["status"]["allocation"]["remoteRunDir"]
            .as_str()
            .unwrap()
            .contains(&format!("/sessions/{}/warm/", ns.0)),
        "{s:#}"
    );
    let mut steps = vec![];
    for o in [&a, &b] {
        let st = &o["status"];
        assert_eq!(st["jobId"], job.as_str(), "a step of the session: {st:#}");
        let step_id = st["stepId"].as_str().unwrap().to_string();
        assert!(step_id.starts_with(&format!("{job}.")), "{st:#}");
        assert_eq!(st["logTail"]["stdout"], format!("in {step_id}\n"));
        steps.push(step_id);
    }
    assert_ne!(steps[0], steps[1]);
    // No allocation of their own: each is a step of the session's (in its sacct record).
    for o in [&a, &b] {
        let uid = o["metadata"]["uid"].as_str().unwrap();
        assert_eq!(sacct_jobs(&format!("sao.{uid}.")), vec![], "{o:#}");
    }
    let recorded = Command::new("sacct")
        .args(["-P", "-n", "-o", "JobID", "-j", &job])
        .output()
        .unwrap();
    let recorded = String::from_utf8_lossy(&recorded.stdout).to_string();
    for step_id in &steps {
        assert!(recorded.lines().any(|l| l == step_id), "{recorded}");
    }
    // An idle session's status settles: it is not rewritten at every poll (its countdown
    // alone moves every second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let version = |ns: &Namespace| {
        ns.get("slurmsession", "warm").unwrap()["metadata"]["resourceVersion"].clone()
    };
    let settled = version(&ns);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        version(&ns),
        settled,
        "an idle session's status was rewritten"
    );
    ns.apply(step("long", "sleep 300"));
    ns.wait("slurmsession", "warm", "to list its running step", |o| {
        o["status"]["runningAssets"] == json!(["long"])
    })
    .await;
    ns.delete("slurmsession", "warm");
    let long = ns
        .wait("slurmasset", "long", "Cancelled", phase_is("Cancelled"))
        .await;
    assert_eq!(long["status"]["jobId"], job.as_str());
    let deadline = Instant::now() + Duration::from_secs(60);
    while ns.get("slurmsession", "warm").is_some() {
        assert!(
            Instant::now() < deadline,
            "the session's finalizer stayed after its allocation was cancelled"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let state = Command::new("sacct")
        .args(["-X", "-P", "-n", "-o", "State", "-j", &job])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&state.stdout).starts_with("CANCELLED"),
        "{}",
        String::from_utf8_lossy(&state.stdout)
    );
}
