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
        Fake(Command::new(&exe).arg("300").spawn().unwrap())
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
