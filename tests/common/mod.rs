//! Helpers for the integration tests: run the real operator binary on a temp directory of
//! manifests and read back its status files.
#![allow(dead_code)]

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
    dir.join(".status/default/SlurmAsset")
        .join(format!("{name}.yaml"))
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

pub fn phase(obj: &Value) -> &str {
    obj["status"]["phase"].as_str().unwrap_or("")
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}
