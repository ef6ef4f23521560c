//! The exit-file watcher of one Slurm cluster: one long-lived remote shell over the cluster's
//! multiplexed connection that checks the watched run dirs for their exit file four times a
//! second and reports each one as it appears. A job's end is thus known within a fraction
//! of a second without asking the scheduler; the batched `squeue`/`sacct` poll remains the
//! safety net for jobs that die without writing one (node failure, timeout, OOM kill,
//! `scancel`), and for a watcher the site killed.
//!
//! The watcher costs no scheduler RPC: it only `stat`s files. It runs only while some job is
//! watched; run dirs travel on its stdin (one per line), never in its command line.

use super::slurm::SlurmExecutor;
use crate::jobscript::EXIT_FILE;
use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The remote side. `+DIR` watches a run dir, `-DIR` stops watching it; `EXIT DIR` is
/// printed once DIR's exit file exists, `START DIR` once when a session's agent (its step
/// queue) or a session step (its step file) has started there: both are worth a look now. A line cut by the read timeout is kept and completed
/// by the next read. End of input (the operator or its connection went away) ends it.
fn remote_script() -> String {
    format!(
        r#"W=(); pending=''; declare -A S=()
sweep() {{ local i d; for i in "${{!W[@]}}"; do d=${{W[$i]}}
  if [ -f "$d/{EXIT_FILE}" ]; then printf 'EXIT %s\n' "$d"; unset 'W[i]'
  elif [ -z "${{S[$d]:-}}" ] && {{ [ -d "$d/{QUEUE}" ] || [ -f "$d/{STEP}" ]; }}; then S[$d]=1; printf 'START %s\n' "$d"; fi
done; }}
while :; do
  if IFS= read -r -t 0.25 line; then
    line="$pending$line"; pending=''
    case $line in
      +*) W+=("${{line#+}}") ;;
      -*) for i in "${{!W[@]}}"; do [ "${{W[$i]}}" = "${{line#-}}" ] && unset 'W[i]'; done ;;
    esac
  else
    [ $? -le 128 ] && exit 0
    pending="$pending$line"
  fi
  sweep
done
"#,
        QUEUE = crate::session::QUEUE_DIR,
        STEP = crate::session::STEP_FILE,
    )
}

/// What the watcher is told.
enum Command {
    Watch(String),
    Forget(String),
}

/// The handle of a cluster's watcher; dropping it ends the watcher.
pub struct ExitWatcher {
    tx: mpsc::UnboundedSender<Command>,
}

impl ExitWatcher {
    /// Starts the watcher; every run dir whose exit file appears is sent to `ended`. It holds
    /// the executor weakly (the executor holds it): it ends when the executor is dropped.
    pub fn spawn(executor: Weak<SlurmExecutor>, ended: mpsc::UnboundedSender<String>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(executor, rx, ended));
        ExitWatcher { tx }
    }

    /// Watches a run dir until its exit file appears or it is forgotten (idempotent).
    pub fn watch(&self, run_dir: &str) {
        // A newline would split the protocol's line: such a dir is left to the poll.
        if !run_dir.contains('\n') && !run_dir.is_empty() {
            let _ = self.tx.send(Command::Watch(run_dir.to_string()));
        }
    }

    pub fn forget(&self, run_dir: &str) {
        let _ = self.tx.send(Command::Forget(run_dir.to_string()));
    }
}

/// How long a watcher that ended or could not start waits before it starts again.
const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

async fn run(
    executor: Weak<SlurmExecutor>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    ended: mpsc::UnboundedSender<String>,
) {
    let mut dirs: HashSet<String> = HashSet::new();
    let mut backoff = RESTART_MIN;
    let script = remote_script();
    loop {
        // Idle: no remote process until there is something to watch.
        while dirs.is_empty() {
            match rx.recv().await {
                Some(Command::Watch(d)) => {
                    dirs.insert(d);
                }
                Some(Command::Forget(_)) => {}
                None => return,
            }
        }
        let started = std::time::Instant::now();
        match watch_remote(&executor, &script, &mut dirs, &mut rx, &ended).await {
            WatchEnd::Closed => return,
            WatchEnd::Idle => {
                backoff = RESTART_MIN;
                continue;
            }
            WatchEnd::Failed(e) => {
                // A watcher that ran for a while was fine; start again quickly.
                if started.elapsed() > RESTART_MAX {
                    backoff = RESTART_MIN;
                }
                tracing::debug!("exit-file watcher: {e}; restarting in {backoff:?}");
            }
        }
        // Commands that arrive meanwhile are kept; the poll covers the jobs in the meantime.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = rx.recv() => match cmd {
                    Some(c) => {
                        apply(&mut dirs, c);
                    }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(RESTART_MAX);
    }
}

fn apply(dirs: &mut HashSet<String>, cmd: Command) -> Option<String> {
    match cmd {
        Command::Watch(d) => dirs.insert(d.clone()).then(|| format!("+{d}\n")),
        Command::Forget(d) => dirs.remove(&d).then(|| format!("-{d}\n")),
    }
}

enum WatchEnd {
    /// The handle was dropped: the worker is gone.
    Closed,
    /// Nothing left to watch: the remote process was ended.
    Idle,
    Failed(String),
}

async fn watch_remote(
    executor: &Weak<SlurmExecutor>,
    script: &str,
    dirs: &mut HashSet<String>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
    ended: &mpsc::UnboundedSender<String>,
) -> WatchEnd {
    // Only the connection is held while watching, never the executor.
    let Some(ex) = executor.upgrade() else {
        return WatchEnd::Closed;
    };
    let conn = match ex.connection().await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Failed(e.to_string()),
    };
    drop(ex);
    let mut child = match conn.spawn_long(script).await {
        Ok(c) => c,
        Err(e) => return WatchEnd::Failed(e.to_string()),
    };
    let (Some(mut stdin), Some(stdout)) = (child.stdin().take(), child.stdout().take()) else {
        return WatchEnd::Failed("the watcher's pipes are missing".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    let initial: String = dirs.iter().map(|d| format!("+{d}\n")).collect();
    if let Err(e) = stdin.write_all(initial.as_bytes()).await {
        return WatchEnd::Failed(e.to_string());
    }
    let outcome = loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break WatchEnd::Closed };
                if let Some(line) = apply(dirs, cmd)
                    && let Err(e) = stdin.write_all(line.as_bytes()).await
                {
                    break WatchEnd::Failed(e.to_string());
                }
                if dirs.is_empty() {
                    break WatchEnd::Idle;
                }
            }
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Some(dir) = line.strip_prefix("START ")
                        && dirs.contains(dir)
                    {
                        let _ = ended.send(dir.to_string());
                    } else if let Some(dir) = line.strip_prefix("EXIT ")
                        && dirs.remove(dir)
                    {
                        let _ = ended.send(dir.to_string());
                        if dirs.is_empty() {
                            break WatchEnd::Idle;
                        }
                    }
                }
                Ok(None) => break WatchEnd::Failed("the watcher ended".into()),
                Err(e) => break WatchEnd::Failed(e.to_string()),
            },
        }
    };
    // End of input ends the remote loop at its next read.
    drop(stdin);
    drop(lines);
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    outcome
}
