//! docs/kubernetes.md, run as written (issue 15): its quick start, upgrade and uninstall
//! steps — the fenced blocks marked ```` ```sh step=NAME ```` — run in bash, in order, against a
//! real API server, with the real Helm engine behind `helm` (tests/helm/helm_cli.py) and the
//! operator binary run as a process with the chart's ServiceAccount token in place of the pod
//! (no kubelet here), on the real Slurm test cluster. Only the doc's settings are replaced: the
//! test cluster's host, port, user and key, and a namespace of the test's own.
//!
//! The uninstall deletes the CRDs, which would pull them from under every other test of a shared
//! server; so this test starts an API server of its own with the workplace's `up` script
//! (`SAO_K8S_UP`, else `../shared/k8s/up`), on free ports. Point `SAO_QUICKSTART_KUBECONFIG` at a
//! disposable cluster (kind, k3d, envtest) to run it there instead.

mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The doc's steps this test runs, in this order.
const RUN: &[&str] = &[
    "settings",
    "install",
    "credentials",
    "cluster",
    "asset",
    "watch",
    "upgrade",
    "orphans",
    "uninstall-objects",
    "uninstall-release",
    "uninstall-crds",
];
/// The doc's steps it cannot run here, and why.
const SKIPPED: &[(&str, &str)] = &[
    ("image", "no Docker engine: the image is not built here"),
    (
        "rollout",
        "no kubelet: the pod never runs (the test runs the binary instead)",
    ),
    (
        "uninstall-namespace",
        "no controller-manager: a deleted namespace stays Terminating",
    ),
];
/// The variables of the settings step; the test replaces all but REGISTRY and VERSION.
const SETTINGS: &[&str] = &[
    "NS",
    "REGISTRY",
    "VERSION",
    "SLURM_HOST",
    "SLURM_PORT",
    "SLURM_USER",
    "SSH_KEY",
];

/// The ```sh step=NAME blocks of the doc, by name, in order.
fn doc_steps() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{ROOT}/docs/kubernetes.md")).unwrap();
    let mut steps = vec![];
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line.strip_prefix("```sh step=") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            steps.push((name.trim().to_string(), body.join("\n") + "\n"));
        }
    }
    steps
}

/// The API server the test runs against: one of its own unless SAO_QUICKSTART_KUBECONFIG names
/// a disposable one.
struct ApiServer {
    kubeconfig: PathBuf,
    own: Option<(PathBuf, tempfile::TempDir)>,
}

impl ApiServer {
    fn start() -> ApiServer {
        if let Ok(k) = std::env::var("SAO_QUICKSTART_KUBECONFIG") {
            return ApiServer {
                kubeconfig: k.into(),
                own: None,
            };
        }
        let up = [
            std::env::var("SAO_K8S_UP").ok().map(PathBuf::from),
            Some(Path::new(ROOT).join("../shared/k8s/up")),
            Some(PathBuf::from("/work/shared/k8s/up")),
        ]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect(
            "no way to start a private API server: set SAO_K8S_UP to ../shared/k8s/up, or \
             SAO_QUICKSTART_KUBECONFIG to a disposable cluster (the test deletes the CRDs)",
        );
        let state = tempfile::Builder::new()
            .prefix("sao-quickstart-k8s")
            .tempdir()
            .unwrap();
        let api = free_port();
        // etcd needs two ports in a row (client, peer).
        let etcd = (0..200)
            .map(|i| 20000 + (std::process::id() as u16 % 5000) * 2 + i * 7)
            .find(|p| bindable(*p) && bindable(p + 1))
            .expect("two free ports for etcd");
        let out = Command::new(&up)
            .arg(state.path())
            .env("K8S_API_PORT", api.to_string())
            .env("K8S_ETCD_PORT", etcd.to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let server = ApiServer {
            kubeconfig: state.path().join("kubeconfig"),
            own: Some((up.with_file_name("down"), state)),
        };
        assert!(
            out.status.success(),
            "{} failed: {}",
            up.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some((down, state)) = &self.own {
            let _ = Command::new(down)
                .arg(state.path())
                .arg("--wipe")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The doc's shell, in a directory that looks like the repository's root (the charts, docker/
/// and Cargo.toml linked in; files the steps write, such as known_hosts, stay in it), with
/// `helm` on PATH.
struct Shell {
    work: tempfile::TempDir,
    kubeconfig: PathBuf,
    steps: BTreeMap<String, String>,
    overrides: String,
    ns: String,
}

impl Shell {
    fn new(api: &ApiServer, cluster: &TestCluster, steps: &[(String, String)]) -> Shell {
        let work = tempfile::Builder::new()
            .prefix("sao-quickstart")
            .tempdir()
            .unwrap();
        for f in ["charts", "docker", "Cargo.toml"] {
            std::os::unix::fs::symlink(Path::new(ROOT).join(f), work.path().join(f)).unwrap();
        }
        let bin = work.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let python = format!("{ROOT}/.venv-tools/bin/python3");
        assert!(
            Path::new(&python).exists(),
            "run scripts/test-chart first: it prepares the Helm engine"
        );
        write(
            &bin,
            "helm",
            &format!("#!/bin/sh\nexec {python} {ROOT}/tests/helm/helm_cli.py \"$@\"\n"),
        );
        std::fs::set_permissions(
            bin.join("helm"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let ns = format!("quickstart-{}", std::process::id());
        let overrides = format!(
            "export NS={ns} SLURM_HOST={} SLURM_PORT={} SLURM_USER={} SSH_KEY={}\n",
            cluster.host, cluster.port, cluster.user, cluster.key
        );
        Shell {
            work,
            kubeconfig: api.kubeconfig.clone(),
            steps: steps.iter().cloned().collect(),
            overrides,
            ns,
        }
    }

    fn dir(&self) -> &Path {
        self.work.path()
    }

    /// Runs `script` after the doc's settings and the test's replacements; (ok, stdout, stderr).
    fn bash(&self, script: &str) -> (bool, String, String) {
        let full = format!(
            "set -euo pipefail\n{}{}{script}",
            self.steps["settings"], self.overrides
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(full)
            .current_dir(self.dir())
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.dir().join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the doc's step `name` as written; its stdout and stderr.
    fn step(&self, name: &str) -> String {
        let (ok, out, err) = self.bash(&self.steps[name]);
        assert!(
            ok,
            "step {name} of docs/kubernetes.md failed:\n{}\nstdout:\n{out}\nstderr:\n{err}\noperator log:\n{}",
            self.steps[name],
            self.operator_log()
        );
        format!("{out}{err}")
    }

    fn kubectl(&self, args: &[&str], input: Option<&str>) -> (bool, String, String) {
        common::k8s::kubectl_run_at(&self.kubeconfig, args, input)
    }

    fn kubectl_ok(&self, args: &[&str], input: Option<&str>) -> String {
        let (ok, out, err) = self.kubectl(args, input);
        assert!(ok, "kubectl {}: {err}", args.join(" "));
        out
    }

    /// `kind/name` in the test's namespace, if it exists.
    fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let (ok, out, _) = self.kubectl(&["get", "-n", &self.ns, kind, name, "-o", "json"], None);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    async fn wait(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let obj = self.get("slurmasset", name).unwrap_or(Value::Null);
            if pred(&obj) {
                return obj;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for SlurmAsset {name}: {what}; last: {obj:#}\noperator log:\n{}",
                self.operator_log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn operator_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir().join("operator.log")).unwrap_or_default();
        let mut start = text.len().saturating_sub(6000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    /// The chart's Deployment, run as a process: its arguments and environment, the chart's
    /// ServiceAccount (a token from TokenRequest), a metrics port of its own.
    fn start_operator(&self) -> Operator {
        let d: Value = serde_json::from_str(&self.kubectl_ok(
            &[
                "get",
                "deployment",
                "sao-slurm-asset-operator",
                "-n",
                &self.ns,
                "-o",
                "json",
            ],
            None,
        ))
        .unwrap();
        let pod = &d["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .filter(|a| !a.starts_with("--metrics-port") && a != "--log-json")
            .collect();
        let sa = pod["serviceAccountName"].as_str().unwrap();
        let token = self.kubectl_ok(
            &["create", "token", sa, "-n", &self.ns, "--duration=2h"],
            None,
        );
        let sa_config = self.dir().join("sa-kubeconfig");
        common::k8s::token_kubeconfig(&self.kubeconfig, &token, &self.ns, &sa_config);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("operator.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .arg(format!("--metrics-port={}", free_port()))
            .arg("--kubeconfig")
            .arg(&sa_config)
            .arg("--work-dir")
            .arg(self.dir().join("operator"))
            .env_remove("RUST_LOG")
            .env("POD_NAME", "sao-slurm-asset-operator-0")
            .stdout(Stdio::null())
            .stderr(log);
        for e in container["env"].as_array().into_iter().flatten() {
            if let Some(v) = e["value"].as_str() {
                cmd.env(e["name"].as_str().unwrap(), v);
            }
        }
        Operator(cmd.spawn().unwrap())
    }
}

/// The operator process; SIGKILLed if the test ends without stopping it.
struct Operator(Child);

impl Operator {
    /// Stops it as Kubernetes stops a pod: SIGTERM, and a grace period.
    fn terminate(mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the operator ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test asset of its own: a job that runs until cancelled.
fn sleeper(name: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\n\
         spec:\n  assetKey: quickstart/{name}\n  clusterRef: hpc\n  payload: {{inline: \"sleep 600\"}}\n"
    )
}

fn running_with_job(o: &Value) -> bool {
    o["status"]["phase"] == "Running" && o["status"]["jobId"].is_string()
}

/// Waits until Slurm's accounting says `job` was cancelled.
async fn wait_cancelled(job: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("sacct")
            .args(["-j", job, "-X", "-n", "-P", "--format=State"])
            .output()
            .unwrap();
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state.starts_with("CANCELLED") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} was not cancelled: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[test]
fn the_doc_marks_every_step_and_the_test_knows_them_all() {
    let steps = doc_steps();
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a step name twice: {names:?}");
    let known: BTreeSet<&str> = RUN
        .iter()
        .copied()
        .chain(SKIPPED.iter().map(|(n, _)| *n))
        .collect();
    assert_eq!(
        unique, known,
        "docs/kubernetes.md's steps and the ones this test runs or skips differ"
    );
    // The run steps come in the doc's order (but `orphans`, the way out when the operator is
    // gone, which the test takes before the regular uninstall).
    let main_path = |list: &[&str]| -> Vec<String> {
        list.iter()
            .filter(|n| RUN.contains(n) && **n != "orphans")
            .map(|n| n.to_string())
            .collect()
    };
    assert_eq!(main_path(&names), main_path(RUN));
    // The settings are plain exports of the variables the test knows.
    let settings = &steps.iter().find(|(n, _)| n == "settings").unwrap().1;
    let vars: Vec<&str> = settings
        .lines()
        .map(|l| {
            l.strip_prefix("export ")
                .and_then(|r| r.split_once('='))
                .unwrap_or_else(|| panic!("settings: not an export: {l}"))
                .0
        })
        .collect();
    assert_eq!(vars, SETTINGS);
    // What the test cannot run is at least what the doc promises it shows.
    let image = &steps.iter().find(|(n, _)| n == "image").unwrap().1;
    assert!(image.contains(
        "docker build -t \"$REGISTRY/slurm-asset-operator:$VERSION\" -f docker/Dockerfile ."
    ));
    assert!(image.contains("docker push \"$REGISTRY/slurm-asset-operator:$VERSION\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_quick_start_upgrade_and_uninstall_work_as_written() {
    let steps = doc_steps();
    let cluster = test_cluster();
    let api = ApiServer::start();
    let sh = Shell::new(&api, &cluster, &steps);
    let ns = sh.ns.clone();

    // 0. Settings: the version is this checkout's.
    let (ok, out, err) = sh.bash("echo \"$VERSION $REGISTRY\"\n");
    assert!(ok, "{err}");
    let (version, registry) = out.trim().split_once(' ').unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));

    // 2. Namespace, CRDs, chart: the release's Deployment runs the image built in step 1.
    sh.step("install");
    let d = sh.get("deployment", "sao-slurm-asset-operator").unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("{registry}/slurm-asset-operator:{version}")
    );
    for crd in ["slurmassets", "slurmclusters", "slurmsessions"] {
        sh.kubectl_ok(&["get", "crd", &format!("{crd}.dagster-slurm.io")], None);
    }
    // In place of the pod: the binary, with the Deployment's arguments and account.
    let op = sh.start_operator();

    // 3-4. Credentials, cluster, asset.
    sh.step("credentials");
    let known_hosts = std::fs::read_to_string(sh.dir().join("known_hosts")).unwrap();
    assert!(
        known_hosts.contains(&format!("[{}]:{} ", cluster.host, cluster.port))
            || known_hosts.contains(&format!("{} ", cluster.host)),
        "{known_hosts}"
    );
    sh.step("cluster");
    sh.step("asset");
    let hello = sh.wait("hello", "a final phase", terminal).await;
    assert_eq!(hello["status"]["phase"], "Succeeded", "{hello:#}");

    // 5. Watching it: the job's own output and the cluster's Reachable condition.
    let out = sh.step("watch");
    assert!(out.contains("hello from "), "{out}");
    assert!(out.contains("Succeeded"), "{out}");
    let hpc = sh.get("slurmcluster", "hpc").unwrap();
    assert_eq!(condition(&hpc, "Reachable").unwrap()["status"], "True");

    // Upgrade, with a job running across it: the CRDs server-side, then the chart; the new
    // pod (the binary restarted) adopts the running job and runs nothing again.
    sh.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&sleeper("long")));
    let long = sh.wait("long", "Running", running_with_job).await;
    let out = sh.step("upgrade");
    assert!(
        out.contains("1\tsuperseded") && out.contains("2\tdeployed"),
        "{out}"
    );
    op.terminate();
    let op = sh.start_operator();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = sh.get("slurmasset", "hello").unwrap();
    for field in ["phase", "jobId", "run", "runKey", "attempts", "endTime"] {
        assert_eq!(
            after["status"][field], hello["status"][field],
            "hello's {field} changed across the upgrade"
        );
    }
    let long_after = sh.get("slurmasset", "long").unwrap();
    assert_eq!(long_after["status"]["phase"], "Running", "{long_after:#}");
    assert_eq!(long_after["status"]["jobId"], long["status"]["jobId"]);

    // The operator gone: a deletion waits on the finalizer until the doc's manual steps cancel
    // the job on the cluster and remove the finalizer.
    op.terminate();
    sh.kubectl_ok(
        &["delete", "slurmasset", "long", "-n", &ns, "--wait=false"],
        None,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = sh.get("slurmasset", "long").expect("held by the finalizer");
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    let out = sh.step("orphans");
    assert!(out.contains("SlurmAsset") && out.contains("long"), "{out}");
    assert!(!out.contains("hello"), "only objects in deletion: {out}");
    sh.wait("long", "gone", |o| o.is_null()).await;
    wait_cancelled(long["status"]["jobId"].as_str().unwrap()).await;
    assert!(sh.get("slurmasset", "hello").is_some());

    // Uninstall in the doc's order, the operator back first: the assets (and their jobs)
    // go while it runs, then the release (its pod stops), then the CRDs.
    let op = sh.start_operator();
    sh.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&sleeper("last")));
    let last = sh.wait("last", "Running", running_with_job).await;
    let out = sh.step("uninstall-objects");
    assert!(out.contains("No resources found"), "{out}");
    wait_cancelled(last["status"]["jobId"].as_str().unwrap()).await;
    sh.step("uninstall-release");
    op.terminate();
    sh.step("uninstall-crds");

    // Nothing stranded: no CRD, no release object anywhere, nothing in the namespace but the
    // operator's Lease and Events (which go with the namespace).
    let (_, crds, _) = sh.kubectl(&["get", "crd", "-o", "name"], None);
    assert!(!crds.contains("dagster-slurm.io"), "{crds}");
    let (_, cluster_wide, _) = sh.kubectl(
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            "app.kubernetes.io/instance=sao",
            "-o",
            "name",
        ],
        None,
    );
    assert_eq!(cluster_wide.trim(), "");
    let kinds = sh.kubectl_ok(
        &[
            "api-resources",
            "--verbs=list",
            "--namespaced",
            "-o",
            "name",
        ],
        None,
    );
    let kinds: Vec<&str> = kinds.lines().collect();
    let (_, left, err) = sh.kubectl(&["get", &kinds.join(","), "-n", &ns, "-o", "name"], None);
    let stranded: Vec<&str> = left
        .lines()
        .filter(|l| {
            !l.starts_with("event")
                && *l != "lease.coordination.k8s.io/slurm-asset-operator"
                && *l != "serviceaccount/default"
                && *l != "configmap/kube-root-ca.crt"
        })
        .collect();
    assert!(
        stranded.is_empty(),
        "left in {ns} after the uninstall: {stranded:?} ({err})"
    );
    for (name, why) in SKIPPED {
        eprintln!("not run here: step {name}: {why}");
    }
    // The run dirs of this namespace on the cluster (the doc's SlurmCluster keeps the default
    // remoteBase, ~/.slurm-asset-operator).
    let (ok, _, err) = sh.bash(
        "ssh -i \"$SSH_KEY\" -o BatchMode=yes -o UserKnownHostsFile=known_hosts -p \"$SLURM_PORT\" \
         \"$SLURM_USER@$SLURM_HOST\" rm -rf \".slurm-asset-operator/runs/$NS\"\n",
    );
    assert!(ok, "removing the test's run dirs: {err}");
}
