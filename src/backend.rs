//! Where one asset's jobs run, as one handle: the local executor or a Slurm cluster's
//! executor. [`drive`] carries out the core's actions through it; Kubernetes mode uses it per
//! reconcile.

use crate::api::SlurmAssetStatus;
use crate::core::{self, Action, Event, Input, Observation};
use crate::executor::JobRef;
use crate::executor::local::LocalExecutor;
use crate::executor::slurm::SlurmExecutor;
use crate::jobscript::RunPlan;
use crate::pipes::MessageReader;
use crate::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub enum Backend {
    Local(LocalExecutor),
    Slurm(Arc<SlurmExecutor>),
}

/// Builds the plan of one attempt, given the remote home (Slurm) or `None` (local).
pub type PlanFn<'a> =
    dyn Fn(u64, u32, Option<&str>) -> std::result::Result<RunPlan, String> + Send + Sync + 'a;

/// Prepares the run's environment (the adapter knows where its sources come from).
pub type PrepareFn<'a> = dyn Fn() -> futures::future::BoxFuture<
        'a,
        Result<crate::api::EnvStatus, crate::environment::EnvError>,
    > + Send
    + Sync
    + 'a;

/// Whether a submission may go ahead now: a session's step waits for its allocation, and
/// fails when the session cannot take it.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Gate {
    #[default]
    Open,
    /// Not yet: the reason goes into the status message; asked again after the delay.
    Wait(String, Duration),
    /// Never: the submission fails with this message.
    Refuse(String),
}

/// What [`drive`] needs to know about the asset beyond its status.
pub struct Work<'a> {
    pub backend: Backend,
    pub gate: Gate,
    /// How the run's environment is prepared, if it packs one.
    pub env: Option<&'a PrepareFn<'a>>,
    pub plan: &'a PlanFn<'a>,
    /// The tag of the current attempt (cancellation by name before a job ID is known).
    pub tag: String,
    pub job: JobRef,
    pub requested_mem: Option<u64>,
    /// The cluster's poll interval (Slurm jobs are observed in one batch per interval).
    pub poll: Duration,
}

/// The result of driving: the new status, whether to keep watching, and a delay after which a
/// (re)submission is due.
pub struct Driven {
    pub status: SlurmAssetStatus,
    pub watch: bool,
    pub submit_after: Option<Duration>,
    /// The job just ended and its last figures are due within seconds: look again soon.
    pub again_soon: bool,
}

impl Backend {
    /// Submits or adopts; `Ok(None)`: the cluster could not be reached, try again later.
    pub async fn submit(
        &self,
        plan: &(dyn Fn(Option<&str>) -> std::result::Result<RunPlan, String> + Send + Sync),
    ) -> Result<Event> {
        let result = match self {
            Backend::Local(l) => {
                let p = plan(None).map_err(Error::Executor)?;
                l.submit(&p)
                    .await
                    .map_err(|e| Error::Executor(e.to_string()))
            }
            Backend::Slurm(s) => {
                let facts = s.facts().await?;
                let p = plan(Some(&facts.home)).map_err(Error::Executor)?;
                match s.submit(&p).await? {
                    Ok(sub) => Ok(sub),
                    Err(msg) => return Ok(Event::SubmitFailed { message: msg }),
                }
            }
        };
        Ok(match result {
            Ok(s) => Event::Submitted {
                job_id: s.job_id,
                run_dir: s.run_dir,
                adopted: s.adopted,
            },
            Err(Error::Executor(message)) => Event::SubmitFailed { message },
            Err(e) => return Err(e),
        })
    }

    pub async fn cancel(
        &self,
        job_id: Option<&str>,
        run_dir: Option<&str>,
        tag: &str,
    ) -> Result<String> {
        match self {
            Backend::Local(l) => l.cancel(job_id, run_dir).await,
            Backend::Slurm(s) => s.cancel(job_id, tag, run_dir).await,
        }
    }

    pub async fn cleanup(&self, run_dir: &str) -> Result<()> {
        match self {
            Backend::Local(l) => l.cleanup(run_dir),
            Backend::Slurm(s) => s.cleanup(run_dir).await,
        }
    }

    /// Observes one job. Slurm jobs go through the cluster's shared batch, so that
    /// per-asset reconciles still cost one scheduler query per cluster per `poll`.
    pub async fn observe(
        &self,
        job: &JobRef,
        requested_mem: Option<u64>,
        poll: Duration,
        reader: &mut MessageReader,
    ) -> Result<Option<Observation>> {
        match self {
            Backend::Local(l) => Ok(Some(l.observe(job, reader))),
            Backend::Slurm(s) => s.observe_shared(job, requested_mem, poll).await,
        }
    }
}

/// Feeds `event` to the core and carries out its actions, observing the job once when the
/// core asks to watch it. Transport errors leave the status as it is (never a failure).
pub async fn drive(
    mut status: SlurmAssetStatus,
    input: &Input<'_>,
    mut event: Event,
    work: &Work<'_>,
    reader: &mut MessageReader,
) -> Driven {
    let mut observed = false;
    let mut submit_after = None;
    let mut again_soon = false;
    let mut watch = false;
    for _ in 0..8 {
        let decision = core::reconcile(&status, input, event);
        status = decision.status;
        watch = false;
        let mut next = None;
        for action in decision.actions {
            match action {
                Action::Submit { delay: Some(d), .. } => submit_after = Some(d),
                Action::PrepareEnv { delay: Some(d), .. } => submit_after = Some(d),
                Action::PrepareEnv { delay: None, .. } => {
                    next = Some(match work.env {
                        Some(prepare) => match prepare().await {
                            Ok(env) => Event::EnvReady { env },
                            Err(e) => {
                                tracing::warn!("environment: {}", e.message);
                                Event::EnvFailed {
                                    message: e.message,
                                    transient: e.transient,
                                }
                            }
                        },
                        None => Event::EnvFailed {
                            message: "no environment to prepare".into(),
                            transient: false,
                        },
                    });
                }
                Action::Submit { delay: None, .. } if work.gate != Gate::Open => match &work.gate {
                    Gate::Wait(why, again) => {
                        status.message = Some(why.clone());
                        submit_after = Some(*again);
                    }
                    Gate::Refuse(why) => {
                        next = Some(Event::SubmitFailed {
                            message: why.clone(),
                        })
                    }
                    Gate::Open => {}
                },
                Action::Submit {
                    run,
                    attempt,
                    delay: None,
                } => {
                    let env = status.env.clone();
                    let plan = |home: Option<&str>| {
                        (work.plan)(run, attempt, home).map(|mut p| {
                            p.use_env(env.as_ref());
                            p
                        })
                    };
                    match work.backend.submit(&plan).await {
                        Ok(ev) => next = Some(ev),
                        Err(e @ Error::Fenced { .. }) => {
                            // A newer leader submitted for this asset. Say so on the object:
                            // if this replica is the leader after all, someone must look.
                            tracing::error!("submission refused: {e}");
                            status.message = Some(format!("submission refused: {e}"));
                            submit_after = Some(Duration::from_secs(60));
                        }
                        Err(e) => {
                            tracing::warn!("submission deferred: {e}");
                            status.message = Some(format!("cluster unreachable, retrying: {e}"));
                            submit_after = Some(Duration::from_secs(5));
                        }
                    }
                }
                Action::Watch => watch = true,
                Action::Cancel {
                    job_id,
                    run_dir,
                    report,
                } => {
                    match work
                        .backend
                        .cancel(job_id.as_deref(), run_dir.as_deref(), &work.tag)
                        .await
                    {
                        Ok(message) if report => next = Some(Event::CancelDone { message }),
                        Ok(_) => {}
                        // Not Cancelled before the job is known to be: the caller keeps the
                        // object (finalizer) and tries again.
                        Err(e) => {
                            tracing::warn!("cancel deferred: {e}");
                            status.message = Some(format!("cancel not confirmed yet: {e}"));
                        }
                    }
                }
                Action::Cleanup { run_dir } => {
                    if let Err(e) = work.backend.cleanup(&run_dir).await {
                        tracing::warn!("cleanup of {run_dir}: {e}");
                    }
                }
            }
        }
        if next.is_none() && watch && !observed {
            observed = true;
            let mut job = work.job.clone();
            job.job_id = status.job_id.clone();
            if let Some(dir) = &status.remote_run_dir {
                job.run_dir = dir.clone();
                match work
                    .backend
                    .observe(&job, work.requested_mem, work.poll, reader)
                    .await
                {
                    Ok(Some(obs)) => {
                        again_soon = obs.observe_again_soon;
                        next = Some(Event::Observed(Box::new(obs)));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("observing {}: {e}", job.run_dir),
                }
            }
        }
        match next {
            Some(e) => event = e,
            None => break,
        }
    }
    Driven {
        status,
        watch,
        submit_after,
        again_soon,
    }
}
