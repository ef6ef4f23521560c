//! The real Kubernetes API server of the Kubernetes-mode tests, found through `KUBECONFIG`
//! (`scripts/test` starts the workplace's kube-apiserver + etcd when none is set; point it at
//! your own envtest, kind or k3d cluster otherwise). Objects are handled with `kubectl`, as a
//! user does; every test works in a namespace of its own.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The kubeconfig of the test API server. Fails (never skips) when none is configured.
pub fn kubeconfig() -> PathBuf {
    let path = std::env::var("KUBECONFIG").unwrap_or_else(|_| {
        // The workplace's server, as scripts/test starts it.
        let default = "/tmp/k8s-test/kubeconfig";
        assert!(
            std::path::Path::new(default).exists(),
            "no Kubernetes API server: set KUBECONFIG, or run ../shared/k8s/up"
        );
        default.into()
    });
    PathBuf::from(path)
}

/// Writes to `out` a kubeconfig that reaches the API server of `admin`'s current context as
/// a ServiceAccount's `token`, in `namespace` (what a pod with that account has).
pub fn token_kubeconfig(admin: &Path, token: &str, namespace: &str, out: &Path) {
    let admin: Value = serde_saphyr::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    let ctx = admin["current-context"].as_str().unwrap_or_default();
    let cluster_name = admin["contexts"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == ctx))
        .map(|c| c["context"]["cluster"].clone())
        .unwrap_or(Value::Null);
    let cluster = admin["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == cluster_name))
        .unwrap_or(&admin["clusters"][0])["cluster"]
        .clone();
    std::fs::write(
        out,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "sa", "user": {"token": token.trim()}}],
            "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": namespace}}],
        })
        .to_string(),
    )
    .unwrap();
}

/// Runs kubectl with `args` and `input` on stdin; panics with its stderr on failure.
pub fn kubectl_ok(args: &[&str], input: Option<&str>) -> String {
    let (ok, out, err) = kubectl_run(args, input);
    assert!(ok, "kubectl {}: {err}", args.join(" "));
    out
}

/// Runs kubectl; returns (success, stdout, stderr).
pub fn kubectl_run(args: &[&str], input: Option<&str>) -> (bool, String, String) {
    kubectl_run_at(&kubeconfig(), args, input)
}

/// [`kubectl_run`] against the API server of another kubeconfig.
pub fn kubectl_run_at(
    kubeconfig: &Path,
    args: &[&str],
    input: Option<&str>,
) -> (bool, String, String) {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Installs the CRDs of `crds/` with server-side apply, once per test binary.
pub fn install_crds() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(apply_crds);
}

fn apply_crds() {
    let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");
    kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", crds],
        None,
    );
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "crd/slurmassets.dagster-slurm.io",
            "crd/slurmclusters.dagster-slurm.io",
            "--timeout=60s",
        ],
        None,
    );
}

/// A namespace of the test's own, created now (namespaces are never removed: the test server
/// has no controller-manager to finish a deletion).
pub struct Namespace(pub String);

impl Namespace {
    pub fn new(test: &str) -> Namespace {
        install_crds();
        let name = format!(
            "{test}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 100_000
        );
        kubectl_ok(&["create", "namespace", &name], None);
        Namespace(name)
    }

    /// Creates or updates an object (JSON) in this namespace.
    pub fn apply(&self, mut obj: Value) {
        obj["metadata"]["namespace"] = Value::String(self.0.clone());
        kubectl_ok(
            &["apply", "--server-side", "--field-manager=tests", "-f", "-"],
            Some(&obj.to_string()),
        );
    }

    /// The object `kind/name`, if it exists.
    pub fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let (ok, out, _) = kubectl_run(&["get", "-n", &self.0, kind, name, "-o", "json"], None);
        ok.then(|| serde_json::from_str(&out).unwrap())
    }

    pub fn delete(&self, kind: &str, name: &str) {
        kubectl_ok(&["delete", "-n", &self.0, kind, name, "--wait=false"], None);
    }

    /// Waits until `pred` holds for `kind/name`; panics with the last object on timeout.
    pub async fn wait(
        &self,
        kind: &str,
        name: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let obj = self.get(kind, name).unwrap_or(Value::Null);
            if pred(&obj) {
                return obj;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {kind}/{name}: {what}; last: {obj:#}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
