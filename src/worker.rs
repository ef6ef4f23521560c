//! One worker per Slurm cluster (DESIGN section 3): a task that owns the cluster's executor
//! (its SSH connection) and carries out requests one after another, answering by message.
//! The caller never awaits a cluster: a cluster whose SSH server hangs stalls only its own
//! worker, never the other clusters or local assets.

use crate::core::Observation;
use crate::executor::slurm::{ClusterFacts, SlurmExecutor, Watched};
use crate::executor::{JobRef, JobTrack, Submitted};
use crate::jobscript::RunPlan;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Builds an attempt's plan once the cluster's home directory is known.
pub type PlanBuilder = Box<dyn FnOnce(&str) -> Result<RunPlan, String> + Send>;

/// One job of a batched poll.
pub struct PollItem<K> {
    pub key: K,
    pub job: JobRef,
    pub requested_mem: Option<u64>,
    pub track: JobTrack,
}

/// What a worker is asked to do.
pub enum Request<K> {
    /// Connect if needed and report the cluster's facts.
    Probe,
    Submit {
        key: K,
        run: u64,
        attempt: u32,
        plan: PlanBuilder,
    },
    /// Observe every job in one round trip.
    Poll(Vec<PollItem<K>>),
    Cancel {
        key: K,
        job_id: Option<String>,
        tag: String,
        report: bool,
    },
    Cleanup {
        run_dir: String,
    },
}

/// A worker's answer, tagged with what it answers.
pub enum Reply<K> {
    Probed(Result<ClusterFacts, String>),
    /// `Ok(Ok(_))`: submitted or adopted; `Ok(Err(_))`: refused for good (bad options, ...);
    /// `Err(_)`: the cluster could not be reached or answered nonsense (try again later).
    Submitted {
        key: K,
        run: u64,
        attempt: u32,
        result: Result<Result<Submitted, String>, crate::Error>,
    },
    /// The tracks come back with the observations, or with the error that kept them.
    Polled {
        items: Vec<(K, JobRef, JobTrack)>,
        result: Result<Vec<Observation>, String>,
    },
    Cancelled {
        key: K,
        report: bool,
        result: Result<String, String>,
    },
}

/// The handle of a running worker; dropping it ends the worker once its queue is done.
pub struct ClusterWorker<K> {
    pub executor: Arc<SlurmExecutor>,
    tx: mpsc::UnboundedSender<Request<K>>,
}

impl<K: Send + 'static> ClusterWorker<K> {
    /// Starts the worker; its replies go to `replies`, tagged by `cluster`.
    pub fn spawn<C: Clone + Send + 'static>(
        executor: Arc<SlurmExecutor>,
        cluster: C,
        replies: mpsc::UnboundedSender<(C, Reply<K>)>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request<K>>();
        let ex = executor.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let reply = handle(&ex, req).await;
                if let Some(r) = reply
                    && replies.send((cluster.clone(), r)).is_err()
                {
                    break;
                }
            }
            ex.close().await;
        });
        ClusterWorker { executor, tx }
    }

    pub fn send(&self, req: Request<K>) {
        // A worker only stops when its handle is dropped: sending cannot fail before that.
        let _ = self.tx.send(req);
    }
}

async fn handle<K>(ex: &SlurmExecutor, req: Request<K>) -> Option<Reply<K>> {
    Some(match req {
        Request::Probe => Reply::Probed(ex.facts().await.map_err(|e| e.to_string())),
        Request::Submit {
            key,
            run,
            attempt,
            plan,
        } => {
            let result = match ex.facts().await {
                Ok(facts) => match plan(&facts.home) {
                    Ok(p) => ex.submit(&p).await,
                    Err(message) => Ok(Err(message)),
                },
                Err(e) => Err(e),
            };
            Reply::Submitted {
                key,
                run,
                attempt,
                result,
            }
        }
        Request::Poll(mut items) => {
            let result = {
                let mut watched: Vec<Watched> = items
                    .iter_mut()
                    .map(|i| Watched {
                        job: i.job.clone(),
                        requested_mem: i.requested_mem,
                        track: &mut i.track,
                    })
                    .collect();
                ex.observe(&mut watched).await.map_err(|e| e.to_string())
            };
            Reply::Polled {
                items: items.into_iter().map(|i| (i.key, i.job, i.track)).collect(),
                result,
            }
        }
        Request::Cancel {
            key,
            job_id,
            tag,
            report,
        } => Reply::Cancelled {
            key,
            report,
            result: ex
                .cancel(job_id.as_deref(), &tag)
                .await
                .map_err(|e| e.to_string()),
        },
        Request::Cleanup { run_dir } => {
            if let Err(e) = ex.cleanup(&run_dir).await {
                tracing::warn!("cleanup of {run_dir}: {e}");
            }
            return None;
        }
    })
}
