//! Slurm execution over SSH: upload + submit in one streamed script, adoption by tag, one
//! batched poll per cluster per interval (one `squeue` and one `sacct` for every active job,
//! plus each job's exit file, log tails and new Pipes messages, in the same round trip).

use super::exit_watch::ExitWatcher;
use super::{JobRef, JobTrack, LOG_TAIL_BYTES, Submitted, is_job_id, tail_text};
use crate::core::{JobState, Observation};
use crate::jobscript::{
    EXIT_FILE, JOB_SCRIPT, RunPlan, STDERR_FILE, STDOUT_FILE, render_script, sbatch_argv,
};
use crate::launcher::{LAUNCHER_FILE, LAUNCHER_FILE_MAX};
use crate::pipes::{CONTEXT_FILE, MESSAGES_FILE, plan_context_data};
use crate::session::STEP_FILE;
use crate::shell::{join, quote};
use crate::slurm::{
    SACCT_FORMAT, SQUEUE_FORMAT, expand_nodelist, is_final, job_metrics, map_state, parse_sacct,
    parse_time,
};
use crate::transport::{Connection, SshTarget};
use crate::{Error, Result};
use base64::Engine;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Plans per submission round trip, at most.
const SUBMIT_CHUNK_PLANS: usize = 100;
/// Script bytes per submission round trip, about (one plan larger than this goes alone).
const SUBMIT_CHUNK_BYTES: usize = 8 << 20;
/// Time allowed per `sbatch` of a submission round trip, on top of [`COMMAND_TIMEOUT`].
const SUBMIT_TIME_PER_PLAN: Duration = Duration::from_secs(2);
/// Pipes bytes read per job per poll, at most.
const MESSAGES_CHUNK: u64 = crate::limits::PIPES_CHUNK;
const JOBID_FILE: &str = "jobid";
/// Written just before `sbatch`: a submission of this tag may have reached the scheduler.
const SUBMITTING_FILE: &str = ".submitting";
/// How long an ended job may wait for its batch step's accounting record.
const BATCH_RECORD_WAIT: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);
/// How often the facts are learnt again while accounting does not answer: one `sacct` a
/// minute, which a cluster without accounting answers without asking any daemon.
const ACCOUNTING_RECHECK: Duration = Duration::from_secs(60);
/// Per-asset lock (beside the run dirs) held from the tag lookup to the `sbatch`.
const SUBMIT_LOCK: &str = ".submit.lock";
/// Per-asset fence: the highest leadership epoch that submitted for the asset.
const FENCE_FILE: &str = ".leader-epoch";

/// Counters the tests and `/metrics` read.
#[derive(Debug)]
pub struct Counters {
    pub ssh_connects: AtomicU64,
    /// Masters re-established after one died (a subset of `ssh_connects`).
    pub ssh_reconnects: AtomicU64,
    /// Batched polls that asked the scheduler (a poll of jobs that all wrote their exit file
    /// asks it nothing).
    pub scheduler_polls: AtomicU64,
    /// `squeue` and `sacct` commands run by polls (each one scheduler RPC).
    pub scheduler_queries: AtomicU64,
    /// Job ends learnt from the exit-file watcher.
    pub exit_notices: AtomicU64,
    pub remote_commands: AtomicU64,
    /// Polls that got no answer (the connection failed) or whose squeue or sacct failed.
    pub scheduler_poll_failures: AtomicU64,
    /// Seconds from the start of a submission to Slurm's job ID (one SSH round trip).
    pub submit_latency: Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            ssh_connects: AtomicU64::new(0),
            ssh_reconnects: AtomicU64::new(0),
            scheduler_polls: AtomicU64::new(0),
            scheduler_queries: AtomicU64::new(0),
            exit_notices: AtomicU64::new(0),
            remote_commands: AtomicU64::new(0),
            scheduler_poll_failures: AtomicU64::new(0),
            submit_latency: Histogram::new(exponential_buckets(0.05, 2.0, 10)),
        }
    }
}

/// What the cluster told us when we first connected.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterFacts {
    pub home: String,
    pub platform: String,
    pub slurm_version: String,
    pub accounting: bool,
}

/// One Slurm cluster: its master connection (re-established with backoff) and its facts.
pub struct SlurmExecutor {
    target: SshTarget,
    exe: PathBuf,
    conn: Mutex<Option<Arc<Connection>>>,
    /// The facts and when they were learnt.
    facts: Mutex<Option<(ClusterFacts, std::time::Instant)>>,
    pub counters: Arc<Counters>,
    shared: Mutex<SharedPoll>,
    /// How the last attempt to reach the cluster went (`None`: not tried yet).
    reachable: std::sync::Mutex<Option<std::result::Result<(), String>>>,
    /// The exit-file watcher, once started ([`SlurmExecutor::watch_exits`]).
    exit_watch: std::sync::OnceLock<ExitWatcher>,
    /// Run dirs whose exit file the watcher reported and no poll has observed since.
    noticed: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Jobs observed one by one (Kubernetes mode reconciles each asset on its own) are still
/// polled in one batch per interval: the first caller after the interval polls every watched
/// job, the others read the result.
#[derive(Default)]
struct SharedPoll {
    last: Option<std::time::Instant>,
    /// run dir → (job, requested memory, what is tracked between polls)
    watched: HashMap<String, (JobRef, Option<u64>, JobTrack)>,
    /// run dir → the last batch's observation (kept until claimed once final)
    results: HashMap<String, (std::time::Instant, Observation)>,
}

/// How long a result of the shared batch waits for its owner.
const SHARED_RESULT_TTL: Duration = Duration::from_secs(3600);

impl SharedPoll {
    /// The job's final observation, handed out once.
    fn take_final(&mut self, key: &str) -> Option<Observation> {
        if self
            .results
            .get(key)
            .is_some_and(|(_, o)| is_final(&o.state) && !o.metrics_pending)
        {
            return self.results.remove(key).map(|(_, o)| o);
        }
        None
    }
}

/// One job to observe, with what is tracked between polls (Pipes offset, missing since).
pub struct Watched<'a> {
    pub job: JobRef,
    pub requested_mem: Option<u64>,
    pub track: &'a mut JobTrack,
}

/// How long every source must have denied knowing a job, its exit file absent, before the
/// job is declared lost (the scheduler may briefly list neither, e.g. while accounting lags).
pub const LOST_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(60);

impl SlurmExecutor {
    pub fn new(target: SshTarget, exe: PathBuf, counters: Arc<Counters>) -> Self {
        SlurmExecutor {
            target,
            exe,
            conn: Mutex::new(None),
            facts: Mutex::new(None),
            counters,
            shared: Mutex::new(SharedPoll::default()),
            reachable: std::sync::Mutex::new(None),
            exit_watch: std::sync::OnceLock::new(),
            noticed: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Starts the exit-file watcher (once): from now on every job this executor submits or
    /// observes is watched until it ends, and each run dir whose exit file appears is sent
    /// to `ended` (and observed by the next [`SlurmExecutor::observe_shared`] at once).
    pub fn watch_exits(self: &Arc<Self>, ended: mpsc::UnboundedSender<String>) {
        if self.exit_watch.get().is_some() {
            return;
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(dir) = rx.recv().await {
                let Some(ex) = me.upgrade() else { break };
                ex.counters.exit_notices.fetch_add(1, Ordering::Relaxed);
                ex.noticed.lock().expect("noticed lock").insert(dir.clone());
                drop(ex);
                if ended.send(dir).is_err() {
                    break;
                }
            }
        });
        let _ = self
            .exit_watch
            .set(ExitWatcher::spawn(Arc::downgrade(self), tx));
    }

    fn watch(&self, run_dir: &str) {
        if let Some(w) = self.exit_watch.get() {
            w.watch(run_dir);
        }
    }

    fn forget(&self, run_dir: &str) {
        if let Some(w) = self.exit_watch.get() {
            w.forget(run_dir);
        }
    }

    /// Observes one job through the shared batch (see [`SharedPoll`]). `None`: no batch has
    /// seen the job yet (it was submitted or adopted since); the next one will.
    pub async fn observe_shared(
        &self,
        job: &JobRef,
        requested_mem: Option<u64>,
        interval: Duration,
    ) -> Result<Option<Observation>> {
        let mut shared = self.shared.lock().await;
        let key = job.run_dir.clone();
        if let Some(obs) = shared.take_final(&key) {
            return Ok(Some(obs));
        }
        shared
            .watched
            .entry(key.clone())
            .and_modify(|w| w.0 = job.clone())
            .or_insert_with(|| (job.clone(), requested_mem, JobTrack::default()));
        let due = shared.last.is_none_or(|t| t.elapsed() >= interval);
        // A job whose exit file appeared is observed at once, with the others so noticed
        // (not the whole batch: those are due at the interval).
        let noticed: Option<std::collections::HashSet<String>> = if due {
            None
        } else {
            let n = self.noticed.lock().expect("noticed lock");
            n.contains(&key).then(|| n.clone())
        };
        if due || noticed.is_some() {
            let SharedPoll { watched, .. } = &mut *shared;
            let chosen = |k: &String| noticed.as_ref().is_none_or(|n| n.contains(k));
            let keys: Vec<String> = watched.keys().filter(|k| chosen(k)).cloned().collect();
            let mut batch: Vec<Watched> = watched
                .iter_mut()
                .filter(|(k, _)| chosen(k))
                .map(|(_, (j, mem, track))| Watched {
                    job: j.clone(),
                    requested_mem: *mem,
                    track,
                })
                .collect();
            let observed = self.observe(&mut batch).await?;
            drop(batch);
            let now = std::time::Instant::now();
            for (k, obs) in keys.into_iter().zip(observed) {
                if is_final(&obs.state) && !obs.metrics_pending {
                    // Ended: no more polling; the result waits for its owner.
                    shared.watched.remove(&k);
                }
                shared.results.insert(k, (now, obs));
            }
            // Results nobody came back for (their asset was deleted meanwhile) expire.
            shared
                .results
                .retain(|_, (t, _)| now.duration_since(*t) < SHARED_RESULT_TTL);
            if due {
                shared.last = Some(now);
            }
        }
        if let Some(obs) = shared.take_final(&key) {
            return Ok(Some(obs));
        }
        Ok(shared.results.get(&key).map(|(_, o)| o.clone()))
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// The shared master connection; a dead one is replaced, retrying with exponential backoff.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.is_alive().await {
                return Ok(c.clone());
            }
            tracing::warn!("ssh master to {:?} is gone; reconnecting", self.target);
            self.counters.ssh_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        use backon::Retryable;
        let conn = (|| Connection::open(&self.target, &self.exe))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(10))
                    .with_max_times(3),
            )
            .notify(|e, d| tracing::warn!("{e}; retrying in {d:?}"))
            .await?;
        self.counters.ssh_connects.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// How the last attempt to reach the cluster went, if there was one.
    pub fn reachability(&self) -> Option<std::result::Result<(), String>> {
        self.reachable.lock().expect("reachability lock").clone()
    }

    /// The cluster's facts, if a connection has learnt them (never connects).
    pub fn known_facts(&self) -> Option<ClusterFacts> {
        self.facts
            .try_lock()
            .ok()
            .and_then(|f| f.as_ref().map(|(f, _)| f.clone()))
    }

    async fn run(&self, script: &str) -> Result<crate::transport::RemoteOutput> {
        self.run_for(script, COMMAND_TIMEOUT).await
    }

    /// Runs a short script of the operator's own on the cluster (default timeout).
    pub async fn run_script(&self, script: &str) -> Result<crate::transport::RemoteOutput> {
        self.run(script).await
    }

    async fn run_for(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<crate::transport::RemoteOutput> {
        let result = self.run_once(script, timeout).await;
        *self.reachable.lock().expect("reachability lock") = Some(match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        });
        result
    }

    async fn run_once(
        &self,
        script: &str,
        timeout: Duration,
    ) -> Result<crate::transport::RemoteOutput> {
        let conn = self.connection().await?;
        self.counters
            .remote_commands
            .fetch_add(1, Ordering::Relaxed);
        match conn.run(script, timeout).await {
            Ok(o) => Ok(o),
            Err(e) => {
                // Drop the connection so the next command reconnects.
                if self.conn.lock().await.take().is_some() {
                    self.counters.ssh_reconnects.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// Connects (if needed) and learns the cluster's facts: once, but while accounting does
    /// not answer, again every [`ACCOUNTING_RECHECK`] (slurmdbd may have been down only
    /// while the operator started).
    pub async fn facts(&self) -> Result<ClusterFacts> {
        let known = {
            let mut known = self.facts.lock().await;
            match known.as_mut() {
                Some((f, at)) if f.accounting || at.elapsed() < ACCOUNTING_RECHECK => {
                    return Ok(f.clone());
                }
                Some((f, at)) => {
                    // This caller asks again; the others keep the answer they have meanwhile.
                    *at = std::time::Instant::now();
                    Some(f.clone())
                }
                None => None,
            }
        };
        match (self.learn_facts().await, known) {
            (Ok(facts), _) => {
                *self.facts.lock().await = Some((facts.clone(), std::time::Instant::now()));
                Ok(facts)
            }
            // A failed re-check leaves what was known.
            (Err(_), Some(facts)) => Ok(facts),
            (Err(e), None) => Err(e),
        }
    }

    /// Asks the cluster for its facts (one SSH command).
    async fn learn_facts(&self) -> Result<ClusterFacts> {
        let out = self
            .run(
                "printf 'HOME=%s\\n' \"$HOME\"; printf 'ARCH=%s\\n' \"$(uname -m)\"; \
                 printf 'SLURM=%s\\n' \"$(sinfo --version 2>/dev/null)\"; \
                 if sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; then echo ACCT=yes; else echo ACCT=no; fi",
            )
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let facts = ClusterFacts {
            home: get("HOME="),
            platform: match get("ARCH=").as_str() {
                "x86_64" => "linux-64".into(),
                other => format!("linux-{other}"),
            },
            // "slurm 23.11.4", or Debian's "slurm-wlm 22.05.8": the version is the last word.
            slurm_version: get("SLURM=")
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string(),
            accounting: get("ACCT=") == "yes",
        };
        if facts.home.is_empty() {
            return Err(Error::Transport(
                "could not read $HOME on the cluster".into(),
            ));
        }
        Ok(facts)
    }

    /// Adopts the job carrying the attempt's tag if there is one, else uploads the run dir and
    /// submits — in one streamed script, one round trip.
    pub async fn submit(&self, plan: &RunPlan) -> Result<std::result::Result<Submitted, String>> {
        self.submit_many(std::slice::from_ref(plan))
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::Transport("no answer to the submission".into())))
    }

    /// Submits (or adopts) every plan in one remote script: one round trip for a whole tick's
    /// submissions. Each plan keeps its own lock, fence and duplicate check, and its own answer.
    pub async fn submit_many(
        &self,
        plans: &[RunPlan],
    ) -> Vec<Result<std::result::Result<Submitted, String>>> {
        // Bounded round trips: a script of at most SUBMIT_CHUNK_PLANS plans and about
        // SUBMIT_CHUNK_BYTES (payloads travel inside it), each with time for its sbatch calls.
        let blocks: Vec<String> = plans.iter().map(submission_block).collect();
        let mut answers = Vec::with_capacity(plans.len());
        let mut start = 0;
        while start < plans.len() {
            let mut end = start + 1;
            let mut bytes = blocks[start].len();
            while end < plans.len()
                && end - start < SUBMIT_CHUNK_PLANS
                && bytes + blocks[end].len() <= SUBMIT_CHUNK_BYTES
            {
                bytes += blocks[end].len();
                end += 1;
            }
            answers.extend(
                self.submit_chunk(&plans[start..end], &blocks[start..end])
                    .await,
            );
            start = end;
        }
        answers
    }

    async fn submit_chunk(
        &self,
        plans: &[RunPlan],
        blocks: &[String],
    ) -> Vec<Result<std::result::Result<Submitted, String>>> {
        let mut script = String::from("set -u\numask 077\n");
        for (i, block) in blocks.iter().enumerate() {
            script.push_str(&format!("echo '@@SAO SUB {i}'\n(\n"));
            script.push_str(block);
            script.push_str(")\n");
        }
        let started = std::time::Instant::now();
        let timeout = COMMAND_TIMEOUT + SUBMIT_TIME_PER_PLAN * plans.len() as u32;
        let out = match self.run_for(&script, timeout).await {
            Ok(out) => out,
            Err(e) => {
                let message = e.to_string();
                return plans
                    .iter()
                    .map(|_| Err(Error::Transport(message.clone())))
                    .collect();
            }
        };
        let per_job = started.elapsed().as_secs_f64() / plans.len() as f64;
        for _ in plans {
            self.counters.submit_latency.observe(per_job);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut answers: Vec<Option<&str>> = vec![None; plans.len()];
        let mut current = None;
        for line in text.lines().map(str::trim) {
            if let Some(i) = line.strip_prefix("@@SAO SUB ") {
                current = i.parse::<usize>().ok().filter(|i| *i < plans.len());
            } else if let Some(i) = current
                && SUBMIT_MARKERS.iter().any(|m| line.starts_with(m))
            {
                // The last marker line of the block is its answer (a login shell's rc files
                // may print other lines).
                answers[i] = Some(line);
            }
        }
        plans
            .iter()
            .zip(answers)
            .map(|(plan, line)| {
                let answer = submission_answer(plan, line.unwrap_or(""), &out.stderr);
                if let Ok(Ok(sub)) = &answer {
                    self.watch(&sub.run_dir);
                }
                answer
            })
            .collect()
    }

    /// Observes every given job of this cluster in one round trip.
    pub async fn observe(&self, jobs: &mut [Watched<'_>]) -> Result<Vec<Observation>> {
        if jobs.is_empty() {
            return Ok(vec![]);
        }
        let accounting = self.facts().await.map(|f| f.accounting).unwrap_or(false);
        let s = poll_script(jobs, accounting);
        let failed = || {
            self.counters
                .scheduler_poll_failures
                .fetch_add(1, Ordering::Relaxed)
        };
        let out = self.run(&s).await.inspect_err(|_| {
            failed();
        })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (queries, query_failed) = scheduler_answers(&text);
        if query_failed {
            failed();
        }
        if queries > 0 {
            self.counters
                .scheduler_polls
                .fetch_add(1, Ordering::Relaxed);
            self.counters
                .scheduler_queries
                .fetch_add(queries, Ordering::Relaxed);
        }
        let observations = parse_poll(&text, jobs, accounting, jiff::Timestamp::now());
        tracing::debug!(
            "polled {} jobs on {:?} ({queries} scheduler queries): {:?}",
            jobs.len(),
            self.target,
            observations
                .iter()
                .map(|o| (&o.state, o.metrics_pending))
                .collect::<Vec<_>>()
        );
        // Jobs observed (adopted after a restart, say) are watched until they have ended.
        let mut noticed = self.noticed.lock().expect("noticed lock");
        for (w, obs) in jobs.iter().zip(&observations) {
            noticed.remove(&w.job.run_dir);
            if is_final(&obs.state) {
                self.forget(&w.job.run_dir);
            } else {
                self.watch(&w.job.run_dir);
            }
        }
        Ok(observations)
    }

    /// Cancels a job by ID, or by tag when the ID is not known yet.
    /// Cancels the attempt's job — or, when its run dir is a session step's (it names its
    /// session), only the step: the run dir is marked (a step that starts later exits at
    /// once), its request leaves the session's queue, and the step is cancelled if it runs.
    pub async fn cancel(
        &self,
        job_id: Option<&str>,
        tag: &str,
        run_dir: Option<&str>,
    ) -> Result<String> {
        let target = match job_id.filter(|j| !j.is_empty()) {
            Some(id) => quote(id),
            None => format!("--name={}", quote(tag)),
        };
        let script = format!(
            r#"d={d}; tag={t}
if [ -n "$d" ] && [ -f "$d/{SESSION_FILE}" ]; then
touch "$d/{CANCELLED}" 2>/dev/null
sdir=$(head -n1 "$d/{SESSION_FILE}")
[ -n "$sdir" ] && rm -f "$sdir/{QUEUE}/$tag"
s=$(head -n1 "$d/{STEP}" 2>/dev/null | tr -dc '0-9.')
if [ -n "$s" ]; then scancel "$s" 2>&1; echo "session step $s: rc=$?"; else echo "session step not started: taken out of the queue"; fi
else
scancel {target} 2>&1; echo "rc=$?"
fi
"#,
            d = quote(run_dir.unwrap_or("")),
            t = quote(tag),
            CANCELLED = crate::session::CANCELLED_FILE,
            SESSION_FILE = crate::session::SESSION_FILE,
            QUEUE = crate::session::QUEUE_DIR,
            STEP = STEP_FILE,
        );
        let out = self.run(&script).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(format!(
            "scancel {}: {}",
            job_id.unwrap_or(tag),
            text.trim()
        ))
    }

    pub async fn cleanup(&self, run_dir: &str) -> Result<()> {
        self.run(&format!("rm -rf -- {}", quote(run_dir)))
            .await
            .map(|_| ())
    }

    /// Ends the master connection (at a shutdown, or when a replaced worker has drained its
    /// queue); a command still under way with it fails, as after a lost connection.
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close().await;
        }
    }
}

/// One plan's submission, as a block of the submission script (run in a subshell, so that
/// its `exit` ends only this plan's block).
fn submission_block(plan: &RunPlan) -> String {
    let dir = &plan.run_dir;
    let tag = plan.id.tag();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut s = String::new();
    let asset_dir = std::path::Path::new(dir)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| ".".into());
    s.push_str(&format!(
        "tag={}\ndir={}\nadir={}\nepoch={}\n",
        quote(&tag),
        quote(dir),
        quote(&asset_dir),
        plan.id.epoch
    ));
    // Lookup and sbatch run under one lock per asset, so two operators (say, an old and a
    // new leader) can never both miss each other's job. The highest leadership epoch that
    // submitted for this asset is kept beside it: a lower epoch is a deposed leader and
    // is refused (a fencing token; epoch 0 means no leader election and is not fenced).
    s.push_str(&format!(
            "mkdir -p \"$adir\" || {{ echo \"ERROR cannot create $adir\"; exit 0; }}\n\
             exec 9>>\"$adir/{SUBMIT_LOCK}\"\n\
             if command -v flock >/dev/null 2>&1; then flock -w 30 9 || {{ echo BUSY; exit 0; }}; fi\n\
             if [ \"$epoch\" -gt 0 ]; then\n\
             fence=$(cat \"$adir/{FENCE_FILE}\" 2>/dev/null)\n\
             case $fence in ''|*[!0-9]*) fence=0 ;; esac\n\
             if [ \"$fence\" -gt \"$epoch\" ]; then echo \"FENCED $fence\"; exit 0; fi\n\
             if [ \"$fence\" -lt \"$epoch\" ]; then printf '%s\\n' \"$epoch\" > \"$adir/{FENCE_FILE}\"; fi\n\
             fi\n"
        ));
    // The run dir remembers "<tag> <job id>" once sbatch answered, and "<tag>" in
    // `.submitting` just before it asks: the scheduler is asked for the tag (squeue, then
    // sacct) only when a submission started and its answer was not recorded (the operator or
    // the connection died in between), so a fresh submission costs the scheduler one RPC.
    // A dir holding another tag belongs to an earlier object of the same name and is cleared.
    // A session step's request file is its own record: the enqueue below finds it.
    let lookup = if plan.session.is_some() {
        ":"
    } else {
        "existing=$(squeue -h -o %i --name=\"$tag\" 2>/dev/null | head -n1)\n\
         [ -z \"$existing\" ] && existing=$(sacct -n -X -P -o JobID --name=\"$tag\" -S now-60days 2>/dev/null | head -n1)"
    };
    s.push_str(&format!(
        "existing=''\n\
         if [ -f \"$dir/{JOBID_FILE}\" ]; then\n\
         read -r t i < \"$dir/{JOBID_FILE}\"\n\
         if [ \"$t\" = \"$tag\" ]; then existing=$i; else rm -rf -- \"$dir\"; fi\n\
         elif [ -f \"$dir/{SUBMITTING_FILE}\" ]; then\n\
         read -r t < \"$dir/{SUBMITTING_FILE}\"\n\
         if [ \"$t\" = \"$tag\" ]; then\n\
         {lookup}\n\
         else rm -rf -- \"$dir\"; fi\n\
         fi\n"
    ));
    s.push_str("if [ -n \"$existing\" ]; then echo \"ADOPT $existing\"; exit 0; fi\n");
    s.push_str("mkdir -p \"$dir\" && chmod 700 \"$dir\" && cd \"$dir\" || { echo \"ERROR cannot create $dir\"; exit 0; }\n");
    for f in &plan.required_files {
        s.push_str(&format!(
            "[ -f {q} ] || {{ echo {msg}; exit 0; }}\n",
            q = quote(f),
            msg = quote(&format!(
                "ERROR the payload {} is not on the cluster (skipPayloadUpload: nothing was uploaded)",
                crate::limits::truncate(f, 512)
            ))
        ));
    }
    if let Some(key) = &plan.env_key {
        s.push_str(&format!(
            "printf '%s\\n' {} > {}\n",
            quote(key),
            crate::environment::RUN_ENV_FILE
        ));
    }
    // The job's files, and those of each component with a payload of its own (in its run
    // dir inside the job's).
    let mut files: Vec<(String, Vec<u8>, &str)> = vec![];
    for (prefix, p) in std::iter::once((String::new(), plan)).chain(
        plan.component_plans
            .iter()
            .zip(&plan.components)
            .map(|(cp, (name, _))| (format!("{}/{name}/", crate::jobscript::COMPONENTS_DIR), cp)),
    ) {
        if !prefix.is_empty() {
            s.push_str(&format!("mkdir -p {}\n", quote(&prefix)));
        }
        files.push((
            format!("{prefix}{JOB_SCRIPT}"),
            render_script(p).into_bytes(),
            "700",
        ));
        if let Some((name, content)) = &p.payload_file {
            files.push((format!("{prefix}{name}"), content.clone(), "600"));
        }
        let ctx = plan_context_data(p);
        files.push((
            format!("{prefix}{CONTEXT_FILE}"),
            ctx.to_string().into_bytes(),
            "600",
        ));
    }
    for (name, content, mode) in &files {
        s.push_str(&format!(
            "base64 -d > {q} <<'SAO_EOF'\n{}\nSAO_EOF\nchmod {mode} {q}\n",
            b64(content),
            q = quote(name)
        ));
    }
    if let Some(session) = &plan.session {
        s.push_str(&enqueue_step(session));
        return s;
    }
    // sbatch's warnings go to stderr and are not its answer; the job ID is the last line
    // of stdout (`--parsable`: "ID" or "ID;cluster") and must be a number.
    s.push_str(&format!(
        "printf '%s\\n' \"$tag\" > {SUBMITTING_FILE}\nout=$({} 2>.sbatch.err)\nrc=$?\nerr=$(head -c 2000 .sbatch.err)\nrm -f .sbatch.err\n",
        join(&sbatch_argv(plan))
    ));
    s.push_str(&format!(
            "if [ $rc -ne 0 ]; then printf 'SBATCH_FAILED %s %s\\n' \"$err\" \"$out\" | tr '\\n' ' '; echo; exit 0; fi\n\
             id=$(printf '%s\\n' \"$out\" | tail -n1)\nid=${{id%%;*}}\n\
             case $id in ''|*[!0-9]*) printf 'SBATCH_FAILED no job ID in the answer: %s\\n' \"$out\" | head -c 1000 | tr '\\n' ' '; echo; exit 0 ;; esac\n\
             printf '%s %s\\n' \"$tag\" \"$id\" > {JOBID_FILE}\necho \"SUBMITTED $id\"\n"
        ));
    s
}

/// Queues a step with its session's agent: a request file (the run dir, then one `srun`
/// option per line) renamed into the session's queue. A request already queued or started
/// is the step's: it is adopted, never queued twice (the agent's claim is a rename too).
fn enqueue_step(p: &crate::session::Placement) -> String {
    use crate::session::{QUEUE_DIR, STARTED_DIR};
    let mut lines = String::new();
    for a in &p.srun {
        lines.push_str(&format!(" {}", quote(a)));
    }
    format!(
        r#"sdir={sdir}
printf '%s\n' "$sdir" > {SESSION_FILE}
printf '%s\n' "$tag" > {SUBMITTING_FILE}
if [ -e "$sdir/{QUEUE_DIR}/$tag" ] || [ -e "$sdir/{STARTED_DIR}/$tag" ]; then answer=ADOPT
elif [ -d "$sdir/{QUEUE_DIR}" ]; then
printf '%s\n' "$dir"{lines} > "$sdir/{QUEUE_DIR}/.$tag.tmp" && mv -f "$sdir/{QUEUE_DIR}/.$tag.tmp" "$sdir/{QUEUE_DIR}/$tag" || {{ echo 'ERROR cannot queue the step with its session'; exit 0; }}
answer=SUBMITTED
else echo 'ERROR the session has no step queue: its allocation is not running'; exit 0; fi
printf '%s %s\n' "$tag" {job} > {JOBID_FILE}
echo "$answer {job}"
"#,
        sdir = quote(&p.session_dir),
        job = quote(&p.job_id),
        SESSION_FILE = crate::session::SESSION_FILE,
    )
}

/// The lines that answer a submission block.
const SUBMIT_MARKERS: [&str; 6] = [
    "ADOPT ",
    "SUBMITTED ",
    "FENCED ",
    "BUSY",
    "SBATCH_FAILED ",
    "ERROR ",
];

/// One plan's answer, from its block's last marker line.
fn submission_answer(
    plan: &RunPlan,
    line: &str,
    stderr: &str,
) -> Result<std::result::Result<Submitted, String>> {
    let dir = &plan.run_dir;
    let result = if let Some(id) = line
        .strip_prefix("ADOPT ")
        .or_else(|| line.strip_prefix("SUBMITTED "))
    {
        // Adoption reads the ID back from squeue, sacct or the run dir: validate it too.
        let id = id.trim();
        if !is_job_id(id) {
            return Err(Error::Transport(format!(
                "the cluster answered the submission with {:?}, which is not a job ID",
                crate::limits::truncate(id, 64)
            )));
        }
        Ok(Submitted {
            job_id: id.to_string(),
            run_dir: dir.clone(),
            adopted: line.starts_with("ADOPT "),
        })
    } else if let Some(fence) = line.strip_prefix("FENCED ") {
        return Err(Error::Fenced {
            epoch: plan.id.epoch,
            fence: fence.trim().parse().unwrap_or(0),
        });
    } else if line == "BUSY" {
        return Err(Error::Transport(
            "another submission for this asset holds its lock".into(),
        ));
    } else if let Some(msg) = line.strip_prefix("SBATCH_FAILED ") {
        Err(crate::limits::truncate(
            &format!("sbatch: {}", msg.trim()),
            crate::limits::MAX_MESSAGE,
        ))
    } else if let Some(msg) = line.strip_prefix("ERROR ") {
        Err(crate::limits::truncate(msg, crate::limits::MAX_MESSAGE))
    } else {
        return Err(Error::Transport(format!(
            "unexpected answer to the submission: {}",
            crate::limits::truncate(stderr.trim(), 500)
        )));
    };
    Ok(result)
}

/// Seconds after its exit file appeared that a job is asked of accounting: by then Slurm has
/// usually recorded its end, so one `sacct` brings the final state and metrics.
const ACCOUNTING_SETTLE_SECS: u64 = 2;
/// For how long after a job's end its missing metrics are asked for again soon.
const SETTLE_WINDOW: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

/// How many scheduler queries (`squeue`, `sacct`) a poll's output reports, and whether one
/// of them failed.
fn scheduler_answers(text: &str) -> (u64, bool) {
    let rcs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("@@SAO RC squeue") || l.starts_with("@@SAO RC sacct"))
        .collect();
    (
        rcs.len() as u64,
        rcs.iter().any(|l| l.rsplit(' ').next() != Some("0")),
    )
}

/// The script of one batched poll. The job's own files come first: a job whose exit file
/// exists has ended, and needs no `squeue`. `squeue` runs only when some job has not written
/// its exit file (the safety net: node failure, timeout, OOM kill, `scancel`), and `sacct`
/// only for the jobs it can tell something new: ended at least [`ACCOUNTING_SETTLE_SECS`]
/// ago (their metrics), or gone from `squeue` without an exit file, or ended by the scheduler.
fn poll_script(jobs: &[Watched<'_>], accounting: bool) -> String {
    let mut s = String::new();
    // `sao_tail KEY FILE` prints the file's size and its last bytes up to that size, so
    // that a reader of both can tell which lines it has not seen (the file may grow).
    s.push_str(&format!(
        "sao_tail() {{ n=$(stat -c %s \"$2\" 2>/dev/null || echo 0); \
         k=$(( n < {LOG_TAIL_BYTES} ? n : {LOG_TAIL_BYTES} )); \
         printf '%s %s %s\\n' \"$1\" \"$n\" \"$(tail -c +$(( n - k + 1 )) \"$2\" 2>/dev/null | head -c \"$k\" | base64 -w0)\"; }}\n\
         printf -v sao_now '%(%s)T' -1\nacct=''\nlive=''\n"
    ));
    // First pass: which jobs the scheduler must be asked about. A job with an exit file has
    // ended (accounting is asked for its metrics once it has settled); one without is live.
    s.push_str("fresh=' '\n");
    for (i, w) in jobs.iter().enumerate() {
        let d = quote(&w.job.run_dir);
        // Only valid IDs reach the scheduler: one bad value must not fail the whole query.
        let id = w
            .job
            .job_id
            .as_deref()
            .filter(|id| is_job_id(id))
            .unwrap_or("");
        s.push_str(&format!(
            "id={id}\n\
             if [ -d {d} ]; then\n\
             if [ -f {d}/{EXIT_FILE} ]; then\n\
             m=$(stat -c %Y {d}/{EXIT_FILE} 2>/dev/null || echo 0)\n\
             if [ $(( sao_now - m )) -ge {ACCOUNTING_SETTLE_SECS} ]; then [ -n \"$id\" ] && acct=\"$acct,$id\"; else fresh=\"$fresh{i} \"; fi\n\
             else live=\"$live $id\"; fi\n\
             else {gone}; fi\n",
            gone = if w.track.exit_seen {
                "[ -n \"$id\" ] && acct=\"$acct,$id\""
            } else {
                "live=\"$live $id\""
            }
        ));
    }
    // squeue for the user's jobs, in every state: `squeue -j ID` fails as a whole when one
    // ID was purged, which would make a healthy batch look unknown. Each query's exit
    // status travels with its output: a failed query is "unknown", never "absent".
    s.push_str(&format!(
        "echo '@@SAO SQUEUE'\n\
         if [ -n \"${{live// /}}\" ]; then\n\
         q=$(squeue -h -t all -u \"$(id -un)\" -o {} 2>/dev/null); rc=$?\n\
         printf '%s\\n' \"$q\"\necho \"@@SAO RC squeue $rc\"\n\
         listed=' '\n\
         while IFS='|' read -r qid qst _; do\n\
         [ -n \"$qid\" ] || continue\n\
         case \"$live \" in *\" $qid \"*) ;; *) continue ;; esac\n\
         listed=\"$listed$qid \"\n\
         case $qst in PENDING|RUNNING|CONFIGURING|COMPLETING|SUSPENDED|REQUEUE*|RESIZING|SIGNALING|STAGE_OUT|STOPPED|SPECIAL_EXIT|RESV_DEL_HOLD) ;; *) acct=\"$acct,$qid\" ;; esac\n\
         done <<< \"$q\"\n\
         for id in $live; do\n\
         if [ $rc -ne 0 ]; then acct=\"$acct,$id\"; continue; fi\n\
         case \"$listed\" in *\" $id \"*) ;; *) acct=\"$acct,$id\" ;; esac\n\
         done\n\
         fi\n\
         echo '@@SAO SACCT'\n",
        quote(SQUEUE_FORMAT),
    ));
    if accounting {
        s.push_str(&format!(
            "acct=${{acct#,}}\n\
             if [ -n \"$acct\" ]; then sacct -P -n -j \"$acct\" --format={SACCT_FORMAT} 2>/dev/null; echo \"@@SAO RC sacct $?\"; fi\n"
        ));
    }
    // Second pass, after the scheduler answered: each run dir's exit file, log tails and new
    // Pipes messages. Read after the answer, a job the scheduler calls ended has written all
    // it will write (its script exits only after its exit file), so a job that ends while
    // this script runs is never reported ended with the output of before its end.
    for (i, w) in jobs.iter().enumerate() {
        let d = quote(&w.job.run_dir);
        s.push_str(&format!(
            "echo '@@SAO JOB {i}'\n\
             if cd {d} 2>/dev/null; then\n\
             if [ -f {EXIT_FILE} ]; then printf 'EXIT %s\\n' \"$(base64 -w0 {EXIT_FILE} 2>/dev/null)\"; fi\n\
             case $fresh in *' {i} '*) echo 'FRESH 1' ;; esac\n\
             sao_tail OUT {STDOUT_FILE}\n\
             sao_tail ERR {STDERR_FILE}\n\
             printf 'MSG %s\\n' \"$(tail -c +{} {MESSAGES_FILE} 2>/dev/null | head -c {MESSAGES_CHUNK} | base64 -w0)\"\n\
             printf 'SIZE %s\\n' \"$(stat -c %s {MESSAGES_FILE} 2>/dev/null)\"\n\
             if [ -f {STEP_FILE} ]; then printf 'STEP %s\\n' \"$(head -c 512 {STEP_FILE} | base64 -w0)\"; fi\n\
             if [ -f {LAUNCHER_FILE} ]; then printf 'LAUNCH %s\\n' \"$(head -c {LAUNCHER_FILE_MAX} {LAUNCHER_FILE} | base64 -w0)\"; fi\n\
             {components}\
             cd - >/dev/null\n\
             fi\n",
            w.track.reader.offset + 1,
            components = component_reads(w),
        ));
    }
    s
}

/// The poll's reads of the run dirs of components with payloads of their own (there when
/// they do): `C<n>EXIT`, `C<n>OUT`, ... as the job's own.
fn component_reads(w: &Watched<'_>) -> String {
    let mut s = String::new();
    for (c, name) in w.job.components.iter().enumerate() {
        let d = quote(&format!("{}/{name}", crate::jobscript::COMPONENTS_DIR));
        let offset = w.track.components.get(c).map_or(0, |r| r.offset);
        s.push_str(&format!(
            "if [ -d {d} ]; then\n\
             if [ -f {d}/{EXIT_FILE} ]; then printf 'C{c}EXIT %s\\n' \"$(base64 -w0 {d}/{EXIT_FILE} 2>/dev/null)\"; fi\n\
             sao_tail C{c}OUT {d}/{STDOUT_FILE}\n\
             sao_tail C{c}ERR {d}/{STDERR_FILE}\n\
             printf 'C{c}MSG %s\\n' \"$(tail -c +{} {d}/{MESSAGES_FILE} 2>/dev/null | head -c {MESSAGES_CHUNK} | base64 -w0)\"\n\
             printf 'C{c}SIZE %s\\n' \"$(stat -c %s {d}/{MESSAGES_FILE} 2>/dev/null)\"\n\
             if [ -f {d}/{LAUNCHER_FILE} ]; then printf 'C{c}LAUNCH %s\\n' \"$(head -c {LAUNCHER_FILE_MAX} {d}/{LAUNCHER_FILE} | base64 -w0)\"; fi\n\
             fi\n",
            offset + 1
        ));
    }
    s
}

/// What the run dir told about the job beside its state: log tails, Pipes, launcher facts.
fn fill_from_run_dir(obs: &mut Observation, files: &HashMap<&str, String>, w: &Watched<'_>) {
    // A run dir that could not be read (cleaned up after the end, say) says nothing about
    // the logs: the tails seen before stand.
    if files.contains_key("OUT") || files.contains_key("ERR") {
        let (stdout_bytes, stdout) = tail_decoded(files.get("OUT"));
        let (stderr_bytes, stderr) = tail_decoded(files.get("ERR"));
        obs.log_tail = Some(crate::api::LogTail {
            stdout,
            stderr,
            stdout_bytes,
            stderr_bytes,
        });
    }
    obs.pipes = Some(w.track.reader.status.clone());
    obs.launcher = files
        .get("LAUNCH")
        .and_then(|b| crate::launcher::parse_facts(&decode(b)));
}

/// A session step's state. Its exit file is its own word; before that, the allocation's
/// state says whether it can still run: queued in the session until it has recorded its
/// step ID, running after, and ended with the allocation if that ended first.
#[allow(clippy::too_many_arguments)]
fn observe_step(
    w: &mut Watched<'_>,
    files: &HashMap<&str, String>,
    rows: &[crate::slurm::SacctRow],
    alloc_in_squeue: Option<&str>,
    exit: Option<i32>,
    [start, end]: [Option<i64>; 2],
    every_source_answered: bool,
    accounting: bool,
    now: jiff::Timestamp,
) -> Observation {
    let alloc_id = w.job.job_id.clone().unwrap_or_default();
    let step_file = files
        .get("STEP")
        .map(|b| String::from_utf8_lossy(&decode(b)).into_owned())
        .unwrap_or_default();
    let mut lines = step_file.lines();
    let step_id = lines
        .next()
        .map(str::trim)
        .or(w.job.step_id.as_deref())
        .filter(|s| {
            s.split_once('.').is_some_and(|(j, st)| {
                j == alloc_id && !st.is_empty() && st.bytes().all(|b| b.is_ascii_digit())
            })
        })
        .map(str::to_string);
    let step_nodes = lines.next().map(expand_nodelist).unwrap_or_default();
    let row = step_id
        .as_ref()
        .and_then(|sid| rows.iter().find(|r| &r.job_id == sid));
    let alloc = rows.iter().find(|r| r.job_id == alloc_id);
    let step = step_id.as_deref().unwrap_or("not started");
    let ended_alloc = |state: &str| -> (JobState, String) {
        if state.starts_with("CANCELLED") {
            (
                JobState::Cancelled {
                    by: Some("the session (its allocation was cancelled)".into()),
                },
                format!("{state} (the session's allocation)"),
            )
        } else {
            (
                JobState::Killed {
                    reason: "SessionEnded".into(),
                    exit_code: None,
                },
                format!("{state} (the session's allocation)"),
            )
        }
    };
    let (state, raw) = if let Some(code) = exit {
        w.track.exit_seen = true;
        (
            JobState::Exited { exit_code: code },
            format!(
                "{} (step {step}, from the exit file)",
                if code == 0 { "COMPLETED" } else { "FAILED" }
            ),
        )
    } else if let Some(st) = alloc_in_squeue {
        match map_state(st, None) {
            JobState::Running if step_id.is_some() => {
                (JobState::Running, format!("RUNNING (step {step})"))
            }
            JobState::Running => (
                JobState::Queued,
                "PENDING (queued in the session)".to_string(),
            ),
            JobState::Queued => (
                JobState::Queued,
                format!("PENDING (the session's allocation is {st})"),
            ),
            s if is_final(&s) => ended_alloc(st),
            s => (s, st.to_string()),
        }
    } else if let Some(a) = alloc.filter(|a| is_final(&map_state(&a.state, None))) {
        ended_alloc(&a.state)
    } else if every_source_answered && is_job_id(&alloc_id) {
        let since = *w.track.missing_since.get_or_insert(now);
        if now.duration_since(since) >= LOST_GRACE {
            ended_alloc("GONE")
        } else {
            (JobState::Unknown, "UNKNOWN".to_string())
        }
    } else {
        (JobState::Unknown, "UNKNOWN".to_string())
    };
    if !matches!(state, JobState::Unknown) {
        w.track.missing_since = None;
    }
    let mut obs = Observation::of(state);
    obs.slurm_state = Some(raw);
    if let JobState::Killed { .. } = &obs.state {
        obs.message = Some(format!(
            "the session's allocation {alloc_id} ended before this step finished"
        ));
    }
    let row_final = row.is_some_and(|r| is_final(&map_state(&r.state, None)));
    obs.metrics_pending = accounting && is_final(&obs.state) && exit.is_some() && !row_final;
    obs.observe_again_soon = obs.metrics_pending
        && (files.contains_key("FRESH")
            || end
                .and_then(|e| jiff::Timestamp::from_second(e).ok())
                .is_some_and(|e| now.duration_since(e) < SETTLE_WINDOW));
    if let Some(r) = row.filter(|_| row_final) {
        obs.metrics = Some(crate::slurm::step_metrics(r, w.requested_mem));
    }
    obs.nodes = match row {
        Some(r) if !r.node_list.is_empty() => expand_nodelist(&r.node_list),
        _ => step_nodes,
    };
    obs.start_time = row
        .and_then(|r| parse_time(&r.start))
        .or_else(|| start.and_then(|s| jiff::Timestamp::from_second(s).ok()));
    obs.end_time = row
        .and_then(|r| parse_time(&r.end))
        .or_else(|| end.and_then(|e| jiff::Timestamp::from_second(e).ok()));
    obs.step_id = step_id;
    obs
}

fn decode(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap_or_default()
}

/// A log tail as `sao_tail` prints it (`<size> <base64 of the last bytes>`): the file's size,
/// and the tail, whose first line is partial only when the file is longer than the tail.
fn tail_decoded(line: Option<&String>) -> (Option<u64>, String) {
    let Some((size, b64)) = line.and_then(|l| l.split_once(' ')) else {
        return (None, String::new());
    };
    let size = size.parse::<u64>().ok();
    let bytes = decode(b64);
    let cut = size.is_some_and(|n| n > bytes.len() as u64);
    (size, tail_text(&bytes, cut))
}

/// Turns the poll script's output into one observation per job.
fn parse_poll(
    text: &str,
    jobs: &mut [Watched<'_>],
    accounting: bool,
    now: jiff::Timestamp,
) -> Vec<Observation> {
    // job ID → (state, reason, node list)
    let mut squeue: HashMap<String, (String, String, String)> = HashMap::new();
    // A running job's start, before accounting is asked about it.
    let mut squeue_start: HashMap<String, String> = HashMap::new();
    // A heterogeneous job's components as squeue lists them (`123+1`): (component, state,
    // nodes) by the job's ID.
    let mut squeue_het: HashMap<String, Vec<(u32, String, String)>> = HashMap::new();
    let mut sacct_text = String::new();
    let mut per_job: HashMap<usize, HashMap<&str, String>> = HashMap::new();
    // The same of components with payloads of their own, by (job, component).
    let mut per_component: HashMap<(usize, usize), HashMap<&str, String>> = HashMap::new();
    let mut rc: HashMap<String, i32> = HashMap::new();
    let mut section = "SQUEUE";
    let mut current: Option<usize> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("@@SAO ") {
            if rest == "SACCT" {
                section = "SACCT";
            } else if rest == "SQUEUE" {
                section = "SQUEUE";
            } else if let Some(i) = rest.strip_prefix("JOB ") {
                section = "JOB";
                current = i.parse().ok();
            } else if let Some((what, code)) =
                rest.strip_prefix("RC ").and_then(|r| r.split_once(' '))
            {
                rc.insert(what.to_string(), code.trim().parse().unwrap_or(-1));
            }
            continue;
        }
        match section {
            "SQUEUE" => {
                let f: Vec<&str> = line.split('|').collect();
                // A component (`123+1`) counts for its job (`123`): the first listed gives
                // the state, all of them the nodes.
                let (id, component) = match f[0].split_once('+') {
                    Some((job, c)) => (job, c.parse::<u32>().ok()),
                    None => (f[0], None),
                };
                if f.len() >= 5 {
                    squeue_start
                        .entry(id.to_string())
                        .or_insert_with(|| f[4].to_string());
                }
                if f.len() >= 4 {
                    if let Some(c) = component {
                        squeue_het.entry(id.to_string()).or_default().push((
                            c,
                            f[1].to_string(),
                            f[3].to_string(),
                        ));
                    }
                    match squeue.entry(id.to_string()) {
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert((f[1].to_string(), f[2].to_string(), f[3].to_string()));
                        }
                        std::collections::hash_map::Entry::Occupied(mut e)
                            if component.is_some() && !f[3].is_empty() =>
                        {
                            let nodes = &mut e.get_mut().2;
                            if !nodes.is_empty() {
                                nodes.push(',');
                            }
                            nodes.push_str(f[3]);
                        }
                        _ => {}
                    }
                }
            }
            "SACCT" => {
                sacct_text.push_str(line);
                sacct_text.push('\n');
            }
            _ => {
                if let (Some(i), Some((k, v))) = (current, line.split_once(' '))
                    && let Some(rest) = k.strip_prefix('C')
                {
                    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                    if let (Ok(c), Some(what)) = (
                        rest[..digits].parse::<usize>(),
                        ["EXIT", "OUT", "ERR", "MSG", "SIZE", "LAUNCH"]
                            .into_iter()
                            .find(|w| *w == &rest[digits..]),
                    ) {
                        per_component
                            .entry((i, c))
                            .or_default()
                            .insert(what, v.to_string());
                    }
                    continue;
                }
                if let (Some(i), Some((k, v))) = (current, line.split_once(' ')) {
                    per_job.entry(i).or_default().insert(
                        match k {
                            "EXIT" => "EXIT",
                            "OUT" => "OUT",
                            "ERR" => "ERR",
                            "MSG" => "MSG",
                            "SIZE" => "SIZE",
                            "FRESH" => "FRESH",
                            "LAUNCH" => "LAUNCH",
                            "STEP" => "STEP",
                            _ => continue,
                        },
                        v.to_string(),
                    );
                }
            }
        }
    }
    // A query answered when it ran and exited 0; sacct that was not needed answers nothing.
    let squeue_answered = rc.get("squeue") == Some(&0);
    let sacct_answered = !accounting || rc.get("sacct").is_none_or(|c| *c == 0);
    let rows = parse_sacct(&sacct_text);
    jobs.iter_mut()
        .enumerate()
        .map(|(i, w)| {
            let id = w.job.job_id.clone().unwrap_or_default();
            let files = per_job.remove(&i).unwrap_or_default();
            if let Some(m) = files.get("MSG") {
                w.track.reader.feed(&decode(m));
            }
            let component_files: Vec<HashMap<&str, String>> = (0..w.job.components.len())
                .map(|c| per_component.remove(&(i, c)).unwrap_or_default())
                .collect();
            if w.track.components.len() < component_files.len() {
                w.track
                    .components
                    .resize_with(component_files.len(), Default::default);
            }
            for (c, f) in component_files.iter().enumerate() {
                if let Some(m) = f.get("MSG") {
                    w.track.components[c].feed(&decode(m));
                }
            }
            // A component's messages not all read yet hold the job's end, as its own do.
            let components_unread = component_files.iter().enumerate().any(|(c, f)| {
                f.get("SIZE")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|size| size > w.track.components[c].offset)
            });
            let job_rows: Vec<_> = if is_job_id(&id) {
                rows.iter().filter(|r| r.base_id() == id).collect()
            } else {
                vec![]
            };
            let alloc = job_rows.iter().find(|r| !r.is_step());
            let exit_file = files
                .get("EXIT")
                .map(|e| String::from_utf8_lossy(&decode(e)).into_owned())
                .unwrap_or_default();
            let exit_field = |key: &str| {
                exit_file
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|c| c.trim().parse::<i64>().ok())
            };
            let exit = exit_field("exit_code=").and_then(|c| i32::try_from(c).ok());
            if exit.is_some() {
                w.track.exit_seen = true;
            }
            // Whether the payload ended within the last [`SETTLE_WINDOW`] (by its own clock).
            let ended_recently = exit_field("end=")
                .and_then(|e| jiff::Timestamp::from_second(e).ok())
                .is_some_and(|end| now.duration_since(end) < SETTLE_WINDOW);
            let queued = squeue.get(&id).filter(|_| is_job_id(&id));
            if w.job.in_session {
                let ended = [exit_field("start="), exit_field("end=")];
                let mut obs = observe_step(
                    w,
                    &files,
                    &rows,
                    queued.map(|(st, _, _)| st.as_str()),
                    exit,
                    ended,
                    squeue_answered && sacct_answered,
                    accounting,
                    now,
                );
                fill_from_run_dir(&mut obs, &files, w);
                return obs;
            }
            let from_sacct = alloc.map(|a| map_state(&a.state, Some(&a.exit_code)));
            let from_squeue = queued.map(|(st, _, _)| map_state(st, None));
            let known = from_sacct.is_some() || from_squeue.is_some() || exit.is_some();
            if known {
                w.track.missing_since = None;
            }
            let mut waiting_for_accounting = false;
            let (mut state, mut raw) = match (&from_sacct, &from_squeue, exit) {
                (Some(s), _, _) if is_final(s) => (s.clone(), alloc.map(|a| a.state.clone())),
                // The exit file is the payload's own last word: the job script only exits
                // after writing it, so the end is known before the scheduler records it.
                (_, _, Some(code)) => (
                    JobState::Exited { exit_code: code },
                    Some(format!(
                        "{} (from the exit file)",
                        if code == 0 { "COMPLETED" } else { "FAILED" }
                    )),
                ),
                // squeue lists an end a moment before accounting records it with the exit
                // code (and the figures that tell a memory kill): wait for it, for a while.
                (_, Some(q), None)
                    if accounting
                        && is_final(q)
                        && now.duration_since(*w.track.squeue_end_since.get_or_insert(now))
                            < BATCH_RECORD_WAIT =>
                {
                    let st = queued.map(|(st, _, _)| st.as_str()).unwrap_or_default();
                    waiting_for_accounting = true;
                    (
                        JobState::Running,
                        Some(format!("{st} (waiting for accounting)")),
                    )
                }
                (_, Some(q), None) => (q.clone(), queued.map(|(st, _, _)| st.clone())),
                (Some(s), None, None) => (s.clone(), alloc.map(|a| a.state.clone())),
                (None, None, None) => {
                    if !is_job_id(&id) {
                        (
                            JobState::Infrastructure {
                                reason: "Lost".into(),
                            },
                            None,
                        )
                    } else if squeue_answered && sacct_answered {
                        // Positively unknown to every source: lost once that has lasted.
                        let since = *w.track.missing_since.get_or_insert(now);
                        if now.duration_since(since) >= LOST_GRACE {
                            (
                                JobState::Infrastructure {
                                    reason: "Lost".into(),
                                },
                                None,
                            )
                        } else {
                            (JobState::Unknown, None)
                        }
                    } else {
                        (JobState::Unknown, None)
                    }
                }
            };
            let mut waiting_for_batch = waiting_for_accounting;
            // Accounting can mark the allocation ended a moment before the batch step's own
            // record (its CPU time and memory) arrives; ending now would freeze metrics of
            // zero. Wait for it, for a while: a step record can also be lost.
            if let Some(a) = alloc
                && exit.is_none()
                && (a.state.starts_with("COMPLETED") || a.state.starts_with("FAILED"))
                && !job_rows
                    .iter()
                    .any(|r| r.job_id.ends_with(".batch") && is_final(&map_state(&r.state, None)))
                && parse_time(&a.end).is_some_and(|end| now.duration_since(end) < BATCH_RECORD_WAIT)
            {
                state = JobState::Running;
                raw = Some(format!(
                    "{} (waiting for the batch step's accounting)",
                    a.state
                ));
                waiting_for_batch = true;
            }
            // An ended job whose messages are not all read yet (one chunk per poll) ends once
            // they are: the last ones are often the materialization and `closed`.
            let unread = components_unread
                || files
                    .get("SIZE")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|size| size > w.track.reader.offset);
            let mut again_soon = waiting_for_batch;
            if unread && is_final(&state) {
                state = JobState::Running;
                raw = Some("ENDED (reading the remaining Pipes messages)".into());
                again_soon = true;
            }
            let mut obs = Observation::of(state);
            obs.slurm_state = raw.or_else(|| {
                if !accounting {
                    Some("UNKNOWN (no accounting; outcome from the exit file)".into())
                } else {
                    None
                }
            });
            match &obs.state {
                JobState::Infrastructure { .. } if !is_job_id(&id) => {
                    obs.message = Some(format!(
                        "{:?} is not a Slurm job ID and the run left no exit file",
                        crate::limits::truncate(&id, 40)
                    ));
                }
                JobState::Infrastructure { .. } => {
                    obs.message = Some(format!(
                        "job {id} is unknown to squeue{} and left no exit file for {}s",
                        if accounting { " and sacct" } else { "" },
                        LOST_GRACE.as_secs()
                    ));
                }
                JobState::Unknown => {
                    obs.message = Some(if squeue_answered && sacct_answered {
                        format!("job {id} is not listed yet")
                    } else {
                        "the scheduler did not answer; observing again".to_string()
                    });
                }
                JobState::Queued => obs.queue_reason = queued.map(|(_, r, _)| r.clone()),
                _ => {}
            }
            // Ended, but accounting (which holds the metrics) has not recorded the end: it was
            // down, or lags behind the controller.
            // The batch step's record (its CPU time and memory) can come later still.
            let batch_recorded = job_rows
                .iter()
                .any(|r| r.job_id.ends_with(".batch") && is_final(&map_state(&r.state, None)));
            // A heterogeneous job's figures are complete once every component's are.
            let components_recorded = (0..w.job.components.len() as u32).all(|c| {
                job_rows.iter().any(|r| {
                    r.component() == Some(c) && !r.is_step() && is_final(&map_state(&r.state, None))
                })
            });
            obs.metrics_pending = accounting
                && is_final(&obs.state)
                && (!sacct_answered
                    || !alloc.is_some_and(|a| is_final(&map_state(&a.state, None)))
                    || !batch_recorded
                    || !components_recorded);
            // Just ended: accounting was not asked yet (it records the end a moment later).
            // Bounded by the time since the end, so that lagging accounting is not asked
            // every few seconds for ever; a scheduler that did not answer is not asked sooner.
            obs.observe_again_soon = again_soon
                || (is_final(&obs.state)
                    && obs.metrics_pending
                    && (files.contains_key("FRESH") || (sacct_answered && ended_recently)));
            // The allocation's node list, from whichever source has all of it (accounting can
            // lag behind the controller while the job starts).
            let want = alloc.and_then(|a| a.alloc_nodes).unwrap_or(0) as usize;
            let candidates = [
                alloc.map(|a| expand_nodelist(&a.node_list)),
                queued.map(|(_, _, n)| expand_nodelist(n)),
            ];
            obs.nodes = candidates
                .iter()
                .flatten()
                .find(|n| n.len() == want)
                .or_else(|| candidates.iter().flatten().max_by_key(|n| n.len()))
                .cloned()
                .unwrap_or_default();
            if let Some(a) = alloc {
                obs.start_time = parse_time(&a.start);
                obs.end_time = parse_time(&a.end);
            }
            if obs.start_time.is_none() && queued.is_some() {
                obs.start_time = squeue_start.get(&id).and_then(|s| parse_time(s));
            }
            if is_final(&obs.state) && !obs.metrics_pending {
                obs.metrics = job_metrics(&job_rows, w.requested_mem);
                // Without cgroups, Slurm enforces memory through jobacct_gather's OverMemoryKill,
                // which it records as FAILED by SIGKILL: name it for what it was.
                let rss = obs.metrics.as_ref().and_then(|m| m.max_rss_bytes);
                let killed = matches!(obs.state, JobState::Exited { exit_code: 137 })
                    || matches!(
                        &obs.state,
                        JobState::Killed {
                            exit_code: Some(137),
                            ..
                        }
                    );
                if let (true, Some(rss), Some(req)) = (killed, rss, w.requested_mem)
                    && rss >= req
                {
                    obs.state = JobState::Killed {
                        reason: "OUT_OF_MEMORY".into(),
                        exit_code: Some(137),
                    };
                    obs.message = Some(format!(
                        "killed for using {rss} bytes of memory, over the {req} requested"
                    ));
                }
            }
            if is_job_id(&id) && !w.job.components.is_empty() {
                obs.components = components_of(
                    &id,
                    &w.job.components,
                    &job_rows,
                    squeue_het.get(&id).map(Vec::as_slice).unwrap_or_default(),
                    is_final(&obs.state) && !obs.metrics_pending,
                );
                for (c, f) in component_files.iter().enumerate() {
                    let Some(st) = obs.components.get_mut(c) else {
                        continue;
                    };
                    if f.is_empty() {
                        continue;
                    }
                    // Its own exit file is its payload's word (sacct's is the component's).
                    if let Some(code) = f
                        .get("EXIT")
                        .map(|e| String::from_utf8_lossy(&decode(e)).into_owned())
                        .and_then(|t| {
                            t.lines()
                                .find_map(|l| l.strip_prefix("exit_code="))
                                .and_then(|v| v.trim().parse::<i32>().ok())
                        })
                    {
                        st.exit_code = Some(code);
                    }
                    let (stdout_bytes, stdout) = tail_decoded(f.get("OUT"));
                    let (stderr_bytes, stderr) = tail_decoded(f.get("ERR"));
                    st.log_tail = Some(crate::api::LogTail {
                        stdout,
                        stderr,
                        stdout_bytes,
                        stderr_bytes,
                    });
                    st.pipes = Some(w.track.components[c].status.clone());
                    st.launcher = f
                        .get("LAUNCH")
                        .and_then(|b| crate::launcher::parse_facts(&decode(b)));
                }
                // A job that did not succeed names the components that did not either.
                if is_final(&obs.state) && !matches!(obs.state, JobState::Exited { exit_code: 0 }) {
                    let bad: Vec<String> = obs
                        .components
                        .iter()
                        .filter(|c| {
                            c.exit_code.is_some_and(|e| e != 0)
                                || c.slurm_state
                                    .as_deref()
                                    .is_some_and(|st| !st.starts_with("COMPLETED"))
                        })
                        .map(|c| {
                            format!(
                                "component {} ({}) {}{}{}",
                                c.name,
                                c.job_id.as_deref().unwrap_or(""),
                                c.slurm_state.as_deref().unwrap_or("ended"),
                                c.exit_code
                                    .filter(|e| *e != 0)
                                    .map(|e| format!(" with exit code {e}"))
                                    .unwrap_or_default(),
                                c.launcher
                                    .as_ref()
                                    .and_then(|l| l.error.as_deref())
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            )
                        })
                        .collect();
                    if !bad.is_empty() {
                        let m = obs
                            .message
                            .take()
                            .map(|m| format!("{m}; "))
                            .unwrap_or_default();
                        obs.message = Some(format!("{m}{}", bad.join(", ")));
                    }
                }
            }
            fill_from_run_dir(&mut obs, &files, w);
            obs
        })
        .collect()
}

/// The components of heterogeneous job `id` (named `names`, in order) from its sacct rows
/// (`id+N`, `id+N.step`) and squeue's; their metrics once the job's are final.
fn components_of(
    id: &str,
    names: &[String],
    rows: &[&crate::slurm::SacctRow],
    queued: &[(u32, String, String)],
    with_metrics: bool,
) -> Vec<crate::api::ComponentStatus> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let i = i as u32;
            let own: Vec<&crate::slurm::SacctRow> = rows
                .iter()
                .copied()
                .filter(|r| r.component() == Some(i))
                .collect();
            let alloc = own.iter().find(|r| !r.is_step());
            let listed = queued.iter().find(|(c, _, _)| *c == i);
            let ended = alloc.filter(|a| is_final(&map_state(&a.state, None)));
            crate::api::ComponentStatus {
                name: name.clone(),
                job_id: Some(format!("{id}+{i}")),
                nodes: alloc
                    .map(|a| expand_nodelist(&a.node_list))
                    .filter(|n| !n.is_empty())
                    .or_else(|| listed.map(|(_, _, n)| expand_nodelist(n)))
                    .unwrap_or_default(),
                slurm_state: ended
                    .map(|a| a.state.clone())
                    .or_else(|| listed.map(|(_, st, _)| st.clone()))
                    .or_else(|| alloc.map(|a| a.state.clone())),
                exit_code: ended.and_then(|a| crate::slurm::parse_exit_code(&a.exit_code)),
                metrics: if with_metrics {
                    crate::slurm::job_metrics(&own, None)
                } else {
                    None
                },
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched<'a>(track: &'a mut JobTrack, id: &str) -> Watched<'a> {
        Watched {
            job: JobRef {
                job_id: Some(id.into()),
                run_dir: "/r".into(),
                resources: Default::default(),
                in_session: false,
                step_id: None,
                components: vec![],
            },
            requested_mem: None,
            track,
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn without_accounting_the_exit_file_decides_once_squeue_forgot() {
        let mut r = JobTrack::default();
        let mut jobs = [watched(&mut r, "9")];
        let text = format!(
            "@@SAO SACCT\n@@SAO JOB 0\nEXIT {}\nOUT 11 {}\nERR 0 \nMSG \n",
            b64("exit_code=4\nstart=1\nend=2\n"),
            b64("ne\nhello\n")
        );
        let obs = parse_poll(&text, &mut jobs, false, jiff::Timestamp::now());
        assert_eq!(obs[0].state, JobState::Exited { exit_code: 4 });
        let tail = obs[0].log_tail.as_ref().unwrap();
        // The file (11 bytes) is longer than its tail: the tail's cut first line is dropped.
        assert_eq!(tail.stdout, "hello\n");
        assert_eq!((tail.stdout_bytes, tail.stderr_bytes), (Some(11), Some(0)));
    }

    /// A job that ends while the poll runs (after its run dir was read, before the scheduler
    /// is asked) is reported with what it wrote last: its output and its exit file.
    ///
    /// `squeue` and `sacct` are stand-ins here, and say so: the real scheduler cannot be made
    /// to end a job inside this window on demand. The stand-in `squeue` ends the job (writes
    /// its output and exit file, as the job script does last) and then answers as Slurm does
    /// for a job that has just completed; `sacct` answers the same.
    #[test]
    fn a_job_that_ends_during_the_poll_is_read_after_the_scheduler_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run");
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&run_dir).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(run_dir.join(STDOUT_FILE), "").unwrap();
        let shim = |name: &str, body: String| {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{body}")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let end = jiff::Timestamp::now().as_second() - 10;
        shim(
            "squeue",
            format!(
                "printf 'ok\\n' >> {out}\nprintf 'exit_code=0\\nstart={start}\\nend={end}\\n' > {exit}\necho '9|COMPLETED|None|n1'\n",
                out = quote(&run_dir.join(STDOUT_FILE).display().to_string()),
                exit = quote(&run_dir.join(EXIT_FILE).display().to_string()),
                start = end - 3,
            ),
        );
        shim(
            "sacct",
            "echo '9|COMPLETED|0:0|3|00:00:00|1|1|cpu=1|||2026-01-01T00:00:00|2026-01-01T00:00:03'\n\
             echo '9.batch|COMPLETED|0:0|3|00:02.500|1|1|cpu=1|5768K||2026-01-01T00:00:00|2026-01-01T00:00:03'\n"
                .to_string(),
        );
        let mut track = JobTrack::default();
        let mut jobs = [Watched {
            job: JobRef {
                job_id: Some("9".into()),
                run_dir: run_dir.display().to_string(),
                resources: Default::default(),
                in_session: false,
                step_id: None,
                components: vec![],
            },
            requested_mem: None,
            track: &mut track,
        }];
        let script = poll_script(&jobs, true);
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let obs = parse_poll(&text, &mut jobs, true, jiff::Timestamp::now()).remove(0);
        assert_eq!(obs.state, JobState::Exited { exit_code: 0 }, "{text}");
        assert_eq!(obs.log_tail.as_ref().unwrap().stdout, "ok\n", "{text}");
    }

    #[test]
    fn a_run_dir_gone_leaves_the_log_tail_unsaid() {
        let mut r = JobTrack::default();
        let mut jobs = [watched(&mut r, "9")];
        // No lines for the job: its run dir was not there to read.
        let obs = parse_poll(
            "9|COMPLETED|None|n1\n@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO JOB 0\n",
            &mut jobs,
            false,
            jiff::Timestamp::now(),
        );
        assert!(obs[0].log_tail.is_none(), "{:?}", obs[0].log_tail);
    }

    #[test]
    fn squeue_wins_while_the_job_is_live() {
        let mut r = JobTrack::default();
        let mut jobs = [watched(&mut r, "9")];
        let obs = parse_poll(
            "9|RUNNING|None|n[1-2]\n@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO JOB 0\n",
            &mut jobs,
            true,
            jiff::Timestamp::now(),
        );
        assert_eq!(obs[0].state, JobState::Running);
        assert_eq!(obs[0].nodes, vec!["n1", "n2"]);
    }

    #[test]
    fn a_job_missing_from_every_source_is_lost_only_after_a_grace_period() {
        let mut r = JobTrack::default();
        let t0 = jiff::Timestamp::now();
        let text = "@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 0\n@@SAO JOB 0\nEXIT \n";
        let poll = |r: &mut JobTrack, text: &str, now| {
            let mut jobs = [watched(r, "9")];
            parse_poll(text, &mut jobs, true, now).remove(0)
        };
        assert_eq!(poll(&mut r, text, t0).state, JobState::Unknown);
        let later = t0 + LOST_GRACE + jiff::SignedDuration::from_secs(1);
        let lost = poll(&mut r, text, later);
        assert_eq!(
            lost.state,
            JobState::Infrastructure {
                reason: "Lost".into()
            }
        );
        assert!(
            lost.message
                .unwrap()
                .contains("unknown to squeue and sacct")
        );
    }

    #[test]
    fn a_failed_scheduler_query_is_unknown_never_lost() {
        // squeue failed (slurmctld down), sacct failed (slurmdbd down), or their status is
        // missing altogether: nothing is concluded, however long it lasts.
        let t0 = jiff::Timestamp::now();
        for text in [
            "@@SAO RC squeue 1\n@@SAO SACCT\n@@SAO RC sacct 0\n@@SAO JOB 0\n",
            "@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 1\n@@SAO JOB 0\n",
            "",
        ] {
            let mut r = JobTrack::default();
            for minutes in [0, 10, 100] {
                let now = t0 + jiff::SignedDuration::from_mins(minutes);
                let mut jobs = [watched(&mut r, "9")];
                let obs = parse_poll(text, &mut jobs, true, now).remove(0);
                assert_eq!(obs.state, JobState::Unknown, "{text:?} after {minutes} min");
            }
        }
    }

    #[test]
    fn an_invalid_job_id_harms_no_other_job() {
        let mut a = JobTrack::default();
        let mut b = JobTrack::default();
        let mut jobs = [watched(&mut a, "12;rm -rf"), watched(&mut b, "9")];
        let text = "9|RUNNING|None|n1\n@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 0\n@@SAO JOB 0\n@@SAO JOB 1\n";
        let obs = parse_poll(text, &mut jobs, true, jiff::Timestamp::now());
        assert!(matches!(obs[0].state, JobState::Infrastructure { .. }));
        assert!(
            obs[0]
                .message
                .as_ref()
                .unwrap()
                .contains("not a Slurm job ID")
        );
        assert_eq!(obs[1].state, JobState::Running);
    }

    #[test]
    fn a_poll_whose_squeue_or_sacct_failed_is_a_failed_poll() {
        assert_eq!(
            scheduler_answers("@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 0\n"),
            (2, false)
        );
        assert_eq!(
            scheduler_answers("@@SAO RC squeue 1\n@@SAO SACCT\n@@SAO RC sacct 0\n"),
            (2, true)
        );
        assert_eq!(scheduler_answers("@@SAO RC sacct 10\n"), (1, true));
        assert_eq!(scheduler_answers("@@SAO JOB 0\nEXIT x\n"), (0, false));
    }

    #[test]
    fn queued_jobs_carry_squeue_reason() {
        let mut r = JobTrack::default();
        let mut jobs = [watched(&mut r, "9")];
        let text =
            "9|PENDING|BeginTime|\n@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 0\n@@SAO JOB 0\n";
        let obs = parse_poll(text, &mut jobs, true, jiff::Timestamp::now()).remove(0);
        assert_eq!(obs.state, JobState::Queued);
        assert_eq!(obs.queue_reason.as_deref(), Some("BeginTime"));
    }

    #[test]
    fn an_end_seen_while_accounting_is_down_awaits_metrics() {
        let mut r = JobTrack::default();
        let mut jobs = [watched(&mut r, "9")];
        let text = format!(
            "@@SAO RC squeue 0\n@@SAO SACCT\n@@SAO RC sacct 1\n@@SAO JOB 0\nEXIT {}\n",
            b64("exit_code=0\nstart=1\nend=2\n")
        );
        let obs = parse_poll(&text, &mut jobs, true, jiff::Timestamp::now()).remove(0);
        assert_eq!(obs.state, JobState::Exited { exit_code: 0 });
        assert!(obs.metrics_pending);
        assert_eq!(
            obs.slurm_state.as_deref(),
            Some("COMPLETED (from the exit file)")
        );
    }

    #[test]
    fn pipes_messages_advance_the_offset() {
        let mut r = JobTrack::default();
        let msg = "{\"method\":\"opened\",\"params\":{}}\n";
        {
            let mut jobs = [watched(&mut r, "9")];
            let text = format!(
                "9|RUNNING|None|n1\n@@SAO SACCT\n@@SAO JOB 0\nMSG {}\n",
                b64(msg)
            );
            parse_poll(&text, &mut jobs, true, jiff::Timestamp::now());
        }
        assert_eq!(r.reader.offset as usize, msg.len());
        assert!(r.reader.status.opened);
    }

    #[test]
    fn an_end_only_squeue_knows_waits_for_accountings_exit_code() {
        // squeue lists a job FAILED (no exit code there) a moment before sacct records its
        // end: taking squeue's word would lose the exit code, the metrics and with them what
        // killed it (seen in CI: a memory kill reported as plain FAILED).
        let killed = "9|FAILED|0:9|1|00:00:00|1|1|cpu=1|||2026-01-01T00:00:00|2026-01-01T00:00:01";
        let batch = "9.batch|CANCELLED by 0|0:9|1|00:00.007|1|1|cpu=1|320996K||2026-01-01T00:00:00|2026-01-01T00:00:01";
        let running = "9|RUNNING|0:0|1|00:00:00|1|1|cpu=1|||2026-01-01T00:00:00|Unknown";
        let mut r = JobTrack::default();
        let start = jiff::Timestamp::now();
        let poll = |r: &mut JobTrack, sacct: &str, now| {
            let mut w = watched(r, "9");
            w.requested_mem = Some(50 * 1024 * 1024);
            let mut jobs = [w];
            let text = format!(
                "9|FAILED|None|n1|2026-01-01T00:00:00\n@@SAO RC squeue 0\n@@SAO SACCT\n{sacct}\n@@SAO RC sacct 0\n@@SAO JOB 0\n"
            );
            parse_poll(&text, &mut jobs, true, now).remove(0)
        };
        let early = poll(&mut r, running, start);
        assert_eq!(early.state, JobState::Running, "{early:?}");
        assert!(early.observe_again_soon);
        let recorded = poll(&mut r, &format!("{killed}\n{batch}"), start);
        assert_eq!(
            recorded.state,
            JobState::Killed {
                reason: "OUT_OF_MEMORY".into(),
                exit_code: Some(137)
            },
            "{recorded:?}"
        );
        // Accounting that never records the end does not hold the job for ever.
        let late = poll(
            &mut r,
            running,
            start + BATCH_RECORD_WAIT + BATCH_RECORD_WAIT,
        );
        assert!(is_final(&late.state), "{late:?}");
    }

    #[test]
    fn an_ended_job_waits_briefly_for_its_batch_step_record() {
        let alloc =
            "9|COMPLETED|0:0|3|00:00:00|1|1|cpu=1|||2026-01-01T00:00:00|2026-01-01T00:00:03";
        let batch = "9.batch|COMPLETED|0:0|3|00:02.500|1|1|cpu=1|5768K||2026-01-01T00:00:00|2026-01-01T00:00:03";
        let end = parse_time("2026-01-01T00:00:03").unwrap();
        let soon = end + jiff::SignedDuration::from_secs(2);
        let poll = |sacct: &str, now| {
            let mut r = JobTrack::default();
            let mut jobs = [watched(&mut r, "9")];
            let text =
                format!("@@SAO RC squeue 0\n@@SAO SACCT\n{sacct}\n@@SAO RC sacct 0\n@@SAO JOB 0\n");
            parse_poll(&text, &mut jobs, true, now).remove(0)
        };
        // Only the allocation's row: not final yet.
        let early = poll(alloc, soon);
        assert_eq!(early.state, JobState::Running);
        assert!(early.metrics.is_none());
        // With the batch step's record: final, with its CPU time.
        let done = poll(&format!("{alloc}\n{batch}"), soon);
        assert_eq!(done.state, JobState::Exited { exit_code: 0 });
        assert_eq!(done.metrics.unwrap().total_cpu_seconds, Some(2.5));
        // A record that never comes does not hold the job forever.
        let late = poll(alloc, end + jiff::SignedDuration::from_secs(60));
        assert_eq!(late.state, JobState::Exited { exit_code: 0 });
    }
}
