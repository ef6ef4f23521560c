//! Kubernetes mode: a kube-runtime `Controller` for `SlurmAsset`, also watching the
//! `SlurmCluster`s and Secrets that assets depend on. Each reconcile resolves the spec
//! (cluster, Secrets, ConfigMap payload) and hands it to the shared core through
//! [`crate::backend::drive`]; status is written by server-side apply to the status subresource.

use crate::api::{
    API_VERSION, ClusterMode, Phase, SlurmAsset, SlurmAssetSpec, SlurmAssetStatus, SlurmCluster,
    SlurmClusterSpec, SlurmClusterStatus,
};
use crate::backend::{Backend, Work, drive};
use crate::conditions;
use crate::core::{Event, Input};
use crate::executor::JobRef;
use crate::executor::local::LocalExecutor;
use crate::executor::slurm::{Counters, SlurmExecutor};
use crate::jobscript::{PlanContext, RunId, plan};
use crate::manifest::{StoreKind, describe, validate_asset, validate_cluster};
use crate::pipes::MessageReader;
use crate::transport::{SshAuth, SshTarget};
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("cancel not confirmed yet: {0}")]
    CancelPending(String),
    #[error("{0}")]
    Io(String),
}

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

/// A spec with every reference resolved.
struct Resolved {
    spec: SlurmAssetSpec,
    cluster: SlurmClusterSpec,
    /// The referenced SlurmCluster's name and generation (none for the implicit local one).
    cluster_ref: Option<(String, Option<i64>)>,
    backend: Backend,
    poll: Duration,
    /// The environment the asset packs (its sources are read when it is prepared).
    env: Option<crate::environment::EnvRequest>,
}

/// Runs the controller until the stream ends (or `shutdown` resolves).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    // Secrets and ConfigMaps are watched by metadata only (`PartialObjectMeta`): their
    // values never travel through the watch.
    let (assets, clusters, secrets, config_maps) = match &namespace {
        Some(ns) => (
            Api::<DeserializeGuard<SlurmAsset>>::namespaced(client.clone(), ns),
            Api::<SlurmCluster>::namespaced(client.clone(), ns),
            Api::<PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
            Api::<PartialObjectMeta<ConfigMap>>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let controller = Controller::new(assets, watcher::Config::default());
    let store = controller.store();
    let assets_of = move |ns: Option<String>, wants: &dyn Fn(&SlurmAsset) -> bool| {
        store
            .state()
            .iter()
            .filter(|a| a.0.as_ref().is_ok_and(|a| a.namespace() == ns && wants(a)))
            .map(|a| ObjectRef::from_obj(&**a))
            .collect::<Vec<_>>()
    };
    let (by_cluster, by_secret, by_config_map) = (assets_of.clone(), assets_of.clone(), assets_of);
    let mut controller = controller
        .watches(clusters, watcher::Config::default(), move |cluster| {
            let name = cluster.name_any();
            by_cluster(cluster.namespace(), &|a| {
                a.spec.cluster_ref.as_deref() == Some(name.as_str())
            })
        })
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
        });
    // Without list/watch rights on Secrets (a namespaced RBAC), assets that wait for one look
    // again every SECRET_RECHECK instead.
    if ctx.watch_secrets {
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
    // A job's end, reported by its cluster's exit-file watcher, reconciles its asset now.
    if let Some(mut exits) = ctx.exits_rx.lock().expect("exits lock").take() {
        let ended = futures::stream::poll_fn(move |cx| exits.poll_recv(cx))
            .filter_map(|dir| async move { asset_of_run_dir(&dir) });
        controller = controller.reconcile_on(ended);
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

/// The asset a run dir belongs to: run dirs end in `runs/<namespace>/<name>/<run>-<attempt>`.
fn asset_of_run_dir(dir: &str) -> Option<ObjectRef<DeserializeGuard<SlurmAsset>>> {
    let mut parts = dir.rsplit('/');
    let _attempt = parts.next()?;
    let name = parts.next()?;
    let namespace = parts.next()?;
    (parts.next()? == "runs" && !name.is_empty() && !namespace.is_empty())
        .then(|| ObjectRef::new(name).within(namespace))
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
    let deleting = asset.meta().deletion_timestamp.is_some();
    let index = asset.finalizers().iter().position(|f| f == FINALIZER);
    match (index, deleting) {
        (Some(_), false) => apply(&asset, &ctx, false).await,
        (Some(i), true) => {
            // The job is cancelled (or released) before the finalizer goes.
            let action = apply(&asset, &ctx, true).await?;
            patch_finalizers(&api, &asset.name_any(), finalizer_removal(i)).await?;
            Ok(action)
        }
        (None, false) => {
            // The finalizer comes first: a job must never exist without it. Adding it wakes
            // the next reconcile.
            let add = finalizer_addition(asset.finalizers());
            patch_finalizers(&api, &asset.name_any(), add).await?;
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

async fn patch_finalizers(
    api: &Api<SlurmAsset>,
    name: &str,
    ops: serde_json::Value,
) -> Result<(), Error> {
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

/// Marks a SlurmAsset whose spec does not parse: `Failed` with an `Invalid` condition and one
/// Warning Event (again only when the error or the generation changes).
async fn report_malformed(invalid: &InvalidObject, ctx: &Context) -> Result<(), Error> {
    let ns = invalid
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = invalid.metadata.name.clone().unwrap_or_default();
    // serde's position ("at line 1 column 345") moves with every status write: drop it.
    let error = match invalid.error.rfind(" at line ") {
        Some(i) => invalid.error[..i].to_string(),
        None => invalid.error.clone(),
    };
    // The guard keeps no status to compare with: remember what was written instead,
    // so that a resync writes (and tells, and reads) nothing new.
    let seen = (invalid.metadata.generation, error.clone());
    let uid = invalid.metadata.uid.clone().unwrap_or_default();
    if ctx.invalid.lock().await.get(&uid) == Some(&seen) {
        return Ok(());
    }
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

async fn apply(asset: &SlurmAsset, ctx: &Context, deleted: bool) -> Result<Action, Error> {
    let ns = asset.namespace().unwrap_or_else(|| "default".into());
    let name = asset.name_any();
    let uid = asset.uid().unwrap_or_default();
    let api: Api<DeserializeGuard<SlurmAsset>> = Api::namespaced(ctx.client.clone(), &ns);
    let before = asset.status.clone().unwrap_or_default();
    let generation = asset.metadata.generation.unwrap_or(1);
    let resolved = resolve(asset, ctx).await;
    let invalid = resolved.as_ref().err().cloned();
    let spec = &asset.spec;
    let needs_env = resolved.as_ref().is_ok_and(|r| r.env.is_some());
    let input = Input {
        generation,
        run_key: spec.run_key.as_deref(),
        invalid: invalid.as_deref(),
        suspend: spec.suspend,
        retry_limit: spec.retry.limit,
        retry_backoff: spec.retry.backoff.duration(),
        retry_on_payload_failure: spec.retry.on_payload_failure,
        cleanup_on_failure: spec.cleanup_on_failure,
        debug: spec.debug,
        deleted,
        needs_env,
        now: Timestamp::now(),
    };
    let (backend, poll, resources, cluster) = match &resolved {
        Ok(r) => (
            r.backend.clone(),
            r.poll,
            r.spec.resources.merged_over(&r.cluster.queue),
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
        namespace: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        run,
        attempt,
        epoch: ctx.epoch,
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
        plan(&r.spec, id(run, attempt), &ctx_plan)
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
            req.sources = env_sources(
                ctx,
                &ns,
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
        env: needs_env.then_some(&prepare_env as &crate::backend::PrepareFn),
        plan: &plan_fn,
        tag: id(before.run, before.attempts.max(1)).tag(),
        job: JobRef {
            in_session: false,
            step_id: None,
            job_id: before.job_id.clone(),
            run_dir: before.remote_run_dir.clone().unwrap_or_default(),
            resources: resources.clone(),
        },
        requested_mem: resources.requested_memory(),
        poll,
    };
    let mut reader = ctx.readers.lock().await.remove(&uid).unwrap_or_default();
    let driven = drive(before.clone(), &input, Event::Resync, &work, &mut reader).await;
    ctx.readers.lock().await.insert(uid.clone(), reader);
    let after = driven.status;
    if after != before {
        patch_status(&api, &name, &after).await?;
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
        // Something a user must act on (an unreachable cluster) is a Warning from the start.
        let attention = needs_action(after.message.as_deref());
        let warn = matches!(after.phase, Phase::Failed) || attention.is_some();
        let ev = KubeEvent {
            type_: if warn {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: attention.map(str::to_string).unwrap_or_else(|| {
                after
                    .reason
                    .clone()
                    .unwrap_or_else(|| after.phase.as_str().to_string())
            }),
            note: Some(format!(
                "run {}: {} → {}{}",
                after.run,
                before.phase.as_str(),
                after.phase.as_str(),
                after
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
            // Events are folded by (type, reason, action): naming the run keeps each run's
            // own Event instead of counting later runs into the first one's.
            action: format!("Run{}", after.run),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &asset.object_ref(&())).await {
            tracing::warn!("publishing an event: {e}");
        }
    } else if let Some(reason) = needs_action(after.message.as_deref())
        && needs_action(before.message.as_deref()) != Some(reason)
    {
        // No phase change, but something a user must act on (credentials, network, a job
        // that cannot be cancelled): say it once, when it starts.
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: after.message.clone(),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &asset.object_ref(&())).await {
            tracing::warn!("publishing an event: {e}");
        }
    }
    if deleted {
        let active = matches!(
            after.phase,
            Phase::Packing | Phase::Uploading | Phase::Submitting | Phase::Queued | Phase::Running
        );
        if active {
            let since = asset
                .meta()
                .deletion_timestamp
                .as_ref()
                .map(|t| Timestamp::now().duration_since(t.0).as_secs())
                .unwrap_or(0);
            let forced = asset
                .annotations()
                .get(FORCE_RELEASE)
                .is_some_and(|v| v == "true");
            if !forced && since < ctx.release_grace.as_secs() as i64 {
                return Err(Error::CancelPending(after.message.unwrap_or_default()));
            }
            let ev = KubeEvent {
                type_: EventType::Warning,
                reason: "ReleasedWithoutCancel".into(),
                note: Some(format!(
                    "job {} could not be cancelled; released {}",
                    after.job_id.unwrap_or_default(),
                    if forced {
                        "by annotation"
                    } else {
                        "after the grace period"
                    }
                )),
                action: "Delete".into(),
                secondary: None,
            };
            let _ = ctx.recorder.publish(&ev, &asset.object_ref(&())).await;
        }
        ctx.readers.lock().await.remove(&uid);
        ctx.metrics.asset_phase(&uid, None);
        return Ok(Action::await_change());
    }
    Ok(match (driven.submit_after, driven.watch) {
        (Some(d), _) => Action::requeue(d),
        // Just ended: its metrics are due within seconds.
        (None, true) if driven.again_soon => Action::requeue(poll.min(AGAIN_SOON)),
        (None, true) => Action::requeue(poll),
        // Invalid for want of a Secret, perhaps, and no Secret watch to say when it comes.
        (None, false) if invalid.is_some() && !ctx.watch_secrets => Action::requeue(SECRET_RECHECK),
        (None, false) => Action::await_change(),
    })
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

/// The Event reason of a status message that asks a user to act, if it does.
fn needs_action(message: Option<&str>) -> Option<&'static str> {
    let m = message?;
    if m.starts_with("cluster unreachable") {
        Some("ClusterUnreachable")
    } else if m.starts_with("cancel not confirmed") {
        Some("CancelNotConfirmed")
    } else if m.starts_with("submission refused") {
        Some("SubmissionRefused")
    } else {
        None
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

/// Resolves the asset's references, or says which field is wrong and why.
async fn resolve(asset: &SlurmAsset, ctx: &Context) -> Result<Resolved, String> {
    let ns = asset.namespace().unwrap_or_else(|| "default".into());
    let mut spec = asset.spec.clone();
    let errors = validate_asset(&spec, StoreKind::Kubernetes, std::path::Path::new("/"));
    if !errors.is_empty() {
        return Err(describe(&errors));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(r) = spec.payload.config_map_ref.take() {
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
        let cm = cms
            .get_opt(&r.name)
            .await
            .map_err(|e| format!("spec.payload.configMapRef: {e}"))?
            .ok_or_else(|| {
                format!(
                    "spec.payload.configMapRef: ConfigMap {:?} not found",
                    r.name
                )
            })?;
        let text = cm
            .data
            .and_then(|d| d.get(&r.key).cloned())
            .ok_or_else(|| {
                format!(
                    "spec.payload.configMapRef: ConfigMap {:?} has no key {:?}",
                    r.name, r.key
                )
            })?;
        // The key is the script's file name: the same interpreter rule as `payload.path`.
        if spec.payload.interpreter.is_none() && r.key.ends_with(".py") {
            spec.payload.interpreter = Some(vec!["python3".into()]);
        }
        spec.payload.inline = Some(text);
    }
    for (i, e) in spec.env.iter_mut().enumerate() {
        if let Some(from) = e.value_from.take() {
            let r = from.secret_key_ref;
            e.value = Some(
                secret_value(
                    &secrets,
                    &r.name,
                    &r.key,
                    &format!("spec.env[{i}].valueFrom.secretKeyRef"),
                )
                .await?,
            );
        }
    }
    let mut cluster_ref = None;
    let cluster = match &spec.cluster_ref {
        None => SlurmClusterSpec::default(),
        Some(name) => {
            let api: Api<SlurmCluster> = Api::namespaced(ctx.client.clone(), &ns);
            let c = api
                .get_opt(name)
                .await
                .map_err(|e| format!("spec.clusterRef: {e}"))?
                .ok_or_else(|| {
                    format!("spec.clusterRef: SlurmCluster {name:?} not found in namespace {ns:?}")
                })?;
            let errors = validate_cluster(&c.spec, StoreKind::Kubernetes);
            if !errors.is_empty() {
                return Err(format!(
                    "spec.clusterRef: SlurmCluster {name:?} is invalid: {}",
                    describe(&errors)
                ));
            }
            cluster_ref = Some((name.clone(), c.metadata.generation));
            c.spec
        }
    };
    let (backend, poll) = match cluster.mode {
        ClusterMode::Local if !ctx.allow_local => {
            return Err(format!(
                "spec.clusterRef: {} runs payloads on the operator's own host, which is disabled in Kubernetes mode (an administrator can start the operator with --allow-local-execution); name a SlurmCluster in slurm mode",
                match &spec.cluster_ref {
                    Some(name) => format!("SlurmCluster {name:?} is in local mode and"),
                    None => "no clusterRef means the implicit local cluster, which".to_string(),
                }
            ));
        }
        ClusterMode::Local => (Backend::Local(ctx.local.clone()), POLL_LOCAL),
        ClusterMode::Slurm => {
            let key = format!("{ns}/{}", spec.cluster_ref.clone().unwrap_or_default());
            let target = ssh_target(&cluster, &secrets, &ctx.work_dir, &key).await?;
            let mut map = ctx.slurm.lock().await;
            let ex = match map.get(&key) {
                Some(ex) if *ex.target() == target => ex.clone(),
                _ => {
                    let ex = Arc::new(SlurmExecutor::new(
                        target,
                        ctx.exe.clone(),
                        ctx.counters.clone(),
                    ));
                    ex.watch_exits(ctx.exits.clone());
                    map.insert(key, ex.clone());
                    ex
                }
            };
            (Backend::Slurm(ex), POLL_SLURM)
        }
    };
    let poll = cluster
        .poll_interval
        .as_ref()
        .map(|i| i.duration())
        .unwrap_or(poll);
    let env = env_request(ctx, &spec, &cluster);
    Ok(Resolved {
        spec,
        cluster,
        cluster_ref,
        backend,
        poll,
        env,
    })
}

/// The sources of an environment in Kubernetes mode: the keys of
/// `spec.environment.sourcesConfigMap` (the operator's pod has no checkout). Read only when
/// the environment is prepared; a ConfigMap not there yet is waited for (its watch wakes
/// the asset).
async fn env_sources(
    ctx: &Context,
    ns: &str,
    name: Option<&str>,
) -> Result<crate::environment::Sources, crate::environment::EnvError> {
    use crate::environment::EnvError;
    let mut files = std::collections::BTreeMap::new();
    if let Some(name) = name {
        let field = "spec.environment.sourcesConfigMap";
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let cm = cms
            .get_opt(name)
            .await
            .map_err(|e| EnvError::transient(format!("{field}: {e}")))?
            .ok_or_else(|| EnvError::transient(format!("{field}: ConfigMap {name:?} not found")))?;
        for (k, v) in cm.data.unwrap_or_default() {
            files.insert(k, v.into_bytes());
        }
        for (k, v) in cm.binary_data.unwrap_or_default() {
            files.insert(k, v.0);
        }
    }
    Ok(crate::environment::Sources::Map(files))
}

/// The environment an asset packs, if it packs one (its sources still to be read).
fn env_request(
    ctx: &Context,
    spec: &SlurmAssetSpec,
    cluster: &SlurmClusterSpec,
) -> Option<crate::environment::EnvRequest> {
    use crate::environment::{EnvRequest, Sources};
    let merged = spec.environment.merged_over(&cluster.environment);
    merged.packer()?;
    let remote_base = match cluster.mode {
        ClusterMode::Slurm => cluster.remote_base.clone(),
        ClusterMode::Local => {
            let local_base = ctx.work_dir.join("runs");
            Some(crate::jobscript::base_dir(&PlanContext {
                asset_dir: &local_base,
                cluster,
                cluster_dir: &local_base,
                default_base: local_base.clone(),
                remote_home: None,
            }))
        }
    };
    EnvRequest::from_settings(
        &merged,
        Sources::Map(Default::default()),
        remote_base,
        cluster.env_cache.as_ref(),
        true,
    )
}

async fn secret_value(
    api: &Api<Secret>,
    name: &str,
    key: &str,
    field: &str,
) -> Result<String, String> {
    let s = api
        .get_opt(name)
        .await
        .map_err(|e| format!("{field}: {e}"))?
        .ok_or_else(|| format!("{field}: Secret {name:?} not found"))?;
    let bytes = s
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| format!("{field}: Secret {name:?} has no key {key:?}"))?;
    String::from_utf8(bytes.0)
        .map_err(|_| format!("{field}: Secret {name:?} key {key:?} is not UTF-8"))
}

/// SSH settings from the cluster spec and its Secrets. Key and known-hosts material go to
/// private files (0600) in the operator's work directory; nothing is logged.
async fn ssh_target(
    c: &SlurmClusterSpec,
    secrets: &Api<Secret>,
    work: &std::path::Path,
    key: &str,
) -> Result<SshTarget, String> {
    let ssh = c.ssh.clone().ok_or("spec.ssh: required in slurm mode")?;
    let private = |name: &str, content: &str| -> Result<PathBuf, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = work.join("ssh");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join(format!(
            "{}-{name}",
            crate::manifest::hash_value(&serde_json::json!(key))
        ));
        let mut text = content.to_string();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        // Concurrent reconciles of one cluster's assets must not rewrite it under ssh's feet.
        crate::files::write_private_once(&file, text.as_bytes())
            .map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(file)
    };
    let auth = if let Some(r) = &ssh.key_secret_ref {
        let k = secret_value(secrets, &r.name, &r.key, "spec.ssh.keySecretRef").await?;
        SshAuth::KeyFile(private("key", &k)?)
    } else if let Some(r) = &ssh.password_secret_ref {
        SshAuth::Password(
            secret_value(secrets, &r.name, &r.key, "spec.ssh.passwordSecretRef").await?,
        )
    } else {
        return Err("spec.ssh: set keySecretRef or passwordSecretRef".into());
    };
    let totp_seed = match &ssh.totp_secret_ref {
        Some(r) => {
            let field = "spec.ssh.totpSecretRef";
            let seed = secret_value(secrets, &r.name, &r.key, field).await?;
            crate::transport::totp_code(&seed, 0)
                .map_err(|e| format!("{field}: Secret {:?} key {:?}: {e}", r.name, r.key))?;
            Some(seed)
        }
        None => None,
    };
    let known_hosts = match &ssh.known_hosts {
        Some(kh) if kh.secret_ref.is_some() => {
            let r = kh.secret_ref.as_ref().expect("checked");
            let text =
                secret_value(secrets, &r.name, &r.key, "spec.ssh.knownHosts.secretRef").await?;
            Some(private("known_hosts", &text)?)
        }
        Some(kh) if kh.entries.is_some() => Some(private(
            "known_hosts",
            &kh.entries.clone().unwrap_or_default().join("\n"),
        )?),
        Some(kh) => kh.path.as_ref().map(PathBuf::from),
        None => None,
    };
    Ok(SshTarget {
        jump_hosts: ssh
            .jump_hosts
            .iter()
            .map(|j| {
                format!(
                    "{}@{}:{}",
                    j.user.clone().unwrap_or_else(|| ssh.user.clone()),
                    j.host,
                    j.port
                )
            })
            .collect(),
        host: ssh.host,
        port: ssh.port,
        user: ssh.user,
        auth,
        known_hosts,
        extra_options: ssh.extra_options.into_iter().collect(),
        connect_timeout: ssh
            .connect_timeout
            .map(|t| t.duration())
            .unwrap_or(Duration::from_secs(10)),
        totp_seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_dir_names_its_asset() {
        let r = asset_of_run_dir("/home/u/sao/runs/team-a/train/3-1").unwrap();
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("train", Some("team-a"))
        );
        assert!(asset_of_run_dir("/home/u/sao/train/3-1").is_none());
        assert!(asset_of_run_dir("3-1").is_none());
    }
}
