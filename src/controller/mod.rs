//! Kubernetes mode: a kube-runtime `Controller` for `SlurmAsset`, also watching the
//! `SlurmCluster`s and Secrets that assets depend on. Each reconcile resolves the spec
//! (cluster, Secrets, ConfigMap payload) and hands it to the shared core through
//! [`crate::backend::drive`]; status is written by server-side apply to the status subresource.

mod events;
mod resolve;
mod session;

use resolve::Resolved;

use crate::api::{
    API_VERSION, Phase, SlurmAsset, SlurmAssetSpec, SlurmAssetStatus, SlurmCluster,
    SlurmClusterStatus, SlurmSession,
};
use crate::backend::{Backend, Driven, Gate, Work, drive};
use crate::conditions;
use crate::core::{Event, Input};
use crate::executor::JobRef;
use crate::executor::local::LocalExecutor;
use crate::executor::slurm::{Counters, SlurmExecutor};
use crate::jobscript::{PlanContext, RunId, plan};
use crate::pipes::MessageReader;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PartialObjectMeta, Patch, PatchParams};
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub const FINALIZER: &str = "dagster-slurm.io/job-cleanup";
pub const FIELD_MANAGER: &str = "slurm-asset-operator";
/// Set to "true" on an asset whose cluster is gone for good to release it without `scancel`.
pub const FORCE_RELEASE: &str = "dagster-slurm.io/force-release";
/// How long a deletion waits for an unreachable cluster before releasing the object anyway
/// (the default of `run --release-grace`).
pub const RELEASE_GRACE: Duration = Duration::from_secs(600);
const POLL_LOCAL: Duration = Duration::from_secs(2);
const POLL_SLURM: Duration = Duration::from_secs(10);

pub use crate::ReconcileError as Error;

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub local: LocalExecutor,
    pub slurm: Mutex<HashMap<String, Arc<SlurmExecutor>>>,
    /// Run dirs whose exit file the clusters' watchers reported: their assets are reconciled
    /// at once, not at their next poll.
    exits: tokio::sync::mpsc::UnboundedSender<String>,
    exits_rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    pub counters: Arc<Counters>,
    pub readers: Mutex<HashMap<String, MessageReader>>,
    /// Last status written per SlurmCluster ("ns/name"), so that it is written on change only.
    cluster_status: Mutex<HashMap<String, SlurmClusterStatus>>,
    /// Malformed objects already reported: uid → (generation, error).
    invalid: Mutex<HashMap<String, (Option<i64>, String)>>,
    pub recorder: Recorder,
    /// Private directory for key files and local run directories.
    pub work_dir: PathBuf,
    pub exe: PathBuf,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Leadership epoch, the fencing token of every submission (0 without leader election).
    pub epoch: u64,
    /// Whether assets may run on the operator's own host (local mode). Off unless an
    /// administrator enables it: a payload there would sit beside the operator's credentials.
    pub allow_local: bool,
    /// Whether Secrets are watched (list/watch RBAC); without, assets that wait for one look
    /// again every [`SECRET_RECHECK`].
    pub watch_secrets: bool,
    /// How long a deletion waits for a cancel that cannot reach the cluster.
    pub release_grace: Duration,
}

/// When a job that just ended is reconciled again for its last figures.
const AGAIN_SOON: Duration = Duration::from_secs(2);

/// How often an asset that waits for a Secret looks again when Secrets are not watched.
const SECRET_RECHECK: Duration = Duration::from_secs(60);

impl Context {
    pub fn new(
        client: Client,
        exe: PathBuf,
        work_dir: PathBuf,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Context {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (exits, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            local: LocalExecutor::new(exe.clone()),
            slurm: Mutex::new(HashMap::new()),
            exits,
            exits_rx: std::sync::Mutex::new(Some(exits_rx)),
            counters: metrics.counters.clone(),
            readers: Mutex::new(HashMap::new()),
            cluster_status: Mutex::new(HashMap::new()),
            invalid: Mutex::new(HashMap::new()),
            work_dir,
            exe,
            metrics,
            epoch: 0,
            allow_local: false,
            watch_secrets: true,
            release_grace: RELEASE_GRACE,
        }
    }

    /// Sets how long a deletion waits for an unreachable cluster (`run --release-grace`).
    pub fn with_release_grace(mut self, grace: Duration) -> Context {
        self.release_grace = grace;
        self
    }

    /// Reads Secrets with `get` only (`run --no-secret-watch`, for a namespaced RBAC).
    pub fn with_secret_watch(mut self, watch: bool) -> Context {
        self.watch_secrets = watch;
        self
    }

    /// Closes every cluster's SSH master (on shutdown).
    pub async fn close_connections(&self) {
        let executors: Vec<Arc<SlurmExecutor>> =
            self.slurm.lock().await.values().cloned().collect();
        for ex in executors {
            ex.close().await;
        }
    }

    /// Lets assets run on the operator's host (`run --allow-local-execution`). Their jobs
    /// never see the operator's credentials: its SSH key files and its ServiceAccount token
    /// are hidden from them (user and mount namespaces), and their environment is plain.
    pub fn with_local_execution(mut self, allow: bool) -> Context {
        self.allow_local = allow;
        let ssh = self.work_dir.join("ssh");
        {
            use std::os::unix::fs::DirBuilderExt;
            // It must exist to be hidden, even before the first key is written.
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&ssh);
        }
        self.local.hide = vec![
            ssh,
            "/var/run/secrets/kubernetes.io".into(),
            "/run/secrets/kubernetes.io".into(),
        ];
        self
    }

    /// Sets the leadership epoch (the Lease's `leaseTransitions` + 1 when this replica took it).
    pub fn with_epoch(mut self, epoch: u64) -> Context {
        self.epoch = epoch;
        self
    }
}

/// Runs the controllers (SlurmAsset and SlurmSession) until their streams end (or `shutdown`
/// resolves).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let client = ctx.client.clone();
    let api = |c: &Client| match &namespace {
        Some(ns) => (
            Api::<DeserializeGuard<SlurmAsset>>::namespaced(c.clone(), ns),
            Api::<SlurmCluster>::namespaced(c.clone(), ns),
            Api::<DeserializeGuard<SlurmSession>>::namespaced(c.clone(), ns),
        ),
        None => (
            Api::all(c.clone()),
            Api::all(c.clone()),
            Api::all(c.clone()),
        ),
    };
    let (assets, clusters, sessions) = api(&client);
    // Secrets and ConfigMaps are watched by metadata only (`PartialObjectMeta`): their
    // values never travel through the watch.
    let (secrets, config_maps) = match &namespace {
        Some(ns) => (
            Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
            Api::<PartialObjectMeta<ConfigMap>>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let controller = Controller::new(assets.clone(), watcher::Config::default());
    let store = controller.store();
    let assets_of = {
        let store = store.clone();
        move |ns: Option<String>, wants: &dyn Fn(&SlurmAsset) -> bool| {
            store
                .state()
                .iter()
                .filter(|a| a.0.as_ref().is_ok_and(|a| a.namespace() == ns && wants(a)))
                .map(|a| ObjectRef::from_obj(&**a))
                .collect::<Vec<_>>()
        }
    };
    let (by_cluster, by_secret, by_config_map, by_session) = (
        assets_of.clone(),
        assets_of.clone(),
        assets_of.clone(),
        assets_of,
    );
    let mut controller = controller
        .watches(
            clusters.clone(),
            watcher::Config::default(),
            move |cluster| {
                let name = cluster.name_any();
                by_cluster(cluster.namespace(), &|a| {
                    a.spec.cluster_ref.as_deref() == Some(name.as_str())
                })
            },
        )
        // An asset waiting for its ConfigMap payload runs once it exists.
        .watches(config_maps, watcher::Config::default(), move |cm| {
            let name = cm.name_any();
            by_config_map(cm.namespace(), &|a| {
                a.spec
                    .payload
                    .config_map_ref
                    .as_ref()
                    .is_some_and(|r| r.name == name)
                    || a.spec.environment.sources_config_map.as_deref() == Some(name.as_str())
            })
        })
        // A step waiting for its session's allocation is submitted once it runs.
        .watches(sessions.clone(), watcher::Config::default(), move |s| {
            let name = s.name_any();
            by_session(s.namespace(), &|a| {
                a.spec.session_ref.as_deref() == Some(name.as_str())
            })
        });
    // Without list/watch rights on Secrets (a namespaced RBAC), assets that wait for one look
    // again every SECRET_RECHECK instead.
    if ctx.watch_secrets {
        let by_secret = by_secret.clone();
        controller = controller.watches(secrets, watcher::Config::default(), move |secret| {
            // Assets that read this Secret directly, and every asset on a cluster in the same
            // namespace (clusters hold SSH credentials in Secrets).
            let name = secret.name_any();
            by_secret(secret.namespace(), &|a| {
                a.spec.cluster_ref.is_some()
                    || a.spec.env.iter().any(|e| {
                        e.value_from
                            .as_ref()
                            .is_some_and(|v| v.secret_key_ref.name == name)
                    })
            })
        });
    }
    let sessions_controller = Controller::new(sessions, watcher::Config::default());
    let session_store = sessions_controller.store();
    let mut sessions_controller = sessions_controller
        // A session lists its running and queued assets.
        .watches(assets, watcher::Config::default(), |a| {
            let a = a.0.as_ref().ok()?;
            let ns = a.namespace()?;
            a.spec
                .session_ref
                .as_ref()
                .map(|s| ObjectRef::new(s).within(&ns))
        })
        .watches(clusters, watcher::Config::default(), move |cluster| {
            let name = cluster.name_any();
            session_store
                .state()
                .iter()
                .filter(|s| {
                    s.0.as_ref().is_ok_and(|s| {
                        s.namespace() == cluster.namespace() && s.spec.cluster_ref == name
                    })
                })
                .map(|s| ObjectRef::from_obj(&**s))
                .collect::<Vec<_>>()
        });
    // A job's end (or start), reported by its cluster's watcher, reconciles its object now.
    if let Some(mut exits) = ctx.exits_rx.lock().expect("exits lock").take() {
        let (to_asset, mut asset_rx) = tokio::sync::mpsc::unbounded_channel();
        let (to_session, mut session_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(dir) = exits.recv().await {
                match owner_of_run_dir(&dir) {
                    Some(RunOwner::Asset(r)) => drop(to_asset.send(r)),
                    Some(RunOwner::Session(r)) => drop(to_session.send(r)),
                    None => {}
                }
            }
        });
        controller =
            controller.reconcile_on(futures::stream::poll_fn(move |cx| asset_rx.poll_recv(cx)));
        sessions_controller = sessions_controller
            .reconcile_on(futures::stream::poll_fn(move |cx| session_rx.poll_recv(cx)));
    }
    let shutdown = shutdown.shared();
    let session_ctx = Arc::new(session::SessionContext {
        base: ctx.clone(),
        assets: store,
    });
    futures::join!(
        controller
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!("reconcile: {e}");
                }
            }),
        sessions_controller
            .graceful_shutdown_on(shutdown)
            .run(session::reconcile, session::error_policy, session_ctx)
            .for_each(|res| async move {
                if let Err(e) = res {
                    tracing::debug!("reconcile of a session: {e}");
                }
            }),
    );
}

/// The object a run dir belongs to.
enum RunOwner {
    Asset(ObjectRef<DeserializeGuard<SlurmAsset>>),
    Session(ObjectRef<DeserializeGuard<SlurmSession>>),
}

/// Run dirs end in `runs/<namespace>/<name>/<run>-<attempt>` (assets) or
/// `sessions/<namespace>/<name>/<run>-<attempt>` (sessions' allocations).
fn owner_of_run_dir(dir: &str) -> Option<RunOwner> {
    let mut parts = dir.rsplit('/');
    let _attempt = parts.next()?;
    let name = parts.next()?;
    let namespace = parts.next()?;
    if name.is_empty() || namespace.is_empty() {
        return None;
    }
    match parts.next()? {
        "runs" => Some(RunOwner::Asset(ObjectRef::new(name).within(namespace))),
        "sessions" => Some(RunOwner::Session(ObjectRef::new(name).within(namespace))),
        _ => None,
    }
}

pub fn error_policy(
    _obj: Arc<DeserializeGuard<SlurmAsset>>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_error(err);
    Action::requeue(Duration::from_secs(15))
}

/// One reconcile of one asset.
pub async fn reconcile(
    obj: Arc<DeserializeGuard<SlurmAsset>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let asset = match &obj.0 {
        Ok(a) => a.clone(),
        // A malformed object never breaks the watch: it gets a condition and an Event.
        Err(invalid) => {
            report_malformed(invalid, &ctx).await?;
            return Ok(Action::await_change());
        }
    };
    let ns = asset.namespace().unwrap_or_else(|| "default".into());
    let api: Api<SlurmAsset> = Api::namespaced(ctx.client.clone(), &ns);
    under_finalizer(&api, &asset, |deleted| apply(&asset, &ctx, deleted)).await
}

/// Runs `apply` under the operator's finalizer: it is added first (a job must never exist
/// without it), `apply(true)` runs on deletion (its job is cancelled or released) and the
/// finalizer goes after.
async fn under_finalizer<K, F, Fut>(api: &Api<K>, obj: &K, apply: F) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    F: FnOnce(bool) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>>,
{
    let deleting = obj.meta().deletion_timestamp.is_some();
    let name = obj.name_any();
    let index = obj.finalizers().iter().position(|f| f == FINALIZER);
    match (index, deleting) {
        (Some(_), false) => apply(false).await,
        (Some(i), true) => {
            let action = apply(true).await?;
            patch_finalizers(api, &name, finalizer_removal(i)).await?;
            Ok(action)
        }
        (None, false) => {
            // Adding it wakes the next reconcile.
            let add = finalizer_addition(obj.finalizers());
            patch_finalizers(api, &name, add).await?;
            Ok(Action::await_change())
        }
        (None, true) => Ok(Action::await_change()),
    }
}

/// JSON patches of `metadata.finalizers`, each guarded by a `test` so that a concurrent change
/// by someone else fails the patch instead of being overwritten (as `kube::runtime::finalizer`
/// does, but written under the operator's own field manager).
fn finalizer_addition(current: &[String]) -> serde_json::Value {
    if current.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    }
}

fn finalizer_removal(index: usize) -> serde_json::Value {
    let path = format!("/metadata/finalizers/{index}");
    serde_json::json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ])
}

async fn patch_finalizers<K>(api: &Api<K>, name: &str, ops: serde_json::Value) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| Error::Finalizer(e.to_string()))?;
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Json::<()>(patch),
    )
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))?;
    Ok(())
}

/// The first error of a SlurmAsset's spec with its field path (`spec.resources.mem: ...`),
/// read from the stored object, if it can be read.
async fn field_of_error(ctx: &Context, ns: &str, name: &str) -> Option<String> {
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        ns,
        &kube::api::ApiResource::erase::<SlurmAsset>(&()),
    );
    let obj = api.get(name).await.ok()?;
    let spec = obj.data.get("spec")?.clone();
    let err = serde_path_to_error::deserialize::<_, SlurmAssetSpec>(spec).err()?;
    let path = err.path().to_string();
    let field = if path == "." {
        "spec".to_string()
    } else {
        format!("spec.{path}")
    };
    Some(format!("{field}: {}", err.into_inner()))
}

/// A malformed object to report: where it is, its error and what identifies the report.
pub(crate) struct Malformed {
    pub ns: String,
    pub name: String,
    pub uid: String,
    /// The parse error, without serde's position ("at line 1 column 345"), which moves with
    /// every status write.
    pub error: String,
    /// (generation, error): reported again only when either changes.
    pub seen: (Option<i64>, String),
}

/// The report a malformed object is due, `None` when it was made already (the guard keeps
/// no status to compare with: what was written is remembered instead, so that a resync
/// writes, tells and reads nothing new).
pub(crate) async fn unreported(invalid: &InvalidObject, ctx: &Context) -> Option<Malformed> {
    let error = match invalid.error.rfind(" at line ") {
        Some(i) => invalid.error[..i].to_string(),
        None => invalid.error.clone(),
    };
    let seen = (invalid.metadata.generation, error.clone());
    let uid = invalid.metadata.uid.clone().unwrap_or_default();
    if ctx.invalid.lock().await.get(&uid) == Some(&seen) {
        return None;
    }
    Some(Malformed {
        ns: invalid
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: invalid.metadata.name.clone().unwrap_or_default(),
        uid,
        error,
        seen,
    })
}

/// Marks a SlurmAsset whose spec does not parse: `Failed` with an `Invalid` condition and one
/// Warning Event (again only when the error or the generation changes).
async fn report_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<(), Error> {
    let Some(Malformed {
        ns,
        name,
        uid,
        error,
        seen,
    }) = unreported(invalid, ctx).await
    else {
        return Ok(());
    };
    // Name the field: parse the spec again, with its path this time.
    let error = match field_of_error(ctx, &ns, &name).await {
        Some(located) => located,
        None => format!("spec: {error}"),
    };
    let mut status = SlurmAssetStatus {
        phase: Phase::Failed,
        reason: Some(crate::core::REASON_INVALID.into()),
        message: Some(error.clone()),
        observed_generation: invalid.metadata.generation,
        ..Default::default()
    };
    conditions::set(
        &mut status.conditions,
        "Invalid",
        true,
        crate::core::REASON_INVALID,
        &error,
        invalid.metadata.generation,
        Timestamp::now(),
    );
    let api = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(&api, &name, &status).await?;
    ctx.metrics.asset_phase(&uid, Some(Phase::Failed));
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(API_VERSION.into()),
        kind: Some("SlurmAsset".into()),
        name: Some(name),
        namespace: Some(ns),
        uid: Some(uid.clone()),
        ..Default::default()
    };
    let ev = KubeEvent {
        type_: EventType::Warning,
        reason: crate::core::REASON_INVALID.into(),
        note: status.message.clone(),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        tracing::warn!("publishing an event: {e}");
    }
    ctx.invalid.lock().await.insert(uid, seen);
    Ok(())
}

/// One object the core drives: an asset, or the internal asset holding a session's
/// allocation.
struct Subject<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub generation: i64,
    /// The spec as written (its references are in `resolved`).
    pub spec: &'a SlurmAssetSpec,
    pub before: &'a SlurmAssetStatus,
    pub deleted: bool,
    /// A session's allocation: run dirs under `sessions/`, an agent that keeps to the time
    /// limit.
    pub is_session: bool,
}

/// Feeds one reconcile of `subject` to the core through its backend (see
/// [`crate::backend::drive`]).
async fn drive_subject(
    ctx: &Context,
    subject: &Subject<'_>,
    resolved: &Result<Resolved, String>,
    gate: Gate,
    step: Option<&crate::session::StepTarget>,
) -> Driven {
    let (ns, name, uid) = (subject.ns, subject.name, subject.uid);
    let before = subject.before;
    let spec = subject.spec;
    let invalid = resolved.as_ref().err().cloned();
    let needs_env = resolved.as_ref().is_ok_and(|r| r.env.is_some());
    let input = Input {
        generation: subject.generation,
        run_key: spec.run_key.as_deref(),
        invalid: invalid.as_deref(),
        suspend: spec.suspend,
        retry_limit: spec.retry.limit,
        retry_backoff: spec.retry.backoff.duration(),
        retry_on_payload_failure: spec.retry.on_payload_failure,
        cleanup_on_failure: spec.cleanup_on_failure,
        debug: spec.debug,
        deleted: subject.deleted,
        needs_env,
        now: Timestamp::now(),
    };
    let in_session = spec.session_ref.is_some();
    let (backend, poll, resources, cluster) = match resolved {
        Ok(r) => (
            r.backend.clone(),
            r.poll,
            // A step asks for its own resources; the queue defaults shaped the allocation.
            if in_session {
                r.spec.resources.clone()
            } else {
                r.spec.resources.merged_over(&r.cluster.queue)
            },
            Some(r),
        ),
        Err(_) => (
            Backend::Local(ctx.local.clone()),
            POLL_LOCAL,
            Default::default(),
            None,
        ),
    };
    let id = |run: u64, attempt: u32| RunId {
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        run,
        attempt,
        epoch: ctx.epoch,
        session: subject.is_session,
    };
    let local_base = ctx.work_dir.join("runs");
    let plan_fn = |run: u64, attempt: u32, home: Option<&str>| {
        let r = cluster.ok_or_else(|| "the spec is invalid".to_string())?;
        let ctx_plan = PlanContext {
            asset_dir: &local_base,
            cluster: &r.cluster,
            cluster_dir: &local_base,
            default_base: match home {
                Some(h) => PathBuf::from(format!("{h}/{}", crate::jobscript::DEFAULT_REMOTE_BASE)),
                None => local_base.clone(),
            },
            remote_home: home,
        };
        let mut spec = r.spec.clone();
        if subject.is_session {
            crate::session::keep_to_time_limit(&mut spec, &r.cluster.queue);
        }
        let mut p = plan(&spec, id(run, attempt), &ctx_plan)?;
        if in_session {
            let t = step.ok_or("spec.sessionRef: the session's allocation is not known yet")?;
            p.session = Some(crate::session::Placement {
                session_dir: t.dir.clone(),
                job_id: t.job_id.clone(),
                srun: crate::session::step_options(
                    &r.spec.resources,
                    &p.id.tag(),
                    &p.run_dir,
                    t.ray_driver,
                ),
            });
        }
        Ok(p)
    };
    let prepare_env = || -> futures::future::BoxFuture<'_, _> {
        Box::pin(async {
            let r = resolved
                .as_ref()
                .map_err(|e| crate::environment::EnvError::fatal(e.clone()))?;
            let mut req = r
                .env
                .clone()
                .ok_or_else(|| crate::environment::EnvError::fatal("no environment to prepare"))?;
            req.sources = resolve::env_sources(
                ctx,
                ns,
                r.spec
                    .environment
                    .merged_over(&r.cluster.environment)
                    .sources_config_map
                    .as_deref(),
            )
            .await?;
            let host = match &r.backend {
                Backend::Slurm(ex) => crate::environment::EnvHost::Slurm(ex.clone()),
                Backend::Local(_) => crate::environment::EnvHost::Local,
            };
            crate::environment::prepare(&host, &req).await
        })
    };
    let work = Work {
        backend,
        gate,
        env: needs_env.then_some(&prepare_env as &crate::backend::PrepareFn),
        plan: &plan_fn,
        tag: id(before.run, before.attempts.max(1)).tag(),
        job: JobRef {
            in_session,
            step_id: before.step_id.clone(),
            job_id: before.job_id.clone(),
            run_dir: before.remote_run_dir.clone().unwrap_or_default(),
            resources: resources.clone(),
            components: spec.components.iter().map(|c| c.name.clone()).collect(),
        },
        requested_mem: resources.requested_memory(),
        poll,
    };
    let mut reader = ctx.readers.lock().await.remove(uid).unwrap_or_default();
    let driven = drive(before.clone(), &input, Event::Resync, &work, &mut reader).await;
    ctx.readers.lock().await.insert(uid.to_string(), reader);
    driven
}

/// What comes after a reconcile: a submission due, a job to poll, or nothing until a change.
fn next_action(ctx: &Context, driven: &Driven, resolved: &Result<Resolved, String>) -> Action {
    let poll = resolved.as_ref().map_or(POLL_LOCAL, |r| r.poll);
    match (driven.submit_after, driven.watch) {
        (Some(d), _) => Action::requeue(d),
        // Just ended: its metrics are due within seconds.
        (None, true) if driven.again_soon => Action::requeue(poll.min(AGAIN_SOON)),
        (None, true) => Action::requeue(poll),
        // Invalid for want of a Secret, perhaps, and no Secret watch to say when it comes.
        (None, false) if resolved.is_err() && !ctx.watch_secrets => Action::requeue(SECRET_RECHECK),
        (None, false) => Action::await_change(),
    }
}

/// The deletion policy: an object whose job is still active is held (its finalizer stays)
/// until the cancel is confirmed, or released without one after the grace period or by
/// the [`FORCE_RELEASE`] annotation (with a Warning Event).
async fn settle_deletion(
    ctx: &Context,
    meta: &kube::api::ObjectMeta,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    after: &SlurmAssetStatus,
) -> Result<(), Error> {
    let active = matches!(
        after.phase,
        Phase::Packing | Phase::Uploading | Phase::Submitting | Phase::Queued | Phase::Running
    );
    if !active {
        return Ok(());
    }
    let since = meta
        .deletion_timestamp
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0).as_secs())
        .unwrap_or(0);
    let forced = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORCE_RELEASE))
        .is_some_and(|v| v == "true");
    if !forced && since < ctx.release_grace.as_secs() as i64 {
        return Err(Error::CancelPending(
            after.message.clone().unwrap_or_default(),
        ));
    }
    let ev = KubeEvent {
        type_: EventType::Warning,
        reason: "ReleasedWithoutCancel".into(),
        note: Some(format!(
            "job {} could not be cancelled; released {}",
            after.job_id.clone().unwrap_or_default(),
            if forced {
                "by annotation"
            } else {
                "after the grace period"
            }
        )),
        action: "Delete".into(),
        secondary: None,
    };
    events::publish(ctx, reference, ev).await;
    Ok(())
}

async fn apply(asset: &SlurmAsset, ctx: &Context, deleted: bool) -> Result<Action, Error> {
    let ns = asset.namespace().unwrap_or_else(|| "default".into());
    let name = asset.name_any();
    let uid = asset.uid().unwrap_or_default();
    let api: Api<DeserializeGuard<SlurmAsset>> = Api::namespaced(ctx.client.clone(), &ns);
    let before = asset.status.clone().unwrap_or_default();
    let errors = crate::manifest::validate_asset(
        &asset.spec,
        crate::manifest::StoreKind::Kubernetes,
        std::path::Path::new("/"),
    );
    let resolved = if errors.is_empty() {
        resolve::resolve(&asset.spec, &ns, ctx).await
    } else {
        Err(crate::manifest::describe(&errors))
    };
    // A step's session is looked up only while the step may be submitted.
    let (gate, step) = match (&resolved, &asset.spec.session_ref) {
        (Ok(r), Some(s)) if !matches!(before.phase, Phase::Queued | Phase::Running) => {
            session::step_target(ctx, &ns, s, &r.spec).await
        }
        _ => (Gate::Open, None),
    };
    let subject = Subject {
        ns: &ns,
        name: &name,
        uid: &uid,
        generation: asset.metadata.generation.unwrap_or(1),
        spec: &asset.spec,
        before: &before,
        deleted,
        is_session: false,
    };
    let driven = drive_subject(ctx, &subject, &resolved, gate, step.as_ref()).await;
    let after = &driven.status;
    if *after != before {
        patch_status(&api, &name, after).await?;
    }
    ctx.invalid.lock().await.remove(&uid);
    ctx.metrics.asset_phase(&uid, Some(after.phase));
    if let Ok(Resolved {
        backend: Backend::Slurm(ex),
        cluster_ref: Some((cluster_name, generation)),
        ..
    }) = &resolved
    {
        update_cluster_status(ctx, &ns, cluster_name, *generation, ex).await;
    }
    if after.phase != before.phase || after.run != before.run {
        ctx.metrics.phase_change(after.phase);
    }
    let reference = asset.object_ref(&());
    events::asset_transition(ctx, &reference, &before, after).await;
    if deleted {
        settle_deletion(ctx, asset.meta(), &reference, after).await?;
        ctx.readers.lock().await.remove(&uid);
        ctx.metrics.asset_phase(&uid, None);
        return Ok(Action::await_change());
    }
    Ok(next_action(ctx, &driven, &resolved))
}

/// Writes what the assets' traffic has learnt about a SlurmCluster into its status: the
/// `Reachable` condition, platform, Slurm version and whether accounting answers.
async fn update_cluster_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    generation: Option<i64>,
    ex: &SlurmExecutor,
) {
    let Some(reach) = ex.reachability() else {
        return;
    };
    ctx.metrics.cluster_reachable(ns, name, reach.is_ok());
    let key = format!("{ns}/{name}");
    let mut cache = ctx.cluster_status.lock().await;
    let before = cache.get(&key).cloned().unwrap_or_default();
    let mut status = before.clone();
    status.observed_generation = generation;
    if let Some(f) = ex.known_facts() {
        status.platform = Some(f.platform);
        status.slurm_version = Some(f.slurm_version);
        status.accounting_available = Some(f.accounting);
    }
    let (reason, message) = match &reach {
        Ok(()) => {
            let t = ex.target();
            (
                "Connected",
                format!("connected to {}@{}:{}", t.user, t.host, t.port),
            )
        }
        Err(e) => ("ConnectFailed", e.clone()),
    };
    conditions::set(
        &mut status.conditions,
        "Reachable",
        reach.is_ok(),
        reason,
        &message,
        generation,
        Timestamp::now(),
    );
    if status == before {
        return;
    }
    let api: Api<SlurmCluster> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "SlurmCluster",
        "status": status,
    });
    match api
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {
            cache.insert(key, status);
        }
        Err(e) => tracing::warn!("writing the status of SlurmCluster {key}: {e}"),
    }
}

/// Writes status by server-side apply to the status subresource. The answer is read through
/// `DeserializeGuard`: the object returned may be one whose spec does not parse.
pub async fn patch_status(
    api: &Api<DeserializeGuard<SlurmAsset>>,
    name: &str,
    status: &SlurmAssetStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "SlurmAsset",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_dir_names_its_asset_or_session() {
        let Some(RunOwner::Asset(r)) = owner_of_run_dir("/home/u/sao/runs/team-a/train/3-1") else {
            panic!("an asset's run dir")
        };
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("train", Some("team-a"))
        );
        let Some(RunOwner::Session(r)) = owner_of_run_dir("/home/u/sao/sessions/team-a/train/1-1")
        else {
            panic!("a session's run dir")
        };
        assert_eq!(r.name.as_str(), "train");
        assert!(owner_of_run_dir("/home/u/sao/train/3-1").is_none());
        assert!(owner_of_run_dir("3-1").is_none());
    }
}
