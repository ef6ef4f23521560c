//! The test cluster's scripts stay off a Slurm of the machine's own (issue 15): `up` refuses
//! while Slurm daemons it did not start are running, before it changes anything, and `down`
//! ends only what its pid files name. The foreign daemons are faked: copies of `sleep` under
//! the daemons' names (a real second Slurm cannot run beside the test cluster). The real
//! test cluster keeps running throughout.

use std::path::Path;
use std::process::{Child, Command};

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster");

/// A process whose name is `name` (what `pgrep -x` matches), killed on drop.
struct Fake(Child);

impl Fake {
    fn start(dir: &Path, name: &str) -> Fake {
        let exe = dir.join(name);
        std::fs::copy("/bin/sleep", &exe).unwrap();
        // A thread forking while the copy's fd was open holds it open for writing until its
        // exec (the other test here runs scripts concurrently): executing the copy then fails
        // with ETXTBSY for a moment, so retry.
        let mut tries = 0;
        loop {
            match Command::new(&exe).arg("300").spawn() {
                Ok(child) => return Fake(child),
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("starting {}: {e}", exe.display()),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mtime(p: &str) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[test]
fn up_refuses_beside_a_slurm_it_did_not_start_and_down_ends_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut foreign = Fake::start(dir.path(), "slurmctld");
    let conf = mtime("/etc/slurm/slurm.conf");
    let out = Command::new(format!("{SCRIPTS}/up")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("refusing"), "{err}");
    assert!(
        err.contains(&format!("slurmctld {}", foreign.pid())),
        "names the foreign daemon: {err}"
    );
    assert!(
        !err.lines().any(|l| l.contains("slurmd ")),
        "the test cluster's own slurmd are not foreign: {err}"
    );
    assert_eq!(mtime("/etc/slurm/slurm.conf"), conf, "nothing rewritten");
    assert!(foreign.alive());

    // `down` with a state of its own: it ends the daemon its pid file names and nothing
    // else, neither the foreign one nor the real test cluster's.
    let state = tempfile::tempdir().unwrap();
    let mut own = Fake::start(dir.path(), "slurmd");
    std::fs::write(
        state.path().join("slurmd-n9.pid"),
        format!("{}\n", own.pid()),
    )
    .unwrap();
    let out = Command::new(format!("{SCRIPTS}/down"))
        .env("SAO_TEST_CLUSTER_STATE", state.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while own.alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!own.alive(), "down ends what its pid file names");
    assert!(foreign.alive(), "down leaves alone what it did not start");
    let status = Command::new(format!("{SCRIPTS}/status")).output().unwrap();
    assert!(
        status.status.success(),
        "the real test cluster is untouched: {}",
        String::from_utf8_lossy(&status.stdout)
    );
}

/// Two free loopback ports in a row (etcd's client and peer ports), and one more for the API.
fn free_ports() -> (u16, u16) {
    let bindable = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let base = 21000 + (std::process::id() % 4000) as u16 * 2;
    let etcd = (0..400)
        .map(|i| base + i * 7)
        .find(|p| bindable(*p) && bindable(p + 1))
        .expect("two free ports for etcd");
    let api = (0..400)
        .map(|i| etcd + 3 + i * 5)
        .find(|p| bindable(*p))
        .expect("a free port for the API server");
    (etcd, api)
}

/// Ends the processes the pid files under `state/run` name, if they run the state's own
/// binaries (never the stranger of the test below).
fn stop_own_servers(state: &Path) {
    for name in ["kube-apiserver", "etcd"] {
        let Ok(pid) = std::fs::read_to_string(state.join(format!("run/{name}.pid"))) else {
            continue;
        };
        let pid = pid.trim();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if !exe.starts_with(state.join("bin")) {
            continue;
        }
        // kube-apiserver can sit out SIGTERM without its etcd: as the workplace's `down`, wait
        // a while, then kill.
        let _ = Command::new("kill").arg(pid).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// The CI failure of stop 20: the API server's state dir outlived the processes it names, and
/// one of their pids had since gone to another process, so the workplace's `up` took etcd for
/// running and started kube-apiserver against nothing. `scripts/k8s-up` starts a fresh pair
/// then, and leaves the process that now has the pid alone.
#[test]
fn k8s_up_starts_a_server_when_its_pid_files_name_other_processes() {
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stranger = Fake::start(dir.path(), "stranger");
    std::fs::create_dir_all(state.path().join("run")).unwrap();
    for name in ["etcd", "kube-apiserver"] {
        std::fs::write(
            state.path().join(format!("run/{name}.pid")),
            format!("{}\n", stranger.pid()),
        )
        .unwrap();
    }
    let (etcd, api) = free_ports();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{root}/scripts/k8s-up"))
        .arg(state.path())
        .env("K8S_API_PORT", api.to_string())
        .env("K8S_ETCD_PORT", etcd.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let kubeconfig = state.path().join("kubeconfig");
    let ready = Command::new("kubectl")
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["get", "--raw", "/readyz"])
        .output();
    let alive = stranger.alive();
    stop_own_servers(state.path());
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        kubeconfig.to_str(),
        "prints the kubeconfig path last"
    );
    let ready = ready.unwrap();
    assert!(
        ready.status.success() && String::from_utf8_lossy(&ready.stdout).trim() == "ok",
        "the API server answers: {}",
        String::from_utf8_lossy(&ready.stderr)
    );
    assert!(alive, "the process that has the old pid is left alone");
}
