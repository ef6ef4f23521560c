//! Local execution: the job script runs as a process on the operator's host.
//!
//! Each attempt is started through a small supervisor (`slurm-asset-operator local-supervise`,
//! the local stand-in for `slurmstepd`) in its own process group, so that it outlives an
//! operator crash. The supervisor holds an exclusive lock on `<run dir>/.lock` for its whole
//! life and creates `started` exactly once, so an attempt can never run twice: a restarted
//! operator adopts a live attempt (lock held), learns a finished one's outcome from the exit
//! file, and only submits when neither exists. It also records CPU time and max RSS from
//! `wait4`, which the job script cannot measure for itself.

use super::{JobRef, Submitted, efficiency, log_tail};
use crate::core::{JobState, Observation};
use crate::jobscript::{EXIT_FILE, JOB_SCRIPT, RunPlan, STDERR_FILE, STDOUT_FILE, render_script};
use crate::pipes::{CONTEXT_FILE, MESSAGES_FILE, MessageReader, plan_context_data};
use crate::{Error, Result};
use jiff::Timestamp;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOCK_FILE: &str = ".lock";
const STARTED_FILE: &str = "started";
const CANCELLED_FILE: &str = "cancelled";
const USAGE_FILE: &str = "usage.json";
/// The attempt's tag: a run dir holding another tag belongs to an earlier object of the same
/// name (deleted and re-created), never to this attempt.
const TAG_FILE: &str = "tag";

/// Runs attempts as local processes.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    /// The operator binary, re-executed as the supervisor.
    pub exe: PathBuf,
    /// How long a cancelled process group gets between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Paths the job must not see (the operator's credentials in Kubernetes mode): the job
    /// runs in user and mount namespaces of its own with empty filesystems over them.
    pub hide: Vec<PathBuf>,
}

/// What the run directory says about an attempt.
#[derive(Clone, Debug, PartialEq)]
enum Local {
    NotStarted,
    /// Started (or starting) and alive; the supervisor's pid if known.
    Alive(Option<i32>),
    /// The exit file exists and the supervisor is gone.
    Finished(ExitRecord),
    /// Started, but every process is gone and there is no exit file.
    Vanished,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
struct ExitRecord {
    exit_code: i32,
    start: Option<i64>,
    end: Option<i64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Usage {
    wall_seconds: f64,
    cpu_seconds: f64,
    max_rss_bytes: u64,
}

impl LocalExecutor {
    pub fn new(exe: PathBuf) -> Self {
        LocalExecutor {
            exe,
            kill_grace: Duration::from_secs(5),
            hide: vec![],
        }
    }

    /// Adopts the attempt if its run dir shows it was started, else starts it.
    pub async fn submit(&self, plan: &RunPlan) -> Result<Submitted> {
        let dir = PathBuf::from(&plan.run_dir);
        let tag = plan.id.tag();
        if fs::read_to_string(dir.join(TAG_FILE)).is_ok_and(|t| t != tag) {
            fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&dir, e))?;
        match inspect(&dir) {
            Local::NotStarted => {}
            Local::Alive(pid) => {
                let pid = match pid {
                    Some(p) => Some(p),
                    None => wait_for_pid(&dir).await,
                };
                return Ok(self.adopted(plan, pid));
            }
            Local::Finished(_) | Local::Vanished | Local::Cancelled => {
                return Ok(self.adopted(plan, read_started(&dir)));
            }
        }
        for f in &plan.required_files {
            if !std::path::Path::new(f).is_file() {
                return Err(Error::Executor(format!(
                    "the payload {} is not there (skipPayloadUpload: nothing was uploaded)",
                    crate::limits::truncate(f, 512)
                )));
            }
        }
        if let Some(key) = &plan.env_key {
            write_file(
                &dir.join(crate::environment::RUN_ENV_FILE),
                format!("{key}\n").as_bytes(),
                0o600,
            )?;
        }
        write_file(&dir.join(TAG_FILE), tag.as_bytes(), 0o600)?;
        write_file(&dir.join(JOB_SCRIPT), render_script(plan).as_bytes(), 0o700)?;
        if let Some((name, content)) = &plan.payload_file {
            write_file(&dir.join(name), content, 0o600)?;
        }
        let ctx = plan_context_data(plan);
        write_file(&dir.join(CONTEXT_FILE), ctx.to_string().as_bytes(), 0o600)?;
        let mut command = tokio::process::Command::new(&self.exe);
        command.arg("local-supervise").arg("--run-dir").arg(&dir);
        for path in &self.hide {
            command.arg("--hide").arg(path);
        }
        let child = command
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::Executor(format!("starting the local supervisor: {e}")))?;
        // The child is reaped by tokio in the background; it must outlive us, so no kill-on-drop.
        let pid = child.id().map(|p| p as i32);
        Ok(Submitted {
            job_id: pid.map(|p| p.to_string()).unwrap_or_default(),
            run_dir: plan.run_dir.clone(),
            adopted: false,
        })
    }

    fn adopted(&self, plan: &RunPlan, pid: Option<i32>) -> Submitted {
        Submitted {
            job_id: pid.map(|p| p.to_string()).unwrap_or_default(),
            run_dir: plan.run_dir.clone(),
            adopted: true,
        }
    }

    /// Observes one attempt; `reader` carries the Pipes read offset between polls.
    pub fn observe(&self, job: &JobRef, reader: &mut MessageReader) -> Observation {
        let dir = Path::new(&job.run_dir);
        // State first, messages second: an ended job has written all of its messages.
        let mut state = inspect(dir);
        let drained = read_messages(&dir.join(MESSAGES_FILE), reader);
        if !drained && matches!(state, Local::Finished(_)) {
            // More messages than one observation reads: report the end once they are in.
            state = Local::Alive(read_started(dir));
        }
        let started_at = started_time(dir);
        let mut obs = match &state {
            Local::NotStarted => match job.job_id.as_deref().and_then(|j| j.parse().ok()) {
                Some(pid) if group_of_run(pid, dir).alive() => Observation::of(JobState::Queued),
                _ => {
                    let mut o = Observation::of(JobState::Infrastructure {
                        reason: "Lost".into(),
                    });
                    o.message = Some("the local supervisor ended before starting the job".into());
                    o
                }
            },
            Local::Alive(_) => Observation::of(JobState::Running),
            Local::Cancelled => Observation::of(JobState::Cancelled { by: None }),
            Local::Vanished => {
                let mut o = Observation::of(JobState::Infrastructure {
                    reason: "Lost".into(),
                });
                o.message = Some("the job's processes ended without writing its exit file".into());
                o
            }
            Local::Finished(rec) => {
                let mut o = Observation::of(JobState::Exited {
                    exit_code: rec.exit_code,
                });
                o.end_time = rec.end.and_then(|e| Timestamp::from_second(e).ok());
                o.metrics = Some(self.metrics(dir, rec, &job.resources));
                o
            }
        };
        obs.slurm_state = Some(
            match &state {
                Local::NotStarted => "PENDING",
                Local::Alive(_) => "RUNNING",
                Local::Cancelled => "CANCELLED",
                Local::Vanished => "LOST",
                Local::Finished(r) if r.exit_code == 0 => "COMPLETED",
                Local::Finished(_) => "FAILED",
            }
            .to_string(),
        );
        obs.start_time = started_at;
        if !matches!(state, Local::NotStarted) {
            obs.nodes = vec![hostname()];
            obs.log_tail = Some(log_tail(&dir.join(STDOUT_FILE), &dir.join(STDERR_FILE)));
            obs.pipes = Some(reader.status.clone());
            obs.launcher = read_bounded(&dir.join(crate::launcher::LAUNCHER_FILE))
                .and_then(|b| crate::launcher::parse_facts(&b));
        }
        obs
    }

    fn metrics(
        &self,
        dir: &Path,
        rec: &ExitRecord,
        r: &crate::api::Resources,
    ) -> crate::api::Metrics {
        let usage: Option<Usage> = fs::read(dir.join(USAGE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let elapsed = usage.as_ref().map(|u| u.wall_seconds).unwrap_or_else(|| {
            rec.end
                .zip(rec.start)
                .map(|(e, s)| (e - s) as f64)
                .unwrap_or(0.0)
        });
        let cpus = r.cpus_per_task.unwrap_or(1) * r.ntasks.unwrap_or(1);
        let mem = r.requested_memory();
        efficiency(
            elapsed,
            usage.as_ref().map(|u| u.cpu_seconds),
            usage.as_ref().map(|u| u.max_rss_bytes),
            cpus,
            1,
            r.gpus_per_node.unwrap_or(0),
            mem,
        )
    }

    /// Stops an attempt: marks it cancelled (so a supervisor that has not started yet never
    /// runs it), then SIGTERM to its process group, SIGKILL after the grace period.
    pub async fn cancel(&self, job_id: Option<&str>, run_dir: Option<&str>) -> Result<String> {
        let dir = run_dir.map(PathBuf::from);
        if let Some(dir) = &dir
            && dir.is_dir()
        {
            write_file(&dir.join(CANCELLED_FILE), b"", 0o600)?;
        }
        let state = dir.as_deref().map(inspect);
        // The run dir's own record names the group; an ID from a status file is only used
        // before that record exists, and any group is checked to be this run's first.
        let pid = dir
            .as_deref()
            .and_then(read_started)
            .or_else(|| job_id.and_then(|j| j.parse::<i32>().ok()));
        let Some(pid) = pid.filter(|p| *p > 1) else {
            return Ok("cancelled before the job started".into());
        };
        let Some(dir) = dir else {
            return Ok(format!(
                "process group {pid} not signalled: the run directory is unknown"
            ));
        };
        match group_of_run(pid, &dir) {
            Group::Foreign => {
                return Ok(format!(
                    "process group {pid} not signalled: it does not belong to this run (its supervisor is gone and the ID was reused)"
                ));
            }
            Group::Gone => return Ok(format!("process group {pid} had already ended")),
            Group::Ours | Group::Orphaned => {}
        }
        if matches!(state, Some(Local::Finished(_))) {
            return Ok(format!("process group {pid} had already ended"));
        }
        signal_group(pid, libc::SIGTERM);
        let deadline = Instant::now() + self.kill_grace;
        while group_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if group_alive(pid) {
            signal_group(pid, libc::SIGKILL);
            return Ok(format!(
                "process group {pid} killed (SIGKILL after {}s)",
                self.kill_grace.as_secs()
            ));
        }
        Ok(format!("process group {pid} terminated"))
    }

    /// Removes a finished attempt's run directory.
    pub fn cleanup(&self, run_dir: &str) -> Result<()> {
        match fs::remove_dir_all(run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(run_dir, e)),
        }
    }
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(content).map_err(|e| Error::io(path, e))
}

/// Messages read per observation, at most, in chunks of [`crate::limits::PIPES_CHUNK`].
const MESSAGES_PER_OBSERVATION: u64 = 64 << 20;

/// Reads the message file from the reader's offset in bounded chunks (a regular file only:
/// the payload could have replaced it by a FIFO or a link to a device). Returns whether the
/// end of the file was reached.
fn read_messages(path: &Path, reader: &mut MessageReader) -> bool {
    let Ok(mut f) = crate::files::open_regular(path) else {
        return true;
    };
    let chunk = crate::limits::PIPES_CHUNK;
    let mut budget = MESSAGES_PER_OBSERVATION;
    let mut buf = Vec::with_capacity(chunk as usize);
    while budget > 0 {
        if f.seek(SeekFrom::Start(reader.offset)).is_err() {
            return true;
        }
        buf.clear();
        if (&mut f).take(chunk).read_to_end(&mut buf).is_err() {
            return true;
        }
        let before = reader.offset;
        reader.feed(&buf);
        if (buf.len() as u64) < chunk {
            return true;
        }
        budget = budget.saturating_sub(chunk);
        if reader.offset == before {
            // Cannot happen (a full chunk is longer than the line limit); never loop on it.
            return false;
        }
    }
    false
}

/// Whether some process holds the run dir's lock (a live supervisor).
fn lock_held(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = f.unlock();
            false
        }
        Err(_) => true,
    }
}

fn read_started(dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(dir.join(STARTED_FILE)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok())
}

fn started_time(dir: &Path) -> Option<Timestamp> {
    let text = fs::read_to_string(dir.join(STARTED_FILE)).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("start="))
        .and_then(|p| p.trim().parse().ok())
        .and_then(|s| Timestamp::from_second(s).ok())
}

/// The start of a small file the job writes (never the whole of it: hostile).
fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![];
    fs::File::open(path)
        .ok()?
        .take(crate::launcher::LAUNCHER_FILE_MAX as u64)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let text = fs::read_to_string(dir.join(EXIT_FILE)).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    Some(ExitRecord {
        exit_code: field("exit_code=")? as i32,
        start: field("start="),
        end: field("end="),
    })
}

fn inspect(dir: &Path) -> Local {
    let held = lock_held(dir);
    let started = dir.join(STARTED_FILE).exists();
    let cancelled = dir.join(CANCELLED_FILE).exists();
    match read_exit(dir) {
        Some(rec) if !held => return Local::Finished(rec),
        Some(_) => return Local::Alive(read_started(dir)),
        None => {}
    }
    let pid = read_started(dir);
    if held || pid.is_some_and(|p| group_of_run(p, dir).alive()) {
        return Local::Alive(pid);
    }
    match (started, cancelled) {
        (_, true) => Local::Cancelled,
        (true, false) => Local::Vanished,
        (false, false) => Local::NotStarted,
    }
}

async fn wait_for_pid(dir: &Path) -> Option<i32> {
    for _ in 0..40 {
        if let Some(p) = read_started(dir) {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Whose process group `pgid` is, as far as a run is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// Led by this run's supervisor.
    Ours,
    /// The supervisor is gone but members remain: Linux never reuses a PID while a group of
    /// that ID exists, so the members are this run's.
    Orphaned,
    /// No process of that group is left.
    Gone,
    /// A process with that PID exists and is not this run's supervisor (PID reuse, or an ID
    /// from a tampered status file): never signal it.
    Foreign,
}

impl Group {
    fn alive(self) -> bool {
        matches!(self, Group::Ours | Group::Orphaned)
    }
}

/// Checks that process group `pgid` is the one this run's supervisor leads (its command line
/// is `local-supervise --run-dir <dir>`).
fn group_of_run(pgid: i32, dir: &Path) -> Group {
    if pgid <= 1 {
        return Group::Foreign;
    }
    match fs::read(format!("/proc/{pgid}/cmdline")) {
        Ok(cmdline) => {
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let wanted = dir.as_os_str().as_encoded_bytes();
            let ours = args
                .windows(3)
                .any(|w| w[0] == b"local-supervise" && w[1] == b"--run-dir" && w[2] == wanted);
            if ours || parent_of(pgid) == Some(std::process::id() as i32) {
                // Ours by its command line, or the supervisor this operator just started
                // (between fork and exec it still shows the operator's command line).
                Group::Ours
            } else if cmdline.is_empty() && group_alive(pgid) {
                // A zombie leader (already exited, not reaped): its group is still ours only
                // if the run dir says so; be safe.
                if read_started(dir) == Some(pgid) {
                    Group::Orphaned
                } else {
                    Group::Foreign
                }
            } else {
                Group::Foreign
            }
        }
        Err(_) if group_alive(pgid) => Group::Orphaned,
        Err(_) => Group::Gone,
    }
}

/// The parent PID of a process, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    pgid > 1 && unsafe { libc::kill(-pgid, 0) } == 0
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: plain syscall; pgid > 1 is checked by callers, so this never targets init or us.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The supervisor's body (`local-supervise --run-dir DIR`). Returns its exit code.
pub fn supervise(dir: &Path, hide: &[PathBuf]) -> i32 {
    let lock = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("local-supervise: {}: {e}", dir.display());
            return 2;
        }
    };
    if lock.try_lock().is_err() {
        return 0; // another supervisor owns this attempt
    }
    if dir.join(STARTED_FILE).exists() || dir.join(CANCELLED_FILE).exists() {
        return 0; // this attempt already ran, or was cancelled before it started
    }
    let pid = std::process::id();
    let start = Timestamp::now().as_second();
    let started = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join(STARTED_FILE))
        .and_then(|mut f| writeln!(f, "pid={pid}\nstart={start}"));
    if started.is_err() {
        return 0;
    }
    let open_log = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    let (Ok(out), Ok(err)) = (open_log(STDOUT_FILE), open_log(STDERR_FILE)) else {
        return 2;
    };
    // Orphans of the job (daemonised children) are re-parented to us, so that they can be
    // found and stopped when the job ends, as slurmstepd does.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's own attribute.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let t0 = Instant::now();
    // The job gets a plain environment, not the operator's: that holds credentials (a
    // `passwordEnv` or `totpEnv` variable, a pod's KUBERNETES_* service address) that no
    // payload may read. The job script sets the rest (Pipes bootstrap, the manifest's env).
    let inherited = std::env::vars().filter(|(k, _)| {
        matches!(
            k.as_str(),
            "PATH" | "HOME" | "USER" | "LOGNAME" | "SHELL" | "LANG" | "TZ" | "TMPDIR" | "TERM"
        ) || k.starts_with("LC_")
    });
    let mut command = std::process::Command::new("bash");
    command
        .arg(dir.join(JOB_SCRIPT))
        .current_dir(dir)
        .env_clear()
        .envs(inherited)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    if !hide.is_empty() {
        let hide = hide.to_vec();
        // SAFETY: runs in the forked child before exec; the supervisor is single-threaded, so
        // the allocations and file writes of `isolate` cannot deadlock.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || isolate(&hide));
        }
    }
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            // Say why in the job's own stderr, which the status's log tail shows.
            if let Ok(mut log) = open_log(STDERR_FILE) {
                let _ = writeln!(log, "slurm-asset-operator: the job could not start: {e}");
            }
            return 2;
        }
    };
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if rc < 0 {
        return 2;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let u = Usage {
        wall_seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_bytes: (usage.ru_maxrss as u64) * 1024,
    };
    let tmp = dir.join(format!("{USAGE_FILE}.tmp"));
    if fs::write(&tmp, serde_json::to_vec(&u).unwrap_or_default()).is_ok() {
        let _ = fs::rename(&tmp, dir.join(USAGE_FILE));
    }
    // Slurm ends a job's every process when its batch script exits: so does local mode.
    kill_leftovers();
    drop(lock);
    0
}

/// Puts the calling process into user and mount namespaces of its own (same uid and gid) and
/// covers each of `hide` that exists with an empty tmpfs, so that the job cannot read the
/// operator's credentials (its ServiceAccount token, its SSH key files).
fn isolate(hide: &[PathBuf]) -> std::io::Result<()> {
    use std::ffi::CString;
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let check = |rc: i32, what: &str| -> std::io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{what}: {e} (local execution in Kubernetes mode needs unprivileged user namespaces)"
                ),
            ))
        }
    };
    // SAFETY: plain syscalls on this (child) process.
    check(
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) },
        "unshare",
    )?;
    fs::write("/proc/self/setgroups", "deny")?;
    fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    let root = CString::new("/").expect("no NUL");
    // SAFETY: as above; null pointers are allowed for these arguments.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "making mounts private",
    )?;
    let tmpfs = CString::new("tmpfs").expect("no NUL");
    let options = CString::new("size=4k,mode=700").expect("no NUL");
    for path in hide.iter().filter(|p| p.exists()) {
        let target = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::other("a NUL in a hidden path"))?;
        check(
            unsafe {
                libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    options.as_ptr().cast(),
                )
            },
            &format!("hiding {}", path.display()),
        )?;
    }
    Ok(())
}

/// SIGKILLs every process left in the supervisor's group or re-parented to it, and reaps them.
fn kill_leftovers() {
    let me = std::process::id() as i32;
    for _ in 0..100 {
        let mut found = false;
        if let Ok(entries) = fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                // Fields after the command name: state ppid pgrp ...
                let rest: Vec<&str> = stat
                    .rsplit_once(") ")
                    .map(|(_, r)| r.split(' ').collect())
                    .unwrap_or_default();
                let (Some(state), Some(ppid), Some(pgrp)) =
                    (rest.first(), rest.get(1), rest.get(2))
                else {
                    continue;
                };
                let mine = pgrp.parse::<i32>() == Ok(me) || ppid.parse::<i32>() == Ok(me);
                if mine && *state != "Z" {
                    found = true;
                    // SAFETY: plain syscall on a process of our own group or one we reap.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        // SAFETY: reaping our own (re-parented) children; WNOHANG never blocks.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
