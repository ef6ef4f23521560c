//! The reconciler core: a pure state machine. Given the spec facts, the last status and one
//! event, it returns the new status and the actions to perform. No I/O happens here; the
//! stores and executors are adapters around it, so Kubernetes and standalone mode share it.

use crate::api::{EnvStatus, LogTail, Metrics, Phase, PipesStatus, RunSummary, SlurmAssetStatus};
use crate::conditions;
use jiff::Timestamp;
use std::time::Duration;

/// How many earlier runs `status.history` keeps.
pub const HISTORY_LIMIT: usize = 10;

/// Reason of a spec (or reference) that cannot run.
pub const REASON_INVALID: &str = "InvalidSpec";

/// The facts about the object that the core decides on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub generation: i64,
    pub run_key: Option<&'a str>,
    /// Why the spec cannot run (field path and reason), if it cannot.
    pub invalid: Option<&'a str>,
    pub suspend: bool,
    pub retry_limit: u32,
    pub retry_backoff: Duration,
    pub retry_on_payload_failure: bool,
    pub cleanup_on_failure: bool,
    pub debug: bool,
    /// The object is being deleted (manifest removed, or deletionTimestamp set).
    pub deleted: bool,
    /// The run needs a packed environment before it can be submitted.
    pub needs_env: bool,
    pub now: Timestamp,
}

/// What the scheduler (or the local supervisor) says about a job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Queued,
    Running,
    /// The payload ended by itself with this exit code.
    Exited {
        exit_code: i32,
    },
    /// The scheduler ended the job (TIMEOUT, OUT_OF_MEMORY, DEADLINE, ...): not retried.
    Killed {
        reason: String,
        exit_code: Option<i32>,
    },
    /// Cancelled by someone other than the operator.
    Cancelled {
        by: Option<String>,
    },
    /// Infrastructure failure (NODE_FAIL, BOOT_FAIL, PREEMPTED, a vanished process): retried.
    Infrastructure {
        reason: String,
    },
    /// No source could answer for the job this time (a failed scheduler query, a job not yet
    /// listed): nothing is concluded, the job is observed again.
    Unknown,
}

/// How long after a job's end its metrics are still awaited from accounting.
pub const METRICS_WAIT: Duration = Duration::from_secs(3600);
/// The condition that says whether `status.metrics` could be read.
pub const METRICS_CONDITION: &str = "MetricsAvailable";

/// One observation of the current attempt's job.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub state: JobState,
    pub slurm_state: Option<String>,
    pub message: Option<String>,
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    pub nodes: Vec<String>,
    pub metrics: Option<Metrics>,
    pub log_tail: Option<LogTail>,
    pub pipes: Option<PipesStatus>,
    /// Why a queued job waits (squeue's reason, e.g. `Resources`, `BeginTime`).
    pub queue_reason: Option<String>,
    /// A session step's own ID (`<job>.<step>`), once it started.
    pub step_id: Option<String>,
    /// What the launcher started (Ray's head address), from the run dir.
    pub launcher: Option<crate::api::LauncherStatus>,
    /// A heterogeneous job's components, as far as the scheduler said.
    pub components: Vec<crate::api::ComponentStatus>,
    /// The job ended but accounting did not answer: its metrics may come later.
    pub metrics_pending: bool,
    /// The job has ended and its last figures (accounting, Pipes messages) are due within
    /// seconds: observe it again soon rather than a whole poll interval later.
    pub observe_again_soon: bool,
}

impl Observation {
    pub fn of(state: JobState) -> Self {
        Observation {
            state,
            slurm_state: None,
            message: None,
            start_time: None,
            end_time: None,
            nodes: vec![],
            metrics: None,
            log_tail: None,
            pipes: None,
            queue_reason: None,
            launcher: None,
            step_id: None,
            components: vec![],
            metrics_pending: false,
            observe_again_soon: false,
        }
    }
}

/// What happened since the last decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Nothing new: start-up, a spec change, or a periodic resync.
    Resync,
    /// The attempt's job exists (submitted now, or found by its tag and adopted).
    Submitted {
        job_id: String,
        run_dir: String,
        adopted: bool,
    },
    /// The submission failed for good (bad options, a payload that cannot be placed, ...).
    SubmitFailed {
        message: String,
    },
    Observed(Box<Observation>),
    /// A cancellation requested for a deletion has been carried out.
    CancelDone {
        message: String,
    },
    /// The run's environment is on the cluster.
    EnvReady {
        env: EnvStatus,
    },
    /// The environment could not be made. `transient`: try again later.
    EnvFailed {
        message: String,
        transient: bool,
    },
}

/// An effect for an adapter to perform.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Make the attempt's job exist: adopt a job carrying its tag, else submit one.
    Submit {
        run: u64,
        attempt: u32,
        delay: Option<Duration>,
    },
    /// Make the run's environment exist on the cluster (pack, upload, verify, publish),
    /// after `delay` if one is given.
    PrepareEnv { run: u64, delay: Option<Duration> },
    /// Keep observing the current job.
    Watch,
    /// Stop a job, or a submission in flight (found by its run dir). `report`: feed
    /// [`Event::CancelDone`] back when done (deletions); superseded runs need no answer.
    Cancel {
        job_id: Option<String>,
        run_dir: Option<String>,
        report: bool,
    },
    /// Remove a finished attempt's run directory.
    Cleanup { run_dir: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: SlurmAssetStatus,
    pub actions: Vec<Action>,
}

fn is_active(s: &SlurmAssetStatus) -> bool {
    s.run > 0
        && matches!(
            s.phase,
            Phase::Packing | Phase::Uploading | Phase::Submitting | Phase::Queued | Phase::Running
        )
}

/// Decides. Deterministic: the same arguments always give the same decision.
pub fn reconcile(prev: &SlurmAssetStatus, input: &Input, event: Event) -> Decision {
    let mut s = prev.clone();
    let mut actions = vec![];
    decide(&mut s, &mut actions, input, event);
    // Messages quote schedulers, files and users: bounded, whatever their source.
    if let Some(m) = &s.message
        && m.len() > crate::limits::MAX_MESSAGE
    {
        s.message = Some(crate::limits::truncate(m, crate::limits::MAX_MESSAGE));
    }
    update_conditions(&mut s, input);
    Decision { status: s, actions }
}

fn decide(s: &mut SlurmAssetStatus, actions: &mut Vec<Action>, input: &Input, event: Event) {
    if input.deleted {
        if let Event::CancelDone { message } = event {
            if is_active(s) || s.phase == Phase::Pending {
                finish(
                    s,
                    actions,
                    input,
                    Phase::Cancelled,
                    "Deleted",
                    Some(message),
                );
            }
        } else if is_active(s) || (s.phase == Phase::Pending && s.run > 0) {
            actions.push(cancel_current(s, true));
            s.message = Some("cancelling: the object is being deleted".into());
        }
        return;
    }

    if let Some(why) = input.invalid {
        let already = s.phase == Phase::Failed
            && s.reason.as_deref() == Some(REASON_INVALID)
            && s.observed_generation == Some(input.generation)
            && s.message.as_deref() == Some(why);
        if !already {
            supersede(s, actions);
            s.phase = Phase::Failed;
            s.reason = Some(REASON_INVALID.into());
            s.message = Some(why.to_string());
            s.observed_generation = Some(input.generation);
            s.run_key = input.run_key.map(str::to_string);
        }
        return;
    }

    let wants_new_run = s.run == 0
        || s.observed_generation != Some(input.generation)
        || s.run_key.as_deref() != input.run_key
        || (s.phase == Phase::Failed && s.reason.as_deref() == Some(REASON_INVALID));
    let suspended_here = s.phase == Phase::Pending
        && s.reason.as_deref() == Some("Suspended")
        && s.observed_generation == Some(input.generation);
    if wants_new_run && !suspended_here {
        supersede(s, actions);
        s.observed_generation = Some(input.generation);
        s.run_key = input.run_key.map(str::to_string);
        if input.suspend {
            s.phase = Phase::Pending;
            s.reason = Some("Suspended".into());
            s.message = Some("spec.suspend is true: no run starts".into());
            return;
        }
        s.run += 1;
        s.attempts = 1;
        s.reason = None;
        s.message = None;
        start_attempt(s, actions, input);
        return;
    }
    if suspended_here {
        return;
    }

    match event {
        Event::Resync | Event::CancelDone { .. } => match s.phase {
            Phase::Pending | Phase::Packing | Phase::Uploading | Phase::Submitting => {
                start_attempt(s, actions, input);
            }
            Phase::Queued | Phase::Running => actions.push(Action::Watch),
            // Ended, its metrics still to come from accounting: keep observing for them.
            Phase::Succeeded | Phase::Failed | Phase::Cancelled => {
                if metrics_awaited(s) {
                    actions.push(Action::Watch);
                }
            }
        },
        Event::Submitted {
            job_id,
            run_dir,
            adopted,
        } => {
            if matches!(
                s.phase,
                Phase::Pending | Phase::Packing | Phase::Uploading | Phase::Submitting
            ) {
                s.phase = Phase::Queued;
                s.job_id = Some(job_id);
                s.remote_run_dir = Some(run_dir);
                s.reason = adopted.then(|| "Adopted".to_string());
                s.message = None;
                if s.submit_time.is_none() {
                    s.submit_time = Some(input.now);
                }
                actions.push(Action::Watch);
            }
        }
        Event::EnvReady { env } => {
            if matches!(s.phase, Phase::Pending | Phase::Packing | Phase::Uploading) {
                s.env = Some(env);
                if s.reason.as_deref() == Some("EnvRetrying") {
                    s.reason = None;
                    s.message = None;
                }
                start_attempt(s, actions, input);
            }
        }
        Event::EnvFailed { message, transient } => {
            if !matches!(s.phase, Phase::Pending | Phase::Packing | Phase::Uploading) {
                return;
            }
            if transient {
                s.reason = Some("EnvRetrying".into());
                s.message = Some(format!(
                    "preparing the environment, retrying in {}s: {message}",
                    ENV_RETRY.as_secs()
                ));
                actions.push(Action::PrepareEnv {
                    run: s.run,
                    delay: Some(ENV_RETRY),
                });
            } else {
                finish(s, actions, input, Phase::Failed, "EnvFailed", Some(message));
            }
        }
        Event::SubmitFailed { message } => {
            if is_active(s) || s.phase == Phase::Pending {
                finish(
                    s,
                    actions,
                    input,
                    Phase::Failed,
                    "SubmitFailed",
                    Some(message),
                );
            }
        }
        Event::Observed(obs) => {
            if !is_active(s) {
                backfill_metrics(s, actions, input, &obs);
                return;
            }
            merge(s, &obs);
            if is_final_state(&obs.state) && obs.metrics_pending {
                await_metrics(s, input);
            }
            match obs.state {
                JobState::Unknown => actions.push(Action::Watch),
                JobState::Queued => {
                    s.phase = Phase::Queued;
                    // squeue's reason says why it waits ("None" while it is merely new).
                    match obs.queue_reason.filter(|r| r != "None" && !r.is_empty()) {
                        Some(r) => {
                            s.message = Some(format!("pending in the queue: {r}"));
                            s.reason = Some(r);
                        }
                        None if s.reason.as_deref() != Some("Adopted") => {
                            s.reason = None;
                            s.message = None;
                        }
                        None => {}
                    }
                    actions.push(Action::Watch);
                }
                JobState::Running => {
                    if s.phase == Phase::Queued && s.reason.as_deref() != Some("Adopted") {
                        s.reason = None;
                        s.message = None;
                    }
                    s.phase = Phase::Running;
                    actions.push(Action::Watch);
                }
                JobState::Exited { exit_code: 0 } => {
                    s.exit_code = Some(0);
                    finish(
                        s,
                        actions,
                        input,
                        Phase::Succeeded,
                        "Completed",
                        obs.message,
                    );
                }
                JobState::Exited { exit_code } => {
                    s.exit_code = Some(exit_code);
                    if input.retry_on_payload_failure && retry(s, actions, input, "NonZeroExit") {
                        return;
                    }
                    // A launcher that could not start its cluster names what failed.
                    if let Some(l) = s.launcher.clone()
                        && let Some(err) = l.error
                    {
                        let reason = l.reason.as_deref().unwrap_or("LauncherFailed");
                        finish(s, actions, input, Phase::Failed, reason, Some(err));
                        return;
                    }
                    let msg = obs
                        .message
                        .unwrap_or_else(|| format!("the payload exited with code {exit_code}"));
                    finish(s, actions, input, Phase::Failed, "NonZeroExit", Some(msg));
                }
                JobState::Killed { reason, exit_code } => {
                    s.exit_code = exit_code;
                    finish(s, actions, input, Phase::Failed, &reason, obs.message);
                }
                JobState::Cancelled { by } => {
                    let msg = by.map(|b| format!("cancelled by {b}"));
                    finish(
                        s,
                        actions,
                        input,
                        Phase::Cancelled,
                        "CancelledExternally",
                        msg.or(obs.message),
                    );
                }
                JobState::Infrastructure { reason } => {
                    if !retry(s, actions, input, &reason) {
                        finish(s, actions, input, Phase::Failed, &reason, obs.message);
                    }
                }
            }
        }
    }
}

fn is_final_state(state: &JobState) -> bool {
    !matches!(
        state,
        JobState::Queued | JobState::Running | JobState::Unknown
    )
}

fn metrics_awaited(s: &SlurmAssetStatus) -> bool {
    s.conditions
        .iter()
        .any(|c| c.type_ == METRICS_CONDITION && c.status == "False" && c.reason == "Awaiting")
}

/// The job ended while accounting was down: say so, and keep observing for the metrics.
fn await_metrics(s: &mut SlurmAssetStatus, input: &Input) {
    conditions::set(
        &mut s.conditions,
        METRICS_CONDITION,
        false,
        "Awaiting",
        &format!(
            "the job ended; its metrics are filled in once accounting (sacct) has recorded it, for up to {} minutes",
            METRICS_WAIT.as_secs() / 60
        ),
        Some(input.generation),
        input.now,
    );
}

/// After the end: metrics that accounting could not give then, filled in when it answers.
fn backfill_metrics(
    s: &mut SlurmAssetStatus,
    actions: &mut Vec<Action>,
    input: &Input,
    obs: &Observation,
) {
    if !s.phase.is_terminal() || !metrics_awaited(s) {
        return;
    }
    let g = Some(input.generation);
    if obs.metrics.is_some() && !obs.metrics_pending {
        s.metrics = obs.metrics.clone();
        merge_components(&mut s.components, &obs.components);
        if obs.slurm_state.is_some() {
            s.slurm_state = obs.slurm_state.clone();
        }
        // An end learnt from the exit file came before accounting: what only accounting
        // knows (the allocation's nodes, its start) arrives with the metrics.
        if s.nodes.is_empty() && !obs.nodes.is_empty() {
            s.nodes = obs.nodes.clone();
        }
        if s.start_time.is_none() {
            s.start_time = obs.start_time;
        }
        conditions::set(
            &mut s.conditions,
            METRICS_CONDITION,
            true,
            "Accounting",
            "",
            g,
            input.now,
        );
        forget_removed_run_dir(s, input);
        return;
    }
    let ended = s.end_time.unwrap_or(input.now);
    let waited = input.now.duration_since(ended).unsigned_abs();
    if waited > METRICS_WAIT {
        conditions::set(
            &mut s.conditions,
            METRICS_CONDITION,
            false,
            "AccountingUnavailable",
            "accounting (sacct) did not answer within the wait after the job ended: metrics are unavailable for this run",
            g,
            input.now,
        );
        forget_removed_run_dir(s, input);
        return;
    }
    actions.push(Action::Watch);
}

/// Starts the next attempt of the current run if the policy allows; returns whether it did.
fn retry(s: &mut SlurmAssetStatus, actions: &mut Vec<Action>, input: &Input, reason: &str) -> bool {
    if s.attempts > input.retry_limit {
        return false;
    }
    let failed_job = s.job_id.take().unwrap_or_default();
    s.attempts += 1;
    s.phase = Phase::Pending;
    s.reason = Some("Retrying".into());
    s.message = Some(format!(
        "attempt {} (job {failed_job}) ended with {reason}; resubmitting in {}s",
        s.attempts - 1,
        input.retry_backoff.as_secs()
    ));
    clear_job_fields(s);
    actions.push(Action::Submit {
        run: s.run,
        attempt: s.attempts,
        delay: Some(input.retry_backoff),
    });
    true
}

fn finish(
    s: &mut SlurmAssetStatus,
    actions: &mut Vec<Action>,
    input: &Input,
    phase: Phase,
    reason: &str,
    message: Option<String>,
) {
    s.phase = phase;
    s.reason = Some(reason.to_string());
    s.message = message;
    if s.end_time.is_none() && s.job_id.is_some() {
        s.end_time = Some(input.now);
    }
    if run_dir_removed(phase, input)
        && let Some(dir) = &s.remote_run_dir
    {
        actions.push(Action::Cleanup {
            run_dir: dir.clone(),
        });
    }
    if metrics_awaited(s) && !input.deleted {
        actions.push(Action::Watch);
    } else {
        forget_removed_run_dir(s, input);
    }
}

/// Whether a run that ended in `phase` has its run dir removed (kept for debugging, and
/// after a failure unless `cleanupOnFailure`).
fn run_dir_removed(phase: Phase, input: &Input) -> bool {
    !input.debug && (phase == Phase::Succeeded || input.cleanup_on_failure)
}

/// Once nothing more is read from a removed run dir (its metrics come from accounting),
/// status stops naming it: a user would look for a directory that is not there.
fn forget_removed_run_dir(s: &mut SlurmAssetStatus, input: &Input) {
    if s.phase.is_terminal() && run_dir_removed(s.phase, input) {
        s.remote_run_dir = None;
    }
}

/// The action that cancels the current attempt. Its job, if Slurm gave it one, is cancelled
/// by that action: no later poll reads its state, so the last polled state (say PENDING) must
/// not stand.
fn cancel_current(s: &mut SlurmAssetStatus, report: bool) -> Action {
    if s.job_id.is_some() {
        s.slurm_state = Some("CANCELLED".into());
    }
    Action::Cancel {
        job_id: s.job_id.clone(),
        run_dir: s.remote_run_dir.clone(),
        report,
    }
}

/// Closes the current run (cancelling it if still active) and records it in `history`.
fn supersede(s: &mut SlurmAssetStatus, actions: &mut Vec<Action>) {
    if s.run == 0 {
        return;
    }
    if is_active(s) {
        actions.push(cancel_current(s, false));
        s.phase = Phase::Cancelled;
        s.reason = Some("Superseded".into());
    }
    if s.history.first().map(|h| h.run) != Some(s.run) {
        s.history.insert(
            0,
            RunSummary {
                run: s.run,
                observed_generation: s.observed_generation,
                run_key: s.run_key.clone(),
                phase: s.phase,
                reason: s.reason.clone(),
                job_id: s.job_id.clone(),
                exit_code: s.exit_code,
                attempts: s.attempts,
                start_time: s.start_time,
                end_time: s.end_time,
            },
        );
        s.history.truncate(HISTORY_LIMIT);
    }
    s.attempts = 0;
    s.exit_code = None;
    s.reason = None;
    s.message = None;
    s.job_id = None;
    s.env = None;
    clear_job_fields(s);
}

/// Starts (or resumes) the current attempt: its environment first, when it needs one that
/// is not ready, then its submission.
fn start_attempt(s: &mut SlurmAssetStatus, actions: &mut Vec<Action>, input: &Input) {
    let env_ready = s.env.as_ref().is_some_and(|e| e.path.is_some());
    if input.needs_env && !env_ready {
        s.phase = Phase::Packing;
        actions.push(Action::PrepareEnv {
            run: s.run,
            delay: None,
        });
    } else {
        s.phase = Phase::Submitting;
        actions.push(Action::Submit {
            run: s.run,
            attempt: s.attempts.max(1),
            delay: None,
        });
    }
}

/// How long after a failed attempt to reach the cluster an environment is tried again.
pub const ENV_RETRY: Duration = Duration::from_secs(10);

/// Clears what belongs to one attempt's job. The run's environment stays: a retry of the
/// same run uses the same environment.
fn clear_job_fields(s: &mut SlurmAssetStatus) {
    s.conditions.retain(|c| c.type_ != METRICS_CONDITION);
    s.slurm_state = None;
    s.submit_time = None;
    s.start_time = None;
    s.end_time = None;
    s.nodes.clear();
    s.metrics = None;
    s.pipes = None;
    s.log_tail = None;
    s.launcher = None;
    s.step_id = None;
    s.components.clear();
    s.remote_run_dir = None;
    s.exit_code = None;
}

fn merge(s: &mut SlurmAssetStatus, o: &Observation) {
    if o.slurm_state.is_some() {
        s.slurm_state = o.slurm_state.clone();
    }
    if o.start_time.is_some() {
        s.start_time = o.start_time;
    }
    if o.end_time.is_some() {
        s.end_time = o.end_time;
    }
    // An attempt's allocation never shrinks; a COMPLETING job lists only the nodes still busy.
    if o.nodes.len() >= s.nodes.len() && !o.nodes.is_empty() {
        s.nodes = o.nodes.clone();
    }
    if o.metrics.is_some() {
        s.metrics = o.metrics.clone();
    }
    if o.log_tail.is_some() {
        s.log_tail = o.log_tail.clone();
    }
    if o.pipes.is_some() {
        s.pipes = o.pipes.clone();
    }
    if o.launcher.is_some() {
        s.launcher = o.launcher.clone();
    }
    if o.step_id.is_some() {
        s.step_id = o.step_id.clone();
    }
    merge_components(&mut s.components, &o.components);
}

/// A component's figures as they arrive: what an observation lacks (a run dir cleaned up
/// after the end holds no logs any more; accounting lags) stays as seen before, and the
/// payload's own exit code stays first.
fn merge_components(
    known: &mut Vec<crate::api::ComponentStatus>,
    seen: &[crate::api::ComponentStatus],
) {
    if seen.is_empty() {
        return;
    }
    let mut merged = seen.to_vec();
    for m in &mut merged {
        if let Some(k) = known.iter().find(|k| k.name == m.name) {
            m.exit_code = k.exit_code.or(m.exit_code);
            if m.nodes.is_empty() {
                m.nodes = k.nodes.clone();
            }
            m.log_tail = m.log_tail.take().or_else(|| k.log_tail.clone());
            m.pipes = m.pipes.take().or_else(|| k.pipes.clone());
            m.launcher = m.launcher.take().or_else(|| k.launcher.clone());
            m.metrics = m.metrics.take().or_else(|| k.metrics.clone());
            m.slurm_state = m.slurm_state.take().or_else(|| k.slurm_state.clone());
        }
    }
    *known = merged;
}

fn update_conditions(s: &mut SlurmAssetStatus, input: &Input) {
    let g = Some(input.generation);
    let now = input.now;
    let invalid = input.invalid.is_some() && !input.deleted;
    let msg = s.message.clone().unwrap_or_default();
    let reason = s.reason.clone().unwrap_or_else(|| s.phase.as_str().into());
    let c = &mut s.conditions;
    if invalid {
        conditions::set(c, "Invalid", true, REASON_INVALID, &msg, g, now);
    } else {
        conditions::set(c, "Invalid", false, "Valid", "", g, now);
    }
    let running = matches!(s.phase, Phase::Queued | Phase::Running)
        || (s.phase == Phase::Submitting && s.run > 0);
    conditions::set(c, "Running", running, s.phase.as_str(), "", g, now);
    let complete = s.phase == Phase::Succeeded;
    conditions::set(
        c,
        "Complete",
        complete,
        if complete { &reason } else { "NotSucceeded" },
        "",
        g,
        now,
    );
    let failed = s.phase == Phase::Failed;
    conditions::set(
        c,
        "Failed",
        failed,
        if failed { &reason } else { "NotFailed" },
        if failed { &msg } else { "" },
        g,
        now,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sec: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + sec).unwrap()
    }

    fn input(generation: i64) -> Input<'static> {
        Input {
            generation,
            run_key: None,
            invalid: None,
            suspend: false,
            retry_limit: 0,
            retry_backoff: Duration::from_secs(5),
            retry_on_payload_failure: false,
            cleanup_on_failure: false,
            debug: false,
            deleted: false,
            needs_env: false,
            now: t(0),
        }
    }

    fn submitted(job: &str) -> Event {
        Event::Submitted {
            job_id: job.into(),
            run_dir: format!("/runs/{job}"),
            adopted: false,
        }
    }

    fn observed(state: JobState) -> Event {
        Event::Observed(Box::new(Observation::of(state)))
    }

    /// Drives a fresh object to the given phase of run 1.
    fn at(phase: Phase) -> SlurmAssetStatus {
        let i = input(1);
        let mut s = reconcile(&SlurmAssetStatus::default(), &i, Event::Resync).status;
        if phase == Phase::Submitting {
            return s;
        }
        s = reconcile(&s, &i, submitted("100")).status;
        match phase {
            Phase::Queued => s,
            Phase::Running => reconcile(&s, &i, observed(JobState::Running)).status,
            Phase::Succeeded => {
                reconcile(&s, &i, observed(JobState::Exited { exit_code: 0 })).status
            }
            Phase::Failed => reconcile(&s, &i, observed(JobState::Exited { exit_code: 3 })).status,
            Phase::Cancelled => {
                reconcile(&s, &i, observed(JobState::Cancelled { by: None })).status
            }
            other => panic!("no path to {other:?}"),
        }
    }

    #[test]
    fn first_reconcile_starts_run_one() {
        let d = reconcile(&SlurmAssetStatus::default(), &input(1), Event::Resync);
        assert_eq!(d.status.phase, Phase::Submitting);
        assert_eq!(d.status.run, 1);
        assert_eq!(d.status.attempts, 1);
        assert_eq!(d.status.observed_generation, Some(1));
        assert_eq!(
            d.actions,
            vec![Action::Submit {
                run: 1,
                attempt: 1,
                delay: None
            }]
        );
    }

    #[test]
    fn a_run_that_packs_prepares_its_environment_before_submitting() {
        let i = Input {
            needs_env: true,
            ..input(1)
        };
        let d = reconcile(&SlurmAssetStatus::default(), &i, Event::Resync);
        assert_eq!(d.status.phase, Phase::Packing);
        assert_eq!(
            d.actions,
            vec![Action::PrepareEnv {
                run: 1,
                delay: None
            }]
        );
        // A resync while packing asks again (the preparation is single-flight).
        let again = reconcile(&d.status, &i, Event::Resync);
        assert_eq!(again.status.phase, Phase::Packing);
        // The cluster could not be reached: retried later, the run stays.
        let down = reconcile(
            &d.status,
            &i,
            Event::EnvFailed {
                message: "ssh: refused".into(),
                transient: true,
            },
        );
        assert_eq!(down.status.phase, Phase::Packing);
        assert_eq!(
            down.actions,
            vec![Action::PrepareEnv {
                run: 1,
                delay: Some(ENV_RETRY)
            }]
        );
        let env = EnvStatus {
            cache_key: Some("k".into()),
            cache_hit: Some(false),
            path: Some("/base/env-cache/k".into()),
            ..Default::default()
        };
        let ready = reconcile(&down.status, &i, Event::EnvReady { env: env.clone() });
        assert_eq!(ready.status.phase, Phase::Submitting);
        assert_eq!(ready.status.env.as_ref(), Some(&env));
        assert_eq!(ready.status.reason, None);
        assert_eq!(
            ready.actions,
            vec![Action::Submit {
                run: 1,
                attempt: 1,
                delay: None
            }]
        );
        // A retried attempt keeps the run's environment; a new run prepares its own.
        let queued = reconcile(&ready.status, &i, submitted("7")).status;
        let retried = reconcile(
            &queued,
            &Input {
                retry_limit: 1,
                ..i.clone()
            },
            observed(JobState::Infrastructure {
                reason: "NODE_FAIL".into(),
            }),
        );
        assert_eq!(retried.status.env.as_ref(), Some(&env));
        let next = reconcile(&retried.status, &input(2), Event::Resync);
        assert_eq!(next.status.env, None);
        // A spec that cannot be packed fails the run, saying why.
        let bad = reconcile(
            &d.status,
            &i,
            Event::EnvFailed {
                message: "uv pip install failed".into(),
                transient: false,
            },
        );
        assert_eq!(bad.status.phase, Phase::Failed);
        assert_eq!(bad.status.reason.as_deref(), Some("EnvFailed"));
    }

    #[test]
    fn happy_path_to_succeeded_with_cleanup() {
        let i = input(1);
        let s = at(Phase::Queued);
        assert_eq!(s.job_id.as_deref(), Some("100"));
        assert_eq!(s.submit_time, Some(t(0)));
        let mut obs = Observation::of(JobState::Running);
        obs.start_time = Some(t(1));
        obs.nodes = vec!["n1".into()];
        let d = reconcile(&s, &i, Event::Observed(Box::new(obs)));
        assert_eq!(d.status.phase, Phase::Running);
        assert_eq!(d.actions, vec![Action::Watch]);
        assert!(conditions::is_true(&d.status.conditions, "Running"));
        let d = reconcile(&d.status, &i, observed(JobState::Exited { exit_code: 0 }));
        assert_eq!(d.status.phase, Phase::Succeeded);
        assert_eq!(d.status.exit_code, Some(0));
        assert_eq!(d.status.nodes, vec!["n1".to_string()]);
        assert_eq!(
            d.actions,
            vec![Action::Cleanup {
                run_dir: "/runs/100".into()
            }]
        );
        assert!(conditions::is_true(&d.status.conditions, "Complete"));
        assert!(!conditions::is_true(&d.status.conditions, "Running"));
        // Removed, it is no longer named.
        assert_eq!(d.status.remote_run_dir, None);
    }

    #[test]
    fn an_end_before_accounting_keeps_being_watched_for_metrics_across_resyncs() {
        let i = input(1);
        let s = at(Phase::Running);
        let mut obs = Observation::of(JobState::Exited { exit_code: 0 });
        obs.metrics_pending = true;
        let d = reconcile(&s, &i, Event::Observed(Box::new(obs)));
        assert_eq!(d.status.phase, Phase::Succeeded);
        assert!(d.actions.contains(&Action::Watch));
        // Still watched, the job is still found by its run dir; with the metrics it is not.
        assert!(d.status.remote_run_dir.is_some());
        // A later reconcile (Kubernetes reconciles each object afresh) still watches.
        let d = reconcile(&d.status, &i, Event::Resync);
        assert_eq!(d.actions, vec![Action::Watch]);
        // Once the metrics arrive, nothing is left to watch.
        let mut obs = Observation::of(JobState::Exited { exit_code: 0 });
        obs.metrics = Some(Default::default());
        obs.nodes = vec!["n2".into()];
        obs.start_time = Some(t(1));
        let d = reconcile(&d.status, &i, Event::Observed(Box::new(obs)));
        assert!(conditions::is_true(&d.status.conditions, METRICS_CONDITION));
        assert_eq!(d.status.remote_run_dir, None);
        // With them, what only accounting knew: the nodes and the start.
        assert_eq!(d.status.nodes, vec!["n2".to_string()]);
        assert_eq!(d.status.start_time, Some(t(1)));
        assert!(reconcile(&d.status, &i, Event::Resync).actions.is_empty());
    }

    #[test]
    fn debug_keeps_run_dir_and_failures_keep_it_unless_asked() {
        let mut i = input(1);
        i.debug = true;
        let s = at(Phase::Running);
        assert!(
            reconcile(&s, &i, observed(JobState::Exited { exit_code: 0 }))
                .actions
                .is_empty()
        );
        let i = input(1);
        let kept = reconcile(&s, &i, observed(JobState::Exited { exit_code: 1 }));
        assert!(kept.actions.is_empty());
        assert_eq!(kept.status.remote_run_dir.as_deref(), Some("/runs/100"));
        let mut i = input(1);
        i.cleanup_on_failure = true;
        assert_eq!(
            reconcile(&s, &i, observed(JobState::Exited { exit_code: 1 })).actions,
            vec![Action::Cleanup {
                run_dir: "/runs/100".into()
            }]
        );
    }

    #[test]
    fn non_zero_exit_fails_with_code() {
        let s = at(Phase::Failed);
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.exit_code, Some(3));
        assert_eq!(s.reason.as_deref(), Some("NonZeroExit"));
        assert!(conditions::is_true(&s.conditions, "Failed"));
    }

    #[test]
    fn scheduler_kill_fails_with_its_reason() {
        let d = reconcile(
            &at(Phase::Running),
            &input(1),
            observed(JobState::Killed {
                reason: "TIMEOUT".into(),
                exit_code: None,
            }),
        );
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.reason.as_deref(), Some("TIMEOUT"));
    }

    #[test]
    fn external_cancel() {
        let s = at(Phase::Cancelled);
        assert_eq!(s.phase, Phase::Cancelled);
        assert_eq!(s.reason.as_deref(), Some("CancelledExternally"));
    }

    #[test]
    fn infrastructure_failure_retries_within_limit() {
        let mut i = input(1);
        i.retry_limit = 1;
        let s = at(Phase::Running);
        let infra = || {
            observed(JobState::Infrastructure {
                reason: "NODE_FAIL".into(),
            })
        };
        let d = reconcile(&s, &i, infra());
        assert_eq!(d.status.phase, Phase::Pending);
        assert_eq!(d.status.attempts, 2);
        assert_eq!(d.status.job_id, None);
        assert_eq!(
            d.actions,
            vec![Action::Submit {
                run: 1,
                attempt: 2,
                delay: Some(Duration::from_secs(5))
            }]
        );
        let s = reconcile(&d.status, &i, submitted("101")).status;
        assert_eq!(s.phase, Phase::Queued);
        let d = reconcile(&s, &i, infra());
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.reason.as_deref(), Some("NODE_FAIL"));
        assert_eq!(d.status.attempts, 2);
    }

    #[test]
    fn payload_failure_is_not_retried_unless_asked() {
        let mut i = input(1);
        i.retry_limit = 2;
        let s = at(Phase::Running);
        assert_eq!(
            reconcile(&s, &i, observed(JobState::Exited { exit_code: 1 }))
                .status
                .phase,
            Phase::Failed
        );
        i.retry_on_payload_failure = true;
        assert_eq!(
            reconcile(&s, &i, observed(JobState::Exited { exit_code: 1 }))
                .status
                .phase,
            Phase::Pending
        );
    }

    #[test]
    fn invalid_spec_fails_with_message_and_condition() {
        let mut i = input(1);
        i.invalid = Some("spec.resources.mem: invalid memory quantity \"lots\"");
        let d = reconcile(&SlurmAssetStatus::default(), &i, Event::Resync);
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.reason.as_deref(), Some(REASON_INVALID));
        assert_eq!(d.status.run, 0);
        assert!(d.actions.is_empty());
        assert!(conditions::is_true(&d.status.conditions, "Invalid"));
        // Idempotent: the same facts give the same status.
        assert_eq!(reconcile(&d.status, &i, Event::Resync).status, d.status);
        // Fixed spec (new generation) starts run 1.
        let d2 = reconcile(&d.status, &input(2), Event::Resync);
        assert_eq!(d2.status.run, 1);
        assert_eq!(d2.status.phase, Phase::Submitting);
        assert!(!conditions::is_true(&d2.status.conditions, "Invalid"));
    }

    #[test]
    fn invalid_reference_that_becomes_valid_starts_a_run() {
        let mut i = input(1);
        i.invalid = Some("spec.clusterRef: SlurmCluster \"c\" not found");
        let s = reconcile(&SlurmAssetStatus::default(), &i, Event::Resync).status;
        let d = reconcile(&s, &input(1), Event::Resync);
        assert_eq!(d.status.run, 1);
        assert_eq!(d.status.phase, Phase::Submitting);
    }

    #[test]
    fn spec_becoming_invalid_cancels_the_active_run() {
        let mut i = input(2);
        i.invalid = Some("spec.payload: bad");
        let d = reconcile(&at(Phase::Running), &i, Event::Resync);
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(
            d.actions,
            vec![Action::Cancel {
                job_id: Some("100".into()),
                run_dir: Some("/runs/100".into()),
                report: false
            }]
        );
        assert_eq!(d.status.history[0].phase, Phase::Cancelled);
        assert_eq!(d.status.history[0].reason.as_deref(), Some("Superseded"));
    }

    #[test]
    fn spec_change_starts_new_run_and_keeps_history() {
        let done = at(Phase::Succeeded);
        let d = reconcile(&done, &input(2), Event::Resync);
        assert_eq!(d.status.run, 2);
        assert_eq!(d.status.observed_generation, Some(2));
        assert_eq!(d.status.phase, Phase::Submitting);
        assert_eq!(d.status.job_id, None);
        assert_eq!(d.status.exit_code, None);
        assert_eq!(d.status.history.len(), 1);
        assert_eq!(d.status.history[0].run, 1);
        assert_eq!(d.status.history[0].phase, Phase::Succeeded);
        assert_eq!(d.status.history[0].job_id.as_deref(), Some("100"));
        assert_eq!(
            d.actions,
            vec![Action::Submit {
                run: 2,
                attempt: 1,
                delay: None
            }]
        );
    }

    #[test]
    fn spec_change_while_running_cancels_old_job_first() {
        let d = reconcile(&at(Phase::Running), &input(2), Event::Resync);
        assert_eq!(
            d.actions,
            vec![
                Action::Cancel {
                    job_id: Some("100".into()),
                    run_dir: Some("/runs/100".into()),
                    report: false
                },
                Action::Submit {
                    run: 2,
                    attempt: 1,
                    delay: None
                },
            ]
        );
        assert_eq!(d.status.history[0].reason.as_deref(), Some("Superseded"));
    }

    #[test]
    fn run_key_change_starts_new_run() {
        let mut i = input(1);
        i.run_key = Some("dagster-run-2");
        let d = reconcile(&at(Phase::Succeeded), &i, Event::Resync);
        assert_eq!(d.status.run, 2);
        assert_eq!(d.status.run_key.as_deref(), Some("dagster-run-2"));
        assert_eq!(d.status.observed_generation, Some(1));
    }

    #[test]
    fn history_is_bounded() {
        let mut s = at(Phase::Succeeded);
        for g in 2..30 {
            s = reconcile(&s, &input(g), Event::Resync).status;
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history[0].run, 28);
    }

    /// After an operator restart the core sees only the persisted status and `Resync`.
    #[test]
    fn restart_in_every_phase() {
        let i = input(1);
        for phase in [
            Phase::Submitting,
            Phase::Queued,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
            Phase::Cancelled,
        ] {
            let s = at(phase);
            let d = reconcile(&s, &i, Event::Resync);
            let expected = match phase {
                Phase::Submitting => vec![Action::Submit {
                    run: 1,
                    attempt: 1,
                    delay: None,
                }],
                Phase::Queued | Phase::Running => vec![Action::Watch],
                _ => vec![],
            };
            assert_eq!(d.actions, expected, "restart in {phase:?}");
            assert_eq!(d.status.run, 1, "no new run on restart in {phase:?}");
            assert_eq!(d.status.phase, phase);
        }
        // Pending/Packing/Uploading (a retry in backoff, or packing cut short) resume submission.
        for phase in [Phase::Pending, Phase::Packing, Phase::Uploading] {
            let mut s = at(Phase::Submitting);
            s.phase = phase;
            let d = reconcile(&s, &i, Event::Resync);
            assert_eq!(d.status.phase, Phase::Submitting);
            assert_eq!(
                d.actions,
                vec![Action::Submit {
                    run: 1,
                    attempt: 1,
                    delay: None
                }]
            );
        }
    }

    #[test]
    fn adoption_after_restart_is_recorded() {
        let s = at(Phase::Submitting);
        let d = reconcile(
            &s,
            &input(1),
            Event::Submitted {
                job_id: "7".into(),
                run_dir: "/r".into(),
                adopted: true,
            },
        );
        assert_eq!(d.status.phase, Phase::Queued);
        assert_eq!(d.status.reason.as_deref(), Some("Adopted"));
        assert_eq!(d.status.run, 1);
    }

    #[test]
    fn deletion_cancels_then_ends_cancelled() {
        let mut i = input(1);
        i.deleted = true;
        let d = reconcile(&at(Phase::Running), &i, Event::Resync);
        assert_eq!(
            d.actions,
            vec![Action::Cancel {
                job_id: Some("100".into()),
                run_dir: Some("/runs/100".into()),
                report: true
            }]
        );
        let d = reconcile(
            &d.status,
            &i,
            Event::CancelDone {
                message: "terminated".into(),
            },
        );
        assert_eq!(d.status.phase, Phase::Cancelled);
        assert_eq!(d.status.reason.as_deref(), Some("Deleted"));
        assert_eq!(d.status.end_time, Some(t(0)));
        // A terminal object needs nothing on deletion.
        assert!(
            reconcile(&at(Phase::Succeeded), &i, Event::Resync)
                .actions
                .is_empty()
        );
        // A submission in flight is cancelled by its run dir.
        let d = reconcile(&at(Phase::Submitting), &i, Event::Resync);
        assert_eq!(
            d.actions,
            vec![Action::Cancel {
                job_id: None,
                run_dir: None,
                report: true
            }]
        );
    }

    #[test]
    fn a_job_the_operator_cancels_reads_cancelled_not_its_last_polled_state() {
        let mut queued = at(Phase::Queued);
        queued.slurm_state = Some("PENDING".into());
        let mut i = input(1);
        i.deleted = true;
        let d = reconcile(&queued, &i, Event::Resync);
        let d = reconcile(
            &d.status,
            &i,
            Event::CancelDone {
                message: "terminated".into(),
            },
        );
        assert_eq!(d.status.phase, Phase::Cancelled);
        assert_eq!(d.status.slurm_state.as_deref(), Some("CANCELLED"));

        // A submission cancelled before Slurm gave a job ID has no Slurm state.
        let mut i = input(1);
        i.deleted = true;
        let d = reconcile(&at(Phase::Submitting), &i, Event::Resync);
        let d = reconcile(
            &d.status,
            &i,
            Event::CancelDone {
                message: "terminated".into(),
            },
        );
        assert_eq!(d.status.slurm_state, None);
    }

    #[test]
    fn stale_events_are_ignored() {
        let done = at(Phase::Succeeded);
        let i = input(1);
        assert_eq!(
            reconcile(&done, &i, observed(JobState::Running)).status,
            done
        );
        assert_eq!(reconcile(&done, &i, submitted("9")).status, done);
        assert_eq!(
            reconcile(
                &done,
                &i,
                Event::SubmitFailed {
                    message: "x".into()
                }
            )
            .status,
            done
        );
    }

    #[test]
    fn submit_failure_fails_the_run() {
        let d = reconcile(
            &at(Phase::Submitting),
            &input(1),
            Event::SubmitFailed {
                message: "sbatch: error: invalid partition".into(),
            },
        );
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.reason.as_deref(), Some("SubmitFailed"));
        assert_eq!(
            d.status.message.as_deref(),
            Some("sbatch: error: invalid partition")
        );
    }

    #[test]
    fn suspend_blocks_new_runs_until_lifted() {
        let mut i = input(1);
        i.suspend = true;
        let d = reconcile(&SlurmAssetStatus::default(), &i, Event::Resync);
        assert_eq!(d.status.phase, Phase::Pending);
        assert_eq!(d.status.reason.as_deref(), Some("Suspended"));
        assert!(d.actions.is_empty());
        assert!(reconcile(&d.status, &i, Event::Resync).actions.is_empty());
        let d = reconcile(&d.status, &input(2), Event::Resync);
        assert_eq!(d.status.run, 1);
    }

    #[test]
    fn condition_times_are_stable_across_resyncs() {
        let s = at(Phase::Running);
        let mut later = input(1);
        later.now = t(100);
        let d = reconcile(&s, &later, Event::Resync);
        assert_eq!(d.status.conditions, s.conditions);
    }
}
