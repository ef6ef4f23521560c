//! Helpers for the integration tests: run the real operator binary on a temp directory of
//! manifests and read back its status files.
#![allow(dead_code)]

pub mod k8s;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_slurm-asset-operator");

/// PATH with the venv that has the real `dagster-pipes` first (created on first use).
pub fn pipes_path() -> String {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/setup-python-env"
    ))
    .output()
    .expect("running scripts/setup-python-env");
    assert!(
        out.status.success(),
        "setup-python-env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// An inline bash asset manifest.
pub fn asset(name: &str, script: &str) -> String {
    let indented: String = script.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata:\n  name: {name}\nspec:\n  assetKey: test/{name}\n  payload:\n    inline: |\n{indented}"
    )
}

pub fn run_once(dir: &Path, path_env: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["standalone", "--once", "--dir"]).arg(dir);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    cmd.output().expect("running the operator")
}

/// The operator running in the background; killed with SIGKILL on drop.
pub struct Operator(pub Child);

impl Operator {
    pub fn start(dir: &Path) -> Operator {
        let child = Command::new(BIN)
            .args(["standalone", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the operator");
        Operator(child)
    }
    /// Starts one that logs to `<dir>.log`, appending (a restarted operator adds to the
    /// story); [`wait_until`] shows that log when it times out. `path` replaces `PATH`.
    pub fn start_logged(dir: &Path, path: Option<&str>) -> Operator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["standalone", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(p) = path {
            cmd.env("PATH", p);
        }
        Operator(cmd.spawn().expect("starting the operator"))
    }
    pub fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub fn status_file(dir: &Path, name: &str) -> PathBuf {
    use slurm_asset_operator::manifest::Kind;
    use slurm_asset_operator::standalone::store::{ObjectKey, status_path};
    let key = ObjectKey {
        kind: Kind::SlurmAsset,
        namespace: "default".into(),
        name: name.into(),
    };
    status_path(dir, &key)
}

/// The whole status object of an asset, if its file exists and parses.
pub fn read_object(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(status_file(dir, name)).ok()?;
    serde_saphyr::from_str(&text).ok()
}

pub fn status(dir: &Path, name: &str) -> Value {
    read_object(dir, name)
        .map(|v| v["status"].clone())
        .unwrap_or(Value::Null)
}

/// Waits until `pred` holds for the asset's status object; panics with the last one on timeout.
pub fn wait_for(dir: &Path, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let obj = read_object(dir, name).unwrap_or(Value::Null);
        if pred(&obj) {
            return obj;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {name}: {what}; last object: {obj:#}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `limit` until `f` yields; panics naming `what`, with the log of the operator
/// started by [`Operator::start_logged`] on `dir`.
pub fn wait_until<T>(what: &str, dir: &Path, limit: Duration, f: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\noperator log: {}",
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` until `pred` holds for the asset's status object.
pub fn wait_object(
    dir: &Path,
    name: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let obj = read_object(dir, name);
        if let Some(o) = obj.as_ref().filter(|o| pred(o)) {
            return o.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {name}: {what}; last: {:#}\noperator log: {}",
            obj.unwrap_or(Value::Null),
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn phase(obj: &Value) -> &str {
    obj["status"]["phase"].as_str().unwrap_or("")
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

/// Facts of the test cluster brought up by `tests/cluster/up` (read from its env file).
pub struct TestCluster {
    pub host: String,
    pub port: String,
    pub user: String,
    pub key: String,
    pub password: String,
    pub known_hosts: String,
    pub env_path: String,
    /// A pre-deployed environment with dagster-pipes and Ray.
    pub ray_env: String,
    /// A pre-deployed environment with dagster-pipes and PySpark.
    pub spark_env: String,
    /// The second sshd: password, then a TOTP code (PAM google-authenticator).
    pub otp_port: String,
    /// The third sshd: key, then a TOTP code.
    pub key_otp_port: String,
    pub totp_seed: String,
}

/// The running test cluster. Fails (not skips) when it is down: .ci/run starts it.
pub fn test_cluster() -> TestCluster {
    let text = std::fs::read_to_string("/var/lib/sao-test-cluster/env")
        .expect("the test cluster is not up: run tests/cluster/up (as root)");
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} missing from the cluster env file"))
            .to_string()
    };
    TestCluster {
        host: get("SLURM_EDGE_NODE_HOST"),
        port: get("SLURM_EDGE_NODE_PORT"),
        user: get("SLURM_EDGE_NODE_USER"),
        key: get("SLURM_EDGE_NODE_KEY_PATH"),
        password: get("SLURM_EDGE_NODE_PASSWORD"),
        known_hosts: get("SLURM_EDGE_NODE_KNOWN_HOSTS"),
        env_path: get("CI_DEPLOYED_ENVIRONMENT_PATH"),
        ray_env: get("SAO_TEST_RAY_ENV"),
        spark_env: get("SAO_TEST_SPARK_ENV"),
        otp_port: get("SAO_TEST_OTP_SSH_PORT"),
        key_otp_port: get("SAO_TEST_KEY_OTP_SSH_PORT"),
        totp_seed: get("SAO_TEST_TOTP_SEED"),
    }
}

impl TestCluster {
    /// A SlurmCluster manifest with key auth, its own remote base (so tests never share run
    /// dirs), the pre-deployed dagster-pipes environment and a 1 s poll interval.
    pub fn manifest(&self, name: &str, remote_base: &str) -> String {
        format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {{name: {name}}}\nspec:\n  mode: slurm\n  pollInterval: 1s\n  remoteBase: {remote_base:?}\n  ssh: {{host: {}, port: {}, user: {}, keyPath: {}, knownHosts: {{path: {}}}}}\n  environment: {{preDeployedEnvPath: {}}}\n",
            self.host, self.port, self.user, self.key, self.known_hosts, self.env_path
        )
    }
}

impl TestCluster {
    /// The SlurmCluster `hpc` as a Kubernetes object: this cluster at `port`, with the `auth`
    /// fields of `spec.ssh` (Secret references) and known hosts from `secret`'s `known_hosts`.
    pub fn cluster_object(&self, base: &str, port: &str, secret: &str, auth: Value) -> Value {
        let mut ssh = serde_json::json!({
            "host": self.host, "port": port.parse::<u16>().unwrap(), "user": self.user,
            "knownHosts": {"secretRef": {"name": secret, "key": "known_hosts"}},
        });
        for (k, v) in auth.as_object().unwrap() {
            ssh[k] = v.clone();
        }
        serde_json::json!({
            "apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
            "metadata": {"name": "hpc", "namespace": "default"},
            "spec": {"mode": "slurm", "pollInterval": "1s", "remoteBase": base, "ssh": ssh},
        })
    }
}

/// Base64, as Secret data is written.
pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A temp directory holding the SlurmCluster `hpc` (the test cluster, with a remote base of
/// its own for `test`).
pub fn slurm_dir(test: &str) -> (tempfile::TempDir, TestCluster) {
    let c = test_cluster();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "cluster.yaml",
        &c.manifest("hpc", &remote_base(test)),
    );
    (dir, c)
}

/// Whether the asset's phase is final.
pub fn terminal(obj: &Value) -> bool {
    matches!(phase(obj), "Succeeded" | "Failed" | "Cancelled")
}

/// The condition of `type_` in an object's status.
pub fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// A unique remote base per test.
pub fn remote_base(test: &str) -> String {
    format!("sao-tests/{test}-{}", std::process::id())
}

/// An inline bash asset on cluster `hpc` with extra spec lines (indented by two spaces).
pub fn slurm_asset(name: &str, script: &str, extra: &str) -> String {
    asset(name, script).replace(
        "  payload:",
        &format!("  clusterRef: hpc\n{extra}  payload:"),
    )
}

/// sacct rows (JobName|State|JobID) of every allocation whose name starts with `prefix`.
pub fn sacct_jobs(prefix: &str) -> Vec<(String, String, String)> {
    let out = Command::new("sacct")
        .args([
            "-a",
            "-X",
            "-P",
            "-n",
            "-S",
            "now-2hours",
            "--format=JobName%200,State,JobID",
        ])
        .output()
        .expect("sacct");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() >= 3 && f[0].starts_with(prefix))
                .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// The operator's own counters (`.status/operator-metrics.yaml`).
pub fn operator_metrics(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join(".status/operator-metrics.yaml"))
        .ok()
        .and_then(|t| serde_saphyr::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Live (not zombie) processes whose environment carries `SAO_RUN_DIR=<run_dir>`: the job
/// script exports it before a launcher starts its cluster, and `srun` hands it to the
/// workers (and they to their children: Ray's workers, Spark's executors).
pub fn processes_of(run_dir: &str) -> Vec<String> {
    processes_with_run_dir(|d| d == run_dir)
}

/// Processes of any run under the remote base `base` (a test's [`remote_base`]): for runs
/// whose status no longer names their run dir (removed after a success).
pub fn processes_under(base: &str) -> Vec<String> {
    let needle = format!("/{base}/");
    processes_with_run_dir(|d| d.contains(&needle))
}

/// Live processes whose `SAO_RUN_DIR` satisfies `pred`, as `pid: command line`.
fn processes_with_run_dir(pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let ours = env.split(|b| *b == 0).any(|var| {
            var.strip_prefix(b"SAO_RUN_DIR=")
                .is_some_and(|d| pred(&String::from_utf8_lossy(d)))
        });
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .unwrap_or_default()
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'));
        if ours && !zombie {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    found
}

/// Waits until `left` finds nothing, allowing Slurm a moment to end its steps.
fn assert_none_left(left: impl Fn() -> Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = left();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// [`assert_nothing_left`] for every run of the test that used remote base `base`.
pub fn assert_nothing_left_under(base: &str) {
    assert_none_left(|| processes_under(base));
}

/// Asserts that nothing of the run is left, allowing Slurm a moment to end its steps.
pub fn assert_nothing_left(run_dir: &str) {
    assert_none_left(|| processes_of(run_dir));
}

/// A TCP port free on the loopback now (for an operator's /metrics, a test server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `/metrics` on `127.0.0.1:port` (`None` until the server answers 200).
pub fn scrape_metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

pub fn run_dir(obj: &Value) -> String {
    obj["status"]["remoteRunDir"]
        .as_str()
        .expect("remoteRunDir")
        .to_string()
}

pub fn metadata(obj: &Value, key: &str) -> Value {
    obj["status"]["pipes"]["materializations"][0]["metadata"][key]["raw_value"].clone()
}
