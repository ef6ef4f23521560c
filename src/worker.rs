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
        /// The attempt's run dir: when it is a session step's, the step is cancelled, never
        /// its session's allocation.
        run_dir: Option<String>,
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
    /// An environment preparation (run on its own task, not by the worker) ended.
    EnvPrepared {
        key: K,
        run: u64,
        result: Result<crate::api::EnvStatus, crate::environment::EnvError>,
    },
    /// The exit file of the job in this run dir appeared: observe it now.
    ExitNoticed {
        run_dir: String,
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
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
        executor.watch_exits(ended_tx);
        let notices = replies.clone();
        let notice_cluster = cluster.clone();
        tokio::spawn(async move {
            // Notices bypass the request queue: a slow submission must not delay them.
            while let Some(run_dir) = ended_rx.recv().await {
                if notices
                    .send((notice_cluster.clone(), Reply::ExitNoticed { run_dir }))
                    .is_err()
                {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Everything queued meanwhile is taken at once: the submissions among it go
                // to the cluster in one round trip.
                let mut batch = vec![first];
                while let Ok(req) = rx.try_recv() {
                    batch.push(req);
                }
                let (submits, others): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|r| matches!(r, Request::Submit { .. }));
                let mut out = submit_all(&ex, submits).await;
                for req in others {
                    out.extend(handle(&ex, req).await);
                }
                for reply in out {
                    if replies.send((cluster.clone(), reply)).is_err() {
                        ex.close().await;
                        return;
                    }
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

/// Submits every request of a batch in one round trip (after the cluster's facts, which the
/// plans need).
async fn submit_all<K>(ex: &SlurmExecutor, requests: Vec<Request<K>>) -> Vec<Reply<K>> {
    if requests.is_empty() {
        return vec![];
    }
    let facts = ex.facts().await;
    let mut replies = Vec::with_capacity(requests.len());
    let mut planned = vec![];
    let mut plans = vec![];
    for req in requests {
        let Request::Submit {
            key,
            run,
            attempt,
            plan,
        } = req
        else {
            continue;
        };
        let result = match &facts {
            Ok(f) => match plan(&f.home) {
                Ok(p) => {
                    plans.push(p);
                    planned.push((key, run, attempt));
                    continue;
                }
                Err(message) => Ok(Err(message)),
            },
            // Every request of the batch gets the error (an `ssh:` one stays one, not `ssh: ssh:`).
            Err(crate::Error::Transport(m)) => Err(crate::Error::Transport(m.clone())),
            Err(e) => Err(crate::Error::Executor(e.to_string())),
        };
        replies.push(Reply::Submitted {
            key,
            run,
            attempt,
            result,
        });
    }
    let results = ex.submit_many(&plans).await;
    for ((key, run, attempt), result) in planned.into_iter().zip(results) {
        replies.push(Reply::Submitted {
            key,
            run,
            attempt,
            result,
        });
    }
    replies
}

async fn handle<K>(ex: &SlurmExecutor, req: Request<K>) -> Option<Reply<K>> {
    Some(match req {
        Request::Probe => Reply::Probed(ex.facts().await.map_err(|e| e.to_string())),
        // Submissions are taken by `submit_all`.
        Request::Submit {
            key, run, attempt, ..
        } => Reply::Submitted {
            key,
            run,
            attempt,
            result: Err(crate::Error::Transport("submission out of turn".into())),
        },
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
            run_dir,
        } => Reply::Cancelled {
            key,
            report,
            result: ex
                .cancel(job_id.as_deref(), &tag, run_dir.as_deref())
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
