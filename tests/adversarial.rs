//! The adversarial input suite (issue 8): hostile manifests, files and payload output fed to
//! the real operator binary in standalone mode, locally and against the real Slurm test
//! cluster. Every case checks that the operator stays up and bounded, that a valid neighbour
//! still succeeds, that no canary file appears, that errors name the field and echo no secret.

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "TOPSECRET-hunter2";

/// Runs `standalone --once` on `dir`, killing it (and failing) after `limit`. Returns the exit
/// code, the operator's peak RSS in bytes, and its stderr. The child is reaped with `wait4`
/// (for its resource usage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_bounded(dir: &Path, limit: Duration) -> (i32, u64, String) {
    let err_path = dir.with_extension("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let child = Command::new(BIN)
        .args(["standalone", "--once", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == pid {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            };
            return (code, usage.ru_maxrss as u64 * 1024, stderr);
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!(
                "the operator did not finish within {limit:?}: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file the operator wrote under `.status`, with its text.
fn status_texts(dir: &Path) -> Vec<(PathBuf, String)> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push((
                    path.clone(),
                    std::fs::read_to_string(&path).unwrap_or_default(),
                ));
            }
        }
    }
    let mut out = vec![];
    walk(&dir.join(".status"), &mut out);
    out
}

fn spec_asset(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn message(dir: &Path, name: &str) -> String {
    let s = status(dir, name);
    assert_eq!(s["phase"], "Failed", "{name}: {s:#}");
    s["message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn hostile_manifests_and_files_in_local_mode() {
    let top = tempfile::tempdir().unwrap();
    let d = &top.path().join("watched");
    let outside = top.path().join("outside");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    let canary = top.path().join("CANARY");
    let c = canary.display().to_string();
    // A secret outside the directory, shaped like YAML so that it parses.
    std::fs::write(
        outside.join("secret.yaml"),
        format!("{SECRET}: yes\napi_token: {SECRET}\n"),
    )
    .unwrap();
    std::fs::write(outside.join("secret.sh"), format!("echo {SECRET}\n")).unwrap();

    // The valid neighbour, and a valid asset with the longest name a manifest may have.
    write(d, "good.yaml", &asset("good", "echo fine"));
    let long = format!("l{}", "o".repeat(251));
    write(d, "long.yaml", &asset(&long, "echo long"));
    // Shell metacharacters everywhere a string reaches the job: nothing may run.
    write(
        d,
        "meta.yaml",
        &spec_asset(
            "meta",
            &format!(
                "  assetKey: test/meta\n  payload:\n    inline: 'printf \"%s|\" \"$@\"; echo \"$EVIL\"'\n    args: ['$(touch {c})', '`touch {c}`', '; touch {c}', \"'; touch {c}; '\", '--help', '\\n']\n  env: [{{name: EVIL, value: '$(touch {c})'}}]\n  extras: {{x: '$(touch {c})'}}\n"
            ),
        ),
    );
    // Special and oversized files named like manifests.
    mkfifo(&d.join("fifo.yaml"));
    symlink("/dev/zero", d.join("zero.yaml")).unwrap();
    symlink(outside.join("secret.yaml"), d.join("secret.yaml")).unwrap();
    std::fs::write(d.join("big.yaml"), "# x\n".repeat(600_000)).unwrap();
    std::fs::write(d.join("binary.yaml"), [0xff, 0xfe, 0x00, 0x80, b'\n']).unwrap();
    let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 0..9 {
        let prev = (b'a' + i) as char;
        let next = (b'a' + i + 1) as char;
        bomb.push_str(&format!("{next}: &{next} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    write(d, "bomb.yaml", &bomb);
    write(
        d,
        "deep.yaml",
        &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
    );
    write(
        d,
        "nul.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {name: nul}\nspec: {assetKey: a, payload: {inline: \"a\\0b\"}}\n",
    );

    // Payload paths that leave the directory or are not plain files.
    write(
        d,
        "up.yaml",
        &spec_asset(
            "up",
            "  assetKey: t/up\n  payload: {path: ../outside/secret.sh}\n",
        ),
    );
    write(
        d,
        "abs.yaml",
        &spec_asset(
            "abs",
            &format!(
                "  assetKey: t/abs\n  payload: {{path: {}}}\n",
                outside.join("secret.sh").display()
            ),
        ),
    );
    symlink(outside.join("secret.sh"), d.join("sub/link.sh")).unwrap();
    write(
        d,
        "link.yaml",
        &spec_asset(
            "link",
            "  assetKey: t/link\n  payload: {path: sub/link.sh}\n",
        ),
    );
    mkfifo(&d.join("pipe.sh"));
    write(
        d,
        "pipe.yaml",
        &spec_asset("pipe", "  assetKey: t/pipe\n  payload: {path: pipe.sh}\n"),
    );
    std::fs::write(d.join("huge.sh"), vec![b'#'; 9 << 20]).unwrap();
    write(
        d,
        "huge.yaml",
        &spec_asset("huge", "  assetKey: t/huge\n  payload: {path: huge.sh}\n"),
    );
    // Sizes and counts.
    let big_value = "v".repeat(200 << 10);
    write(
        d,
        "bigenv.yaml",
        &spec_asset(
            "bigenv",
            &format!(
                "  assetKey: t/e\n  payload: {{inline: 'true'}}\n  env: [{{name: BIG, value: {big_value}}}]\n"
            ),
        ),
    );
    write(
        d,
        "bigarg.yaml",
        &spec_asset(
            "bigarg",
            &format!("  assetKey: t/a\n  payload: {{inline: 'true', args: [{big_value}]}}\n"),
        ),
    );
    write(
        d,
        "bigkey.yaml",
        &spec_asset(
            "bigkey",
            &format!(
                "  assetKey: {}\n  payload: {{inline: 'true'}}\n",
                "k".repeat(600 << 10)
            ),
        ),
    );
    for (name, res) in [
        ("cpu0", "cpusPerTask: 0"),
        ("nodes0", "nodes: 0"),
        ("tasks0", "ntasks: 0"),
        ("cpubig", "cpusPerTask: 1000000000"),
    ] {
        write(
            d,
            &format!("{name}.yaml"),
            &spec_asset(
                name,
                &format!(
                    "  assetKey: t/{name}\n  payload: {{inline: 'true'}}\n  resources: {{{res}}}\n"
                ),
            ),
        );
    }
    write(
        d,
        "cpuhost.yaml",
        &spec_asset(
            "cpuhost",
            "  assetKey: t/h\n  payload: {inline: 'true'}\n  resources: {cpusPerTask: 4096}\n",
        ),
    );
    write(
        d,
        "sbatch.yaml",
        &spec_asset(
            "sbatch",
            "  assetKey: t/s\n  payload: {inline: 'true'}\n  resources: {extraSbatchArgs: ['--outp=/tmp/x']}\n",
        ),
    );
    // Clusters that would run commands on the operator's host, or are malformed.
    let clusters = [
        (
            "proxy",
            format!(
                "ssh: {{host: 127.0.0.1, user: u, keyPath: /nonexistent, extraOptions: {{ProxyCommand: 'touch {c}'}}}}"
            ),
        ),
        (
            "localcmd",
            format!(
                "ssh: {{host: 127.0.0.1, user: u, keyPath: /nonexistent, extraOptions: {{PermitLocalCommand: 'yes', LocalCommand: 'touch {c}'}}}}"
            ),
        ),
        (
            "knownhostscmd",
            format!(
                "ssh: {{host: 127.0.0.1, user: u, keyPath: /nonexistent, extraOptions: {{knownhostscommand: 'touch {c}'}}}}"
            ),
        ),
        (
            "port0",
            "ssh: {host: 127.0.0.1, port: 0, user: u, keyPath: /nonexistent}".to_string(),
        ),
        (
            "tilde",
            "remoteBase: '~other/x'\n  ssh: {host: 127.0.0.1, user: u, keyPath: /nonexistent}"
                .to_string(),
        ),
    ];
    for (name, spec) in &clusters {
        write(
            d,
            &format!("c-{name}.yaml"),
            &format!(
                "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {{name: {name}}}\nspec:\n  mode: slurm\n  {spec}\n---\n{}",
                spec_asset(
                    &format!("on-{name}"),
                    &format!(
                        "  assetKey: t/{name}\n  clusterRef: {name}\n  payload: {{inline: 'true'}}\n"
                    )
                )
            ),
        );
    }
    write(
        d,
        "fastpoll.yaml",
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: fast}\nspec: {mode: local, pollInterval: 1ms}\n",
    );

    let (code, rss, stderr) = run_bounded(d, Duration::from_secs(90));
    assert_eq!(code, 1, "invalid manifests make --once exit 1: {stderr}");
    assert!(rss < 300 << 20, "the operator's peak RSS was {rss} bytes");

    for name in ["good", long.as_str(), "meta"] {
        assert_eq!(
            status(d, name)["phase"],
            "Succeeded",
            "{name}: {:#}",
            status(d, name)
        );
    }
    let meta = status(d, "meta");
    assert_eq!(
        meta["logTail"]["stdout"],
        format!("$(touch {c})|`touch {c}`|; touch {c}|'; touch {c}; '|--help|\\n|$(touch {c})\n")
    );
    assert!(!canary.exists(), "a canary file appeared");

    // Each invalid asset names its field.
    for (name, field) in [
        ("up", "spec.payload.path"),
        ("abs", "spec.payload.path"),
        ("link", "spec.payload.path"),
        ("pipe", "spec.payload.path"),
        ("huge", "spec.payload.path"),
        ("bigenv", "spec.env[0].value"),
        ("bigarg", "spec.payload.args[0]"),
        ("bigkey", "spec.assetKey"),
        ("cpu0", "spec.resources.cpusPerTask"),
        ("nodes0", "spec.resources.nodes"),
        ("tasks0", "spec.resources.ntasks"),
        ("cpubig", "spec.resources.cpusPerTask"),
        ("cpuhost", "spec.resources.cpusPerTask"),
        ("sbatch", "spec.resources.extraSbatchArgs[0]"),
        ("on-proxy", "spec.ssh.extraOptions.ProxyCommand"),
        ("on-localcmd", "spec.ssh.extraOptions.LocalCommand"),
        (
            "on-knownhostscmd",
            "spec.ssh.extraOptions.knownhostscommand",
        ),
        ("on-port0", "spec.ssh.port"),
        ("on-tilde", "spec.remoteBase"),
    ] {
        let m = message(d, name);
        assert!(m.contains(field), "{name}: {m}");
    }
    assert!(message(d, "up").contains("outside"), "{}", message(d, "up"));
    assert!(message(d, "link").contains("outside"));
    assert!(message(d, "pipe").contains("not a regular file"));
    assert!(message(d, "huge").contains("larger than the limit"));
    assert!(message(d, "sbatch").contains("abbreviates --output"));

    // Files that are not manifests are listed by name, never quoted.
    let errors: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(d.join(".status/errors.yaml")).unwrap())
            .unwrap();
    let listed: Vec<String> = errors["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    for file in [
        "fifo.yaml",
        "zero.yaml",
        "secret.yaml",
        "big.yaml",
        "binary.yaml",
        "bomb.yaml",
        "deep.yaml",
    ] {
        assert!(
            listed.iter().any(|m| m.contains(file)),
            "{file} is not reported: {listed:#?}"
        );
    }
    let fast = std::fs::read_to_string(d.join(".status/default/SlurmCluster/fast.yaml")).unwrap();
    assert!(
        fast.contains("spec.pollInterval: must be at least 100ms"),
        "{fast}"
    );
    assert!(message(d, "nul").contains("NUL"));

    // No secret anywhere, every status bounded and private (the directory is 0700).
    for (path, text) in status_texts(d) {
        assert!(
            !text.contains(SECRET),
            "{} echoes the secret",
            path.display()
        );
        assert!(
            text.len() < 64 << 10,
            "{} is {} bytes",
            path.display(),
            text.len()
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
    }
    assert!(!stderr.contains(SECRET), "the log echoes the secret");
}

#[test]
fn pipes_floods_stay_bounded_and_later_messages_still_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("flood.py"),
        r#"import json, os
path = os.path.join(os.environ["SAO_RUN_DIR"], "pipes_messages.jsonl")
def mat(key, blob):
    return json.dumps({"__dagster_pipes_version": "0.1", "method": "report_asset_materialization",
        "params": {"asset_key": key, "data_version": None,
                   "metadata": {"blob": {"raw_value": blob, "type": "text"}}}}) + "\n"
with open(path, "a") as f:
    f.write(json.dumps({"method": "opened", "params": {}}) + "\n")
    for i in range(100):
        f.write(mat("big%d" % i, "x" * (1 << 20)))
    for i in range(300):
        f.write(mat("mid%d" % i, "y" * 10000))
    f.write("z" * (50 << 20))
    f.write("\n")
    f.write(mat("final", "done"))
    f.write(json.dumps({"method": "closed", "params": {}}) + "\n")
print("flooded")
"#,
    )
    .unwrap();
    write(
        d,
        "flood.yaml",
        &spec_asset(
            "flood",
            "  assetKey: t/flood\n  payload: {path: flood.py}\n",
        ),
    );
    write(d, "good.yaml", &asset("good", "echo fine"));
    let (code, rss, stderr) = run_bounded(d, Duration::from_secs(120));
    assert_eq!(code, 0, "{stderr}");
    assert!(rss < 300 << 20, "the operator's peak RSS was {rss} bytes");
    let s = status(d, "flood");
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
    let pipes = &s["pipes"];
    assert_eq!(
        pipes["closed"], true,
        "messages after the oversized line are read"
    );
    let mats = pipes["materializations"].as_array().unwrap();
    assert_eq!(mats.last().unwrap()["assetKey"], "final");
    assert!(
        pipes["droppedMessages"].as_u64().unwrap() >= 101,
        "{pipes:#}"
    );
    let size = std::fs::metadata(status_file(d, "flood")).unwrap().len();
    assert!(size < 256 << 10, "status file of {size} bytes");
    assert_eq!(status(d, "good")["phase"], "Succeeded");
}

#[test]
fn local_job_processes_end_with_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pids = d.join("pids");
    write(
        d,
        "bg.yaml",
        &asset(
            "bg",
            &format!(
                "sleep 300 &\necho $! >> {p}\nsetsid sleep 301 &\necho $! >> {p}\n( sleep 302 & echo $! >> {p} ) \necho started",
                p = pids.display()
            ),
        ),
    );
    let (code, _, stderr) = run_bounded(d, Duration::from_secs(60));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(d, "bg")["phase"], "Succeeded");
    let listed: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in listed {
        assert!(!pid_alive(p), "process {p} outlived its job");
    }
}

#[test]
fn cancelling_never_signals_a_process_group_of_another_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The victim: an unrelated process leading its own group.
    let mut victim = Command::new("setsid")
        .args(["sleep", "300"])
        .spawn()
        .unwrap();
    let vpid = victim.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    write(d, "a.yaml", &asset("a", "sleep 300"));
    let mut op = Operator::start(d);
    let obj = wait_for(d, "a", "running", |o| phase(o) == "Running");
    op.sigkill();
    // While the operator is down the run's processes die, and its IDs come to point at the
    // victim (as after PID reuse, or in a tampered status file).
    let run_dir = PathBuf::from(obj["status"]["remoteRunDir"].as_str().unwrap());
    let job: i32 = obj["status"]["jobId"].as_str().unwrap().parse().unwrap();
    unsafe { libc::kill(-job, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let started = std::fs::read_to_string(run_dir.join("started")).unwrap();
    std::fs::write(
        run_dir.join("started"),
        started.replace(&format!("pid={job}"), &format!("pid={vpid}")),
    )
    .unwrap();
    let text = std::fs::read_to_string(status_file(d, "a")).unwrap();
    std::fs::write(
        status_file(d, "a"),
        text.replace(&format!("jobId: '{job}'"), &format!("jobId: '{vpid}'"))
            .replace(&format!("jobId: \"{job}\""), &format!("jobId: \"{vpid}\"")),
    )
    .unwrap();
    std::fs::remove_file(d.join("a.yaml")).unwrap();
    let _op = Operator::start(d);
    let obj = wait_for(d, "a", "ended", |o| {
        o["metadata"]["deletionTimestamp"].is_string() || phase(o) == "Failed"
    });
    std::thread::sleep(Duration::from_millis(500));
    let alive = pid_alive(vpid);
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(alive, "the unrelated process group was signalled: {obj:#}");
}

// ---- Slurm mode, against the real test cluster (`common::slurm_dir`) -----------------------

#[test]
fn one_dead_cluster_delays_no_one_else() {
    let (dir, c) = slurm_dir("deadcluster");
    let d = dir.path();
    // A "cluster" whose SSH server accepts connections and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _silent = std::thread::spawn(move || {
        let mut held = vec![];
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    write(
        d,
        "dead.yaml",
        &format!(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {{name: dead}}\nspec:\n  mode: slurm\n  pollInterval: 1s\n  ssh: {{host: 127.0.0.1, port: {port}, user: {}, keyPath: {}, knownHosts: {{path: {}}}, connectTimeout: 60s}}\n",
            c.user, c.key, c.known_hosts
        ),
    );
    write(
        d,
        "stuck.yaml",
        &asset("stuck", "echo never").replace("  payload:", "  clusterRef: dead\n  payload:"),
    );
    let started = Instant::now();
    let _op = Operator::start(d);
    // Let the operator start on the dead cluster before the others arrive.
    std::thread::sleep(Duration::from_secs(1));
    write(d, "local.yaml", &asset("local", "echo here"));
    write(d, "remote.yaml", &slurm_asset("remote", "echo there", ""));
    wait_for(d, "local", "local asset done", |o| phase(o) == "Succeeded");
    let local_done = started.elapsed();
    wait_for(d, "remote", "Slurm asset done", |o| phase(o) == "Succeeded");
    let remote_done = started.elapsed();
    assert!(
        local_done < Duration::from_secs(15),
        "the local asset took {local_done:?} beside a dead cluster"
    );
    assert!(
        remote_done < Duration::from_secs(45),
        "the healthy cluster's asset took {remote_done:?}"
    );
    let stuck = status(d, "stuck");
    assert_eq!(stuck["phase"], "Submitting", "{stuck:#}");
}

#[test]
fn sbatch_options_and_scheduler_answers() {
    let (dir, _) = slurm_dir("sbatchopts");
    let d = dir.path();
    // Abbreviations of the operator's own options never reach sbatch.
    for (i, arg) in [
        "--comm=forged",
        "--job-n=x",
        "--outp=/tmp/x",
        "--chd=/",
        "--hol",
        "--arr=1-2",
    ]
    .iter()
    .enumerate()
    {
        write(
            d,
            &format!("r{i}.yaml"),
            &slurm_asset(
                &format!("r{i}"),
                "echo no",
                &format!("  resources: {{extraSbatchArgs: ['{arg}']}}\n"),
            ),
        );
    }
    // sbatch warns about this request ("setting nnodes to 1"): the warning is not the answer.
    write(
        d,
        "warn.yaml",
        &slurm_asset(
            "warn",
            "echo warned",
            "  resources: {nodes: 2, ntasks: 1}\n",
        ),
    );
    // A job that cannot start for an hour shows why it waits.
    write(
        d,
        "later.yaml",
        &slurm_asset(
            "later",
            "echo later",
            "  resources: {extraSbatchArgs: ['--begin=now+1hour']}\n",
        ),
    );
    let _op = Operator::start(d);
    let warn = wait_for(d, "warn", "succeeded", terminal);
    assert_eq!(warn["status"]["phase"], "Succeeded", "{warn:#}");
    assert_ne!(
        warn["status"]["reason"], "Adopted",
        "the first answer was misread: {warn:#}"
    );
    let later = wait_for(d, "later", "pending reason", |o| {
        o["status"]["reason"] == "BeginTime"
    });
    assert_eq!(phase(&later), "Queued");
    assert!(
        later["status"]["message"]
            .as_str()
            .unwrap()
            .contains("BeginTime")
    );
    for i in 0..6 {
        let m = message(d, &format!("r{i}"));
        assert!(m.contains("spec.resources.extraSbatchArgs[0]"), "{m}");
    }
    std::fs::remove_file(d.join("later.yaml")).unwrap();
    wait_for(d, "later", "cancelled", |o| phase(o) == "Cancelled");
}

#[test]
fn a_bad_job_id_in_one_status_does_not_fail_its_neighbours() {
    let (dir, _) = slurm_dir("badjobid");
    let d = dir.path();
    write(
        d,
        "good.yaml",
        &slurm_asset("good", "sleep 8; echo good", ""),
    );
    write(d, "bad.yaml", &slurm_asset("bad", "sleep 8; echo bad", ""));
    let mut op = Operator::start(d);
    wait_for(d, "good", "running", |o| phase(o) == "Running");
    let bad = wait_for(d, "bad", "running", |o| phase(o) == "Running");
    op.sigkill();
    let job = bad["status"]["jobId"].as_str().unwrap().to_string();
    let text = std::fs::read_to_string(status_file(d, "bad")).unwrap();
    let tampered = text
        .replace(&format!("jobId: '{job}'"), "jobId: abc")
        .replace(&format!("jobId: \"{job}\""), "jobId: abc");
    assert_ne!(text, tampered);
    std::fs::write(status_file(d, "bad"), tampered).unwrap();
    let _op = Operator::start(d);
    let good = wait_for(d, "good", "ended", terminal);
    assert_eq!(good["status"]["phase"], "Succeeded", "{good:#}");
    assert_eq!(good["status"]["attempts"], 1);
    let uid = good["metadata"]["uid"].as_str().unwrap();
    assert_eq!(sacct_jobs(&format!("sao.{uid}.")).len(), 1);
}

#[test]
fn hostile_values_over_slurm_stay_inert_and_pipes_floods_are_read_past() {
    let (dir, c) = slurm_dir("hostileslurm");
    let d = dir.path();
    let canary = format!("/home/{}/sao-canary-{}", c.user, std::process::id());
    let local_canary = format!("/tmp/sao-canary-{}", std::process::id());
    // Option values travel as single arguments: sbatch sees a literal string.
    write(
        d,
        "mail.yaml",
        &slurm_asset(
            "mail",
            "echo \"$1\"",
            &format!(
                "  resources: {{extraSbatchArgs: ['--mail-user=$(touch {canary})']}}\n  env: [{{name: X, value: '`touch {canary}`'}}]\n"
            ),
        )
        .replace(
            "    inline: |",
            &format!("    args: ['$(touch {canary}); touch {local_canary}']\n    inline: |"),
        ),
    );
    // Over 1 MiB without a newline, then the messages that matter: they must still arrive.
    write(
        d,
        "flood.yaml",
        &slurm_asset(
            "flood",
            "f=\"$SAO_RUN_DIR/pipes_messages.jsonl\"\nhead -c 3000000 /dev/zero | tr '\\0' x >> \"$f\"\necho >> \"$f\"\necho '{\"method\": \"report_asset_materialization\", \"params\": {\"asset_key\": \"after\", \"metadata\": {}}}' >> \"$f\"\necho '{\"method\": \"closed\", \"params\": {}}' >> \"$f\"",
            "",
        ),
    );
    let _op = Operator::start(d);
    let mail = wait_for(d, "mail", "ended", terminal);
    assert_eq!(phase(&mail), "Succeeded", "{mail:#}");
    assert_eq!(
        mail["status"]["logTail"]["stdout"],
        format!("$(touch {canary}); touch {local_canary}\n")
    );
    let flood = wait_for(d, "flood", "ended", terminal);
    assert_eq!(phase(&flood), "Succeeded", "{flood:#}");
    let pipes = &flood["status"]["pipes"];
    assert_eq!(pipes["closed"], true, "{pipes:#}");
    assert_eq!(pipes["materializations"][0]["assetKey"], "after");
    assert_eq!(pipes["droppedMessages"], 1);
    assert!(
        !Path::new(&canary).exists(),
        "a canary appeared on the cluster"
    );
    assert!(
        !Path::new(&local_canary).exists(),
        "a canary appeared locally"
    );
}

#[test]
fn local_payloads_never_see_the_operators_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "env.yaml",
        &asset(
            "env",
            "env | grep -E '^(SLURM_EDGE|KUBERNETES|PATH=|DAGSTER_PIPES_CONTEXT=)' | cut -c1-80",
        ),
    );
    let out = Command::new(BIN)
        .args(["standalone", "--once", "--dir"])
        .arg(d)
        // A password handed to the operator for a cluster's `passwordEnv`, and what a pod has.
        .env("SLURM_EDGE_NODE_PASSWORD", SECRET)
        .env("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status(d, "env");
    let seen = s["logTail"]["stdout"].as_str().unwrap();
    assert!(
        !seen.contains(SECRET),
        "the payload saw the operator's password: {seen}"
    );
    assert!(!seen.contains("KUBERNETES_SERVICE_HOST"), "{seen}");
    assert!(
        seen.contains("PATH=") && seen.contains("DAGSTER_PIPES_CONTEXT="),
        "{seen}"
    );
}
