//! Standalone mode: a directory of manifests is the store, status files are the output.
//!
//! The driver feeds the pure [`crate::core`] with events from the file watcher, the clock and
//! the executor, and carries out the actions it returns. One task owns all state, so no locks.

mod changes;
pub mod clusters;
mod index;
mod persist;
mod sessions;
pub mod store;

use crate::api::{ClusterMode, Phase, SlurmAssetSpec, SlurmAssetStatus, SlurmClusterSpec};
use crate::core::{self, Action, Event, Input};
use crate::environment::{EnvHost, EnvRequest, Sources};
use crate::executor::local::LocalExecutor;
use crate::executor::slurm::{ClusterFacts, Counters};
use crate::executor::{JobRef, JobTrack};
use crate::jobscript::{PlanContext, RunId, RunPlan, plan};
use crate::manifest::{Kind, Loaded, ManifestError, describe};
use crate::worker::{ClusterWorker, PollItem, Reply, Request};
use crate::{Error, Result};
use changes::Change;
use index::ManifestIndex;
use jiff::Timestamp;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::{ObjectKey, Stored, WriteCache};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Poll interval of local clusters that set none.
const LOCAL_POLL: Duration = Duration::from_millis(500);
const SLURM_POLL: Duration = Duration::from_secs(10);
/// Wait before retrying a submission that could not reach its cluster.
/// How often an asset waiting for its session's allocation asks again.
const SESSION_WAIT: Duration = Duration::from_secs(1);
const TRANSPORT_RETRY: Duration = Duration::from_secs(5);
/// How often clusters found without accounting are probed again.
const REPROBE: Duration = Duration::from_secs(30);
/// When a job that just ended is observed again for its last figures (accounting records the
/// end a moment after the exit file).
const AGAIN_SOON: Duration = Duration::from_secs(2);
/// How soon an urgent poll is tried again while the cluster's previous poll is in flight.
const URGENT_RETRY: Duration = Duration::from_millis(100);

pub struct Options {
    pub dir: PathBuf,
    /// Exit once every asset is terminal.
    pub once: bool,
    /// The operator binary (re-executed as the local supervisor).
    pub exe: PathBuf,
}

/// How a `--once` pass ended.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub succeeded: usize,
    pub failed: usize,
    pub manifest_errors: usize,
}

struct AssetEntry {
    /// For a session's allocation: the manifest as written (its spec is the session's).
    loaded: Option<Loaded>,
    /// The session's spec, when this entry is a session's allocation.
    session: Option<crate::api::SlurmSessionSpec>,
    /// The session status written last (its conditions keep their transition times).
    session_status: Option<crate::api::SlurmSessionStatus>,
    /// `spec.clusterRef` as last seen (kept when the manifest goes away).
    cluster_ref: Option<String>,
    uid: String,
    generation: i64,
    spec_hash: String,
    status: SlurmAssetStatus,
    deleted: bool,
    next_poll: Option<Instant>,
    submit_at: Option<Instant>,
    track: JobTrack,
    track_dir: Option<String>,
    /// A submission sent to the cluster's worker and not answered yet: (run, attempt).
    submitting: Option<(u64, u32)>,
    /// The run whose environment is being prepared.
    preparing: Option<u64>,
    /// When to try preparing the environment again.
    env_at: Option<Instant>,
    /// A cancellation sent and not answered yet.
    cancelling: bool,
    /// The job is in a batched poll that has not answered yet (its track is with it).
    polling: bool,
    /// The next poll is due because the job ended (its exit file appeared, or its last
    /// figures are coming), not because the interval passed: it does not wait for a poll in
    /// flight, and the cluster's other jobs do not ride along.
    urgent: bool,
}

impl AssetEntry {
    fn spec(&self) -> Option<&SlurmAssetSpec> {
        self.loaded.as_ref().and_then(Loaded::asset)
    }
}

/// Owned facts for one decision (the core borrows them).
struct Facts {
    generation: i64,
    run_key: Option<String>,
    invalid: Option<String>,
    suspend: bool,
    retry: crate::api::Retry,
    cleanup_on_failure: bool,
    debug: bool,
    deleted: bool,
    needs_env: bool,
}

pub struct Driver {
    dir: PathBuf,
    /// Which file defines which object.
    index: ManifestIndex,
    /// Manifest files to read again, and when.
    dirty: HashMap<PathBuf, Instant>,
    /// When to read the whole directory again (after a folder appeared).
    rescan_at: Option<Instant>,
    /// When the clusters found without accounting are probed again (their status says so
    /// until accounting answers; the worker asks the cluster again at most once a minute).
    reprobe_at: Instant,
    executor: LocalExecutor,
    assets: BTreeMap<ObjectKey, AssetEntry>,
    /// The assets naming each session, kept with `assets` (see [`Driver::reindex_member`]):
    /// a session's status lists them without a scan of every asset.
    members: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    clusters: BTreeMap<ObjectKey, Loaded>,
    errors: Vec<ManifestError>,
    logged: HashSet<String>,
    cache: WriteCache,
    exe: PathBuf,
    /// One worker per Slurm cluster; it owns the cluster's connection.
    workers: HashMap<ObjectKey, ClusterWorker<ObjectKey>>,
    /// The manifest spec hash each worker was made for.
    worker_specs: HashMap<ObjectKey, String>,
    replies: tokio::sync::mpsc::UnboundedSender<(ObjectKey, Reply<ObjectKey>)>,
    /// Clusters with a batched poll or a probe under way.
    polling: HashSet<ObjectKey>,
    probing: HashSet<ObjectKey>,
    /// The last probe's answer per cluster.
    probes: HashMap<ObjectKey, std::result::Result<ClusterFacts, String>>,
    counters: Arc<Counters>,
}

/// Everything an attempt's plan is built from, owned, so a cluster's worker can build it.
struct PlanInputs {
    spec: SlurmAssetSpec,
    cluster: SlurmClusterSpec,
    asset_dir: PathBuf,
    cluster_dir: PathBuf,
    local_base: PathBuf,
    namespace: String,
    name: String,
    uid: String,
    /// The run's packed environment, once ready.
    env: Option<crate::api::EnvStatus>,
    /// A session step: where its session's allocation runs.
    session: Option<crate::session::StepTarget>,
    /// This is a session's allocation (its agent keeps to the time limit).
    is_session: bool,
}

impl PlanInputs {
    fn capture(d: &Driver, key: &ObjectKey) -> std::result::Result<PlanInputs, String> {
        let entry = &d.assets[key];
        let loaded = entry.loaded.as_ref().ok_or("the manifest is gone")?;
        let spec = loaded.asset().ok_or("the spec is invalid")?;
        let rc = d.cluster_for(key, spec.cluster_ref.as_deref())?;
        Ok(PlanInputs {
            spec: spec.clone(),
            cluster: rc.spec,
            asset_dir: loaded.file.parent().unwrap_or(&d.dir).to_path_buf(),
            cluster_dir: rc.dir,
            local_base: d.dir.join(".runs"),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: entry.uid.clone(),
            env: entry.status.env.clone(),
            session: None,
            is_session: key.kind == Kind::SlurmSession,
        })
    }

    fn plan(
        &self,
        run: u64,
        attempt: u32,
        remote_home: Option<&str>,
    ) -> std::result::Result<RunPlan, String> {
        let ctx = PlanContext {
            asset_dir: &self.asset_dir,
            cluster: &self.cluster,
            cluster_dir: &self.cluster_dir,
            default_base: match remote_home {
                Some(home) => {
                    PathBuf::from(format!("{home}/{}", crate::jobscript::DEFAULT_REMOTE_BASE))
                }
                None => self.local_base.clone(),
            },
            remote_home,
        };
        let id = RunId {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            run,
            attempt,
            epoch: 0,
            session: self.is_session,
        };
        let mut spec = self.spec.clone();
        if self.is_session {
            crate::session::keep_to_time_limit(&mut spec, &self.cluster.queue);
        }
        let mut p = plan(&spec, id, &ctx)?;
        p.use_env(self.env.as_ref());
        if let Some(t) = &self.session {
            p.session = Some(crate::session::Placement {
                session_dir: t.dir.clone(),
                job_id: t.job_id.clone(),
                srun: crate::session::step_options(
                    &self.spec.resources,
                    &p.id.tag(),
                    &p.run_dir,
                    t.ray_driver,
                ),
            });
        }
        Ok(p)
    }
}

/// Local mode runs on one host: a request that host cannot hold fails at once, naming the
/// field, instead of pretending to run with resources it does not have.
fn local_fit(r: &crate::api::Resources) -> std::result::Result<(), String> {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let cpus = u64::from(r.cpus_per_task.unwrap_or(1)) * u64::from(r.ntasks.unwrap_or(1));
    if cpus > host {
        return Err(format!(
            "spec.resources.cpusPerTask: {cpus} CPUs requested (cpusPerTask x ntasks), but the operator's host has {host} (local mode)"
        ));
    }
    if r.nodes.is_some_and(|n| n > 1) {
        return Err("spec.resources.nodes: local mode runs on one node".into());
    }
    Ok(())
}

/// The key under which local cancellations answer (local mode has no worker).
fn local_key() -> ObjectKey {
    ObjectKey {
        kind: Kind::SlurmCluster,
        namespace: String::new(),
        name: String::new(),
    }
}

/// A cluster as an asset sees it: explicit, or the implicit local one.
struct ResolvedCluster {
    spec: SlurmClusterSpec,
    dir: PathBuf,
    key: Option<ObjectKey>,
    /// The manifest's spec hash: while it is unchanged, so is the cluster's worker.
    spec_hash: String,
}

/// Runs standalone mode until interrupted, or until every asset is terminal with `once`.
pub async fn run(opts: Options) -> Result<Outcome> {
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| Error::io(&opts.dir, e))?;
    let (replies, mut reply_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut driver = Driver {
        dir: dir.clone(),
        index: ManifestIndex::default(),
        dirty: HashMap::new(),
        executor: LocalExecutor::new(opts.exe.clone()),
        exe: opts.exe,
        workers: HashMap::new(),
        worker_specs: HashMap::new(),
        replies,
        polling: HashSet::new(),
        probing: HashSet::new(),
        probes: HashMap::new(),
        rescan_at: None,
        reprobe_at: Instant::now() + REPROBE,
        counters: Arc::new(Counters::default()),
        assets: BTreeMap::new(),
        members: BTreeMap::new(),
        clusters: BTreeMap::new(),
        errors: vec![],
        logged: HashSet::new(),
        cache: WriteCache::new(store::Modes::of(&dir)),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
    let watch_root = dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        for change in changes::classify(&watch_root, &res, Instant::now()) {
            tracing::debug!("manifest change: {change:?}");
            let _ = tx.send(change);
        }
    })?;
    notify::Watcher::watch(&mut watcher, &dir, notify::RecursiveMode::Recursive)?;
    driver.rescan(true).await;
    if driver.assets.is_empty() && driver.clusters.is_empty() && driver.errors.is_empty() {
        let what = format!(
            "{}: no manifests found (*.yaml or *.yml files with SlurmAsset, SlurmCluster or SlurmSession objects)",
            dir.display()
        );
        if opts.once {
            return Err(Error::Usage(what));
        }
        warn!("{what}; watching for them");
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Executor(format!("installing the SIGTERM handler: {e}")))?;
    loop {
        if driver.rescan_at.is_some_and(|t| t <= Instant::now()) {
            driver.rescan_at = None;
            driver.dirty.clear();
            driver.rescan(false).await;
        }
        driver.reread_due().await;
        driver.tick().await;
        if opts.once && driver.all_done() {
            break;
        }
        let wait = driver.next_wakeup();
        tokio::select! {
            Some(change) = rx.recv() => {
                // Take the whole burst; each file is read once, when its change is due.
                let mut full = driver.note_change(change);
                while let Ok(change) = rx.try_recv() {
                    full |= driver.note_change(change);
                }
                if full {
                    driver.dirty.clear();
                    driver.rescan(false).await;
                }
                driver.reread_due().await;
            }
            Some((cluster, reply)) = reply_rx.recv() => {
                driver.on_reply(cluster, reply).await;
                // Answers often come in bursts: take what is already there.
                while let Ok((cluster, reply)) = reply_rx.try_recv() {
                    driver.on_reply(cluster, reply).await;
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => { info!("interrupted; running jobs continue and are adopted on restart"); break; }
            _ = sigterm.recv() => { info!("terminated; running jobs continue and are adopted on restart"); break; }
        }
    }
    // The SSH masters would otherwise linger for their ControlPersist time.
    for worker in driver.workers.values() {
        worker.executor.close().await;
    }
    Ok(driver.outcome())
}

impl Driver {
    fn outcome(&self) -> Outcome {
        let mut o = Outcome {
            manifest_errors: self.errors.len(),
            ..Default::default()
        };
        for a in self.assets.values() {
            match a.status.phase {
                Phase::Succeeded => o.succeeded += 1,
                Phase::Failed | Phase::Cancelled => o.failed += 1,
                _ => {}
            }
        }
        o
    }

    fn all_done(&self) -> bool {
        self.assets.values().all(|a| {
            a.submit_at.is_none()
                && a.submitting.is_none()
                && a.preparing.is_none()
                && a.env_at.is_none()
                && !a.cancelling
                && !a.polling
                // An ended job's metrics are due within seconds: wait for them.
                && !(a.urgent && a.next_poll.is_some())
                && (a.status.phase.is_terminal() || a.status.reason.as_deref() == Some("Suspended"))
        })
    }

    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        self.assets
            .values()
            .flat_map(|a| [a.next_poll, a.submit_at, a.env_at])
            .flatten()
            .chain(self.dirty.values().copied())
            .chain(self.rescan_at)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5))
    }

    /// Records a change; `true` when the whole directory must be read again.
    fn note_change(&mut self, change: Change) -> bool {
        match change {
            Change::Rescan => true,
            Change::RescanAt(at) => {
                self.rescan_at = Some(self.rescan_at.map_or(at, |t| t.max(at)));
                false
            }
            Change::File(path, at) => {
                let due = self.dirty.entry(path).or_insert(at);
                // A later event for a file being written pushes its read back.
                *due = (*due).max(at);
                if at <= Instant::now() {
                    *due = at;
                }
                false
            }
        }
    }

    /// Reads the manifest files whose changes are due, and reconciles what they changed.
    async fn reread_due(&mut self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .dirty
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let mut affected: Vec<ObjectKey> = vec![];
        let mut changed_clusters: Vec<ObjectKey> = vec![];
        for path in due {
            self.dirty.remove(&path);
            let (objects, errors) = store::read_manifests(&self.dir, &path);
            let change = self.index.apply_file(&path, objects, errors);
            for key in change.removed {
                match key.kind {
                    Kind::SlurmCluster => {
                        self.clusters.remove(&key);
                        changed_clusters.push(key);
                    }
                    Kind::SlurmAsset | Kind::SlurmSession => {
                        if let Some(entry) = self.assets.get_mut(&key)
                            && !entry.deleted
                        {
                            info!("{key}: manifest removed");
                            entry.deleted = true;
                            affected.push(key);
                        }
                    }
                }
            }
            for obj in change.upserts {
                let key = obj.key();
                match key.kind {
                    Kind::SlurmCluster => {
                        if self.clusters.get(&key).map(|c| &c.spec_hash) != Some(&obj.spec_hash) {
                            self.clusters.insert(key.clone(), obj);
                            changed_clusters.push(key);
                        }
                    }
                    Kind::SlurmAsset | Kind::SlurmSession => {
                        self.upsert_asset(key.clone(), obj);
                        affected.push(key);
                    }
                }
            }
        }
        self.publish_errors();
        for ckey in &changed_clusters {
            if self.clusters.contains_key(ckey) {
                self.probe(ckey);
                self.write_cluster_status(ckey);
            }
            // The assets on a changed cluster are reconciled against it.
            affected.extend(
                self.assets
                    .iter()
                    .filter(|(k, a)| {
                        k.namespace == ckey.namespace
                            && a.cluster_ref.as_deref() == Some(ckey.name.as_str())
                    })
                    .map(|(k, _)| k.clone()),
            );
        }
        affected.sort();
        affected.dedup();
        for key in affected {
            if self.assets.contains_key(&key) {
                self.step(&key, Event::Resync).await;
            }
        }
    }

    /// Logs new manifest errors once and writes `errors.yaml`.
    fn publish_errors(&mut self) {
        self.errors = self.index.errors();
        for e in &self.errors {
            let msg = e.to_string();
            if self.logged.insert(msg.clone()) {
                error!("{msg}");
            }
        }
        if let Err(e) = store::write_errors(&self.dir, &self.errors, self.cache.modes) {
            error!("{e}");
        }
    }

    /// Re-reads the directory and reconciles every object against it.
    async fn rescan(&mut self, startup: bool) {
        let snap = store::scan(&self.dir);
        self.index = ManifestIndex::of_scan(snap.objects.values(), &snap.errors);
        for e in &snap.errors {
            let msg = e.to_string();
            if self.logged.insert(msg.clone()) {
                error!("{msg}");
            }
        }
        self.errors = snap.errors;
        if let Err(e) = store::write_errors(&self.dir, &self.errors, self.cache.modes) {
            error!("{e}");
        }
        self.clusters.clear();
        let mut seen = HashSet::new();
        for (key, obj) in snap.objects {
            match key.kind {
                Kind::SlurmCluster => {
                    self.clusters.insert(key, obj);
                }
                Kind::SlurmAsset | Kind::SlurmSession => {
                    seen.insert(key.clone());
                    self.upsert_asset(key, obj);
                }
            }
        }
        let cluster_keys: Vec<ObjectKey> = self.clusters.keys().cloned().collect();
        for key in cluster_keys {
            self.probe(&key);
            self.write_cluster_status(&key);
        }
        if startup {
            // Status files whose manifest vanished while the operator was down: their jobs
            // may still run, so they are treated as deletions.
            let stored_keys = [Kind::SlurmAsset, Kind::SlurmSession]
                .into_iter()
                .flat_map(|k| store::status_keys(&self.dir, k));
            for key in stored_keys {
                if seen.contains(&key) {
                    continue;
                }
                if let Some(stored) = store::read_stored(&self.dir, &key)
                    && !stored.deleted
                {
                    let mut entry = self.entry_from(None, Some(stored), String::new());
                    entry.deleted = true;
                    self.assets.insert(key, entry);
                }
            }
        }
        for (key, entry) in self.assets.iter_mut() {
            if !seen.contains(key) && !entry.deleted {
                info!("{key}: manifest removed");
                entry.deleted = true;
            }
        }
        let keys: Vec<ObjectKey> = self.assets.keys().cloned().collect();
        for key in keys {
            self.step(&key, Event::Resync).await;
        }
    }

    fn entry_from(
        &self,
        loaded: Option<Loaded>,
        stored: Option<Stored>,
        hash: String,
    ) -> AssetEntry {
        let cluster_ref = match (&loaded, &stored) {
            (Some(l), _) => l.asset().and_then(|a| a.cluster_ref.clone()),
            (None, Some(s)) => s.cluster_ref.clone(),
            (None, None) => None,
        };
        let mut session_status = None;
        let (uid, generation, status) = match stored {
            Some(s) if !s.deleted => {
                let generation = if s.spec_hash == hash || hash.is_empty() {
                    s.generation
                } else {
                    s.generation + 1
                };
                // A session's status file holds its allocation's record as `allocation`.
                let status = if s.status.get("allocation").is_some() {
                    serde_json::from_value::<crate::api::SlurmSessionStatus>(s.status.clone()).map(
                        |st| {
                            session_status = Some(st.clone());
                            st.allocation
                        },
                    )
                } else {
                    serde_json::from_value(s.status)
                }
                .unwrap_or_else(|e| {
                    warn!("unreadable status file, starting afresh: {e}");
                    SlurmAssetStatus::default()
                });
                (s.uid, generation, status)
            }
            _ => (
                uuid::Uuid::new_v4().to_string(),
                1,
                SlurmAssetStatus::default(),
            ),
        };
        AssetEntry {
            cluster_ref,
            session: None,
            session_status,
            loaded,
            uid,
            generation,
            spec_hash: hash,
            status,
            deleted: false,
            next_poll: None,
            submit_at: None,
            track: JobTrack::default(),
            track_dir: None,
            submitting: None,
            preparing: None,
            env_at: None,
            cancelling: false,
            polling: false,
            urgent: false,
        }
    }

    fn upsert_asset(&mut self, key: ObjectKey, obj: Loaded) {
        // A session is driven as the internal asset that holds its allocation.
        let session = obj.session().cloned();
        let mut obj = obj;
        if let Some(s) = &session {
            obj.spec = Ok(crate::manifest::Spec::Asset(Box::new(
                crate::session::allocation_spec(&key.name, s),
            )));
        }
        if let Some(entry) = self.assets.get_mut(&key)
            && !entry.deleted
        {
            if entry.spec_hash != obj.spec_hash {
                info!("{key}: spec changed");
                entry.generation += 1;
                entry.spec_hash = obj.spec_hash.clone();
            }
            entry.cluster_ref = obj.asset().and_then(|a| a.cluster_ref.clone());
            let was = self.session_of(&key);
            let entry = self.assets.get_mut(&key).expect("known");
            entry.loaded = Some(obj);
            if session.is_some() {
                entry.session = session;
            }
            self.reindex_member(&key, was);
            return;
        }
        let stored = store::read_stored(&self.dir, &key);
        let hash = obj.spec_hash.clone();
        let mut entry = self.entry_from(Some(obj), stored, hash);
        entry.session = session;
        let was = self.session_of(&key);
        self.assets.insert(key.clone(), entry);
        self.reindex_member(&key, was);
    }

    fn facts(&self, key: &ObjectKey) -> Facts {
        let entry = &self.assets[key];
        let spec = entry.spec();
        let cluster = spec.map(|s| self.cluster_for(key, s.cluster_ref.as_deref()));
        let invalid = match (&entry.loaded, spec) {
            (Some(l), None) => Some(match &l.spec {
                Err(errors) => describe(errors),
                Ok(_) => "not a SlurmAsset".into(),
            }),
            (_, Some(_)) => cluster.as_ref().and_then(|c| c.as_ref().err().cloned()),
            (None, None) => None,
        };
        let retry = spec.map(|s| s.retry.clone()).unwrap_or_default();
        Facts {
            generation: entry.generation,
            run_key: spec.and_then(|s| s.run_key.clone()),
            invalid,
            suspend: spec.is_some_and(|s| s.suspend),
            retry,
            cleanup_on_failure: spec.is_some_and(|s| s.cleanup_on_failure),
            debug: spec.is_some_and(|s| s.debug),
            deleted: entry.deleted,
            needs_env: match (spec, &cluster) {
                (Some(s), Some(Ok(rc))) => s
                    .environment
                    .merged_over(&rc.spec.environment)
                    .packer()
                    .is_some(),
                _ => false,
            },
        }
    }

    /// The environment the asset's current run packs, if it packs one.
    fn env_request(&self, key: &ObjectKey) -> std::result::Result<Option<EnvRequest>, String> {
        let entry = &self.assets[key];
        let loaded = entry.loaded.as_ref().ok_or("the manifest is gone")?;
        let spec = loaded.asset().ok_or("the spec is invalid")?;
        let rc = self.cluster_for(key, spec.cluster_ref.as_deref())?;
        let merged = spec.environment.merged_over(&rc.spec.environment);
        let asset_dir = loaded.file.parent().unwrap_or(&self.dir).to_path_buf();
        // Local clusters keep their cache beside their run dirs, as the plan places them.
        let remote_base = match rc.spec.mode {
            ClusterMode::Slurm => rc.spec.remote_base.clone(),
            ClusterMode::Local => Some(crate::jobscript::base_dir(&PlanContext {
                asset_dir: &asset_dir,
                cluster: &rc.spec,
                cluster_dir: &rc.dir,
                default_base: self.dir.join(".runs"),
                remote_home: None,
            })),
        };
        Ok(EnvRequest::from_settings(
            &merged,
            Sources::Dir(asset_dir),
            remote_base,
            rc.spec.env_cache.as_ref(),
            false,
        ))
    }

    /// Starts preparing the run's environment on its own task; the answer comes back as
    /// [`Reply::EnvPrepared`].
    fn prepare_env(&mut self, key: &ObjectKey, run: u64) -> Option<Event> {
        let entry = self.assets.get_mut(key).expect("known");
        entry.env_at = None;
        if entry.preparing == Some(run) {
            return None;
        }
        let req = match self.env_request(key) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Some(Event::EnvFailed {
                    message: "no environment to prepare".into(),
                    transient: false,
                });
            }
            Err(message) => {
                return Some(Event::EnvFailed {
                    message,
                    transient: false,
                });
            }
        };
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let worker = match self
            .cluster_for(key, cluster_ref.as_deref())
            .and_then(|rc| self.worker_for(&rc))
        {
            Ok(w) => w,
            Err(message) => {
                return Some(Event::EnvFailed {
                    message,
                    transient: false,
                });
            }
        };
        let (host, reply_to) = match worker {
            Some(ckey) => (EnvHost::Slurm(self.workers[&ckey].executor.clone()), ckey),
            None => (EnvHost::Local, local_key()),
        };
        self.assets.get_mut(key).expect("known").preparing = Some(run);
        let replies = self.replies.clone();
        let key = key.clone();
        // Its own task: packing and uploading take long, and must stall no one else.
        tokio::spawn(async move {
            let result = crate::environment::prepare(&host, &req).await;
            let _ = replies.send((reply_to, Reply::EnvPrepared { key, run, result }));
        });
        None
    }

    fn poll_interval(&self, key: &ObjectKey) -> Duration {
        let cluster = self
            .cluster_for(key, self.assets[key].cluster_ref.as_deref())
            .ok()
            .map(|rc| rc.spec);
        match cluster {
            Some(c) => c.poll_interval.as_ref().map(|i| i.duration()).unwrap_or(
                if c.mode == ClusterMode::Local {
                    LOCAL_POLL
                } else {
                    SLURM_POLL
                },
            ),
            None => LOCAL_POLL,
        }
    }

    fn plan_for(
        &self,
        key: &ObjectKey,
        run: u64,
        attempt: u32,
        remote_home: Option<&str>,
    ) -> std::result::Result<RunPlan, String> {
        PlanInputs::capture(self, key)?.plan(run, attempt, remote_home)
    }

    /// Feeds one event to the core and carries out the resulting actions, following the
    /// events those actions produce.
    async fn step(&mut self, key: &ObjectKey, mut event: Event) {
        for _ in 0..8 {
            let facts = self.facts(key);
            let input = Input {
                generation: facts.generation,
                run_key: facts.run_key.as_deref(),
                invalid: facts.invalid.as_deref(),
                suspend: facts.suspend,
                retry_limit: facts.retry.limit,
                retry_backoff: facts.retry.backoff.duration(),
                retry_on_payload_failure: facts.retry.on_payload_failure,
                cleanup_on_failure: facts.cleanup_on_failure,
                debug: facts.debug,
                deleted: facts.deleted,
                needs_env: facts.needs_env,
                now: Timestamp::now(),
            };
            let entry = self.assets.get_mut(key).expect("known asset");
            let decision = core::reconcile(&entry.status, &input, event);
            if decision.status.phase != entry.status.phase
                || decision.status.run != entry.status.run
            {
                info!(
                    "{key}: run {} {} → {}{}",
                    decision.status.run,
                    entry.status.phase.as_str(),
                    decision.status.phase.as_str(),
                    decision
                        .status
                        .message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                );
            }
            entry.status = decision.status;
            let mut watch = false;
            let mut next = None;
            for action in decision.actions {
                match action {
                    Action::Submit { delay: Some(d), .. } => {
                        self.assets.get_mut(key).expect("known").submit_at =
                            Some(Instant::now() + d);
                    }
                    Action::Submit {
                        run,
                        attempt,
                        delay: None,
                    } => {
                        next = self.submit(key, run, attempt).await;
                    }
                    Action::PrepareEnv { delay: Some(d), .. } => {
                        self.assets.get_mut(key).expect("known").env_at = Some(Instant::now() + d);
                    }
                    Action::PrepareEnv { run, delay: None } => {
                        next = self.prepare_env(key, run);
                    }
                    Action::Watch => watch = true,
                    Action::Cancel {
                        job_id,
                        run_dir,
                        report,
                    } => {
                        self.cancel(key, job_id, run_dir, report);
                    }
                    Action::Cleanup { run_dir } => self.cleanup(key, run_dir),
                }
            }
            // A resync must not postpone a poll that is already due.
            let poll = self.poll_interval(key);
            let entry = self.assets.get_mut(key).expect("known");
            entry.next_poll = if watch {
                entry.next_poll.or(Some(Instant::now() + poll))
            } else {
                None
            };
            self.persist(key);
            match next {
                Some(e) => event = e,
                None => break,
            }
        }
        let entry = &self.assets[key];
        let active = entry.next_poll.is_some()
            || entry.submit_at.is_some()
            || entry.preparing.is_some()
            || entry.env_at.is_some()
            || entry.submitting.is_some()
            || entry.cancelling
            || entry.polling;
        if entry.deleted && !active {
            let was = self.session_of(key);
            self.assets.remove(key);
            self.reindex_member(key, was);
        }
    }

    /// Submits (or adopts) an attempt. Local clusters answer at once; a Slurm cluster's
    /// worker answers later ([`Driver::on_reply`]), so `None` means "under way" (or "retry
    /// later", with `submit_at` set).
    async fn submit(&mut self, key: &ObjectKey, run: u64, attempt: u32) -> Option<Event> {
        let entry = self.assets.get_mut(key).expect("known");
        entry.submit_at = None;
        if entry.submitting == Some((run, attempt)) {
            return None;
        }
        let session = match self.session_target(key) {
            Ok(t) => t,
            Err((message, true)) => {
                // Not up yet: asked again shortly, the reason in the status meanwhile.
                let entry = self.assets.get_mut(key).expect("known");
                entry.submit_at = Some(Instant::now() + SESSION_WAIT);
                entry.status.message = Some(message);
                return None;
            }
            Err((message, false)) => return Some(Event::SubmitFailed { message }),
        };
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let rc = match self.cluster_for(key, cluster_ref.as_deref()) {
            Ok(rc) => rc,
            Err(message) => return Some(Event::SubmitFailed { message }),
        };
        let worker = match self.worker_for(&rc) {
            Ok(w) => w,
            Err(message) => return Some(Event::SubmitFailed { message }),
        };
        let Some(ckey) = worker else {
            if session.is_some() {
                return Some(Event::SubmitFailed {
                    message: "spec.sessionRef: sessions run on Slurm clusters, not in local mode"
                        .into(),
                });
            }
            let plan = match self.plan_for(key, run, attempt, None) {
                Ok(p) => p,
                Err(message) => return Some(Event::SubmitFailed { message }),
            };
            if let Err(message) = local_fit(&plan.resources) {
                return Some(Event::SubmitFailed { message });
            }
            return Some(match self.executor.submit(&plan).await {
                Ok(s) => Event::Submitted {
                    job_id: s.job_id,
                    run_dir: s.run_dir,
                    adopted: s.adopted,
                },
                Err(e) => Event::SubmitFailed {
                    message: e.to_string(),
                },
            });
        };
        // The plan is built in the worker, once the cluster's home is known; everything it
        // needs is captured now.
        let inputs = PlanInputs::capture(self, key).map(|mut p| {
            p.session = session;
            p
        });
        let plan =
            Box::new(move |home: &str| inputs.and_then(|p| p.plan(run, attempt, Some(home))));
        self.workers[&ckey].send(Request::Submit {
            key: key.clone(),
            run,
            attempt,
            plan,
        });
        self.assets.get_mut(key).expect("known").submitting = Some((run, attempt));
        None
    }

    /// The tag of the asset's current attempt.
    fn tag_of(&self, key: &ObjectKey) -> String {
        let s = &self.assets[key].status;
        self.tag_for(key, s.run, s.attempts.max(1))
    }

    fn tag_for(&self, key: &ObjectKey, run: u64, attempt: u32) -> String {
        RunId {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: self.assets[key].uid.clone(),
            run,
            attempt,
            epoch: 0,
            session: key.kind == Kind::SlurmSession,
        }
        .tag()
    }

    /// Sends a cancellation to the asset's cluster; the answer comes through [`Driver::on_reply`].
    fn cancel(
        &mut self,
        key: &ObjectKey,
        job_id: Option<String>,
        run_dir: Option<String>,
        report: bool,
    ) {
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let target = self
            .cluster_for(key, cluster_ref.as_deref())
            .and_then(|rc| self.worker_for(&rc));
        let tag = self.tag_of(key);
        let entry = self.assets.get_mut(key).expect("known");
        if report {
            if entry.cancelling {
                return;
            }
            entry.cancelling = true;
        }
        match target {
            Ok(Some(ckey)) => self.workers[&ckey].send(Request::Cancel {
                key: key.clone(),
                job_id,
                tag,
                report,
                run_dir: run_dir.clone(),
            }),
            Ok(None) => {
                // Local: signalling waits out a grace period, so it runs on its own task.
                let executor = self.executor.clone();
                let replies = self.replies.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let result = executor
                        .cancel(job_id.as_deref(), run_dir.as_deref())
                        .await
                        .map_err(|e| e.to_string());
                    let _ = replies.send((
                        local_key(),
                        Reply::Cancelled {
                            key,
                            report,
                            result,
                        },
                    ));
                });
            }
            Err(e) => {
                let _ = self.replies.send((
                    local_key(),
                    Reply::Cancelled {
                        key: key.clone(),
                        report,
                        result: Err(e),
                    },
                ));
            }
        }
    }

    fn cleanup(&mut self, key: &ObjectKey, run_dir: String) {
        let cluster_ref = self.assets[key].cluster_ref.clone();
        match self
            .cluster_for(key, cluster_ref.as_deref())
            .and_then(|rc| self.worker_for(&rc))
        {
            Ok(Some(ckey)) => self.workers[&ckey].send(Request::Cleanup { run_dir }),
            Ok(None) => {
                if let Err(e) = self.executor.cleanup(&run_dir) {
                    warn!("{key}: {e}");
                }
            }
            Err(e) => warn!("{key}: cleanup of {run_dir}: {e}"),
        }
    }

    /// Handles a worker's (or a local cancellation's) answer.
    async fn on_reply(&mut self, cluster: ObjectKey, reply: Reply<ObjectKey>) {
        match reply {
            Reply::Probed(result) => {
                self.probing.remove(&cluster);
                if let Err(e) = &result {
                    warn!("{cluster}: {e}");
                }
                self.probes.insert(cluster.clone(), result);
                if self.clusters.contains_key(&cluster) {
                    self.write_cluster_status(&cluster);
                }
            }
            Reply::Submitted {
                key,
                run,
                attempt,
                result,
            } => self.on_submitted(key, run, attempt, result).await,
            Reply::EnvPrepared { key, run, result } => {
                let Some(entry) = self.assets.get_mut(&key) else {
                    return;
                };
                if entry.preparing == Some(run) {
                    entry.preparing = None;
                }
                if entry.status.run != run {
                    return; // superseded meanwhile
                }
                let event = match result {
                    Ok(env) => Event::EnvReady { env },
                    Err(e) => {
                        warn!("{key}: environment: {}", e.message);
                        Event::EnvFailed {
                            message: e.message,
                            transient: e.transient,
                        }
                    }
                };
                self.step(&key, event).await;
            }
            Reply::ExitNoticed { run_dir } => {
                let now = Instant::now();
                // A job in a poll under way is polled again when that poll answers.
                if let Some(entry) = self
                    .assets
                    .values_mut()
                    .find(|a| a.status.remote_run_dir.as_deref() == Some(run_dir.as_str()))
                {
                    entry.urgent = true;
                    if entry.next_poll.is_some() {
                        entry.next_poll = Some(now);
                    }
                }
            }
            Reply::Polled { items, result } => {
                self.polling.remove(&cluster);
                let mut fresh = vec![];
                let observations = match result {
                    Ok(obs) => obs.into_iter().map(Some).collect(),
                    Err(e) => {
                        // A lost connection is not the job's failure: poll again later.
                        warn!("{cluster}: polling failed: {e}");
                        vec![None; items.len()]
                    }
                };
                for ((key, job, track), obs) in items.into_iter().zip(observations) {
                    let poll = self.poll_interval(&key);
                    let Some(entry) = self.assets.get_mut(&key) else {
                        continue;
                    };
                    entry.polling = false;
                    // Answers for a run dir the asset has left behind are dropped.
                    if entry.status.remote_run_dir.as_deref() != Some(job.run_dir.as_str()) {
                        continue;
                    }
                    entry.track = track;
                    match obs {
                        Some(o) => fresh.push((key, o)),
                        None => {
                            entry.next_poll = Some(Instant::now() + poll);
                        }
                    }
                }
                for (key, o) in fresh {
                    // Noticed ending while this poll was under way: look again now.
                    let noticed = self.assets.get(&key).is_some_and(|a| a.urgent);
                    let soon = o.observe_again_soon;
                    self.step(&key, Event::Observed(Box::new(o))).await;
                    if let Some(entry) = self.assets.get_mut(&key)
                        && let Some(next) = entry.next_poll
                        && (soon || noticed)
                    {
                        let wait = if noticed { Duration::ZERO } else { AGAIN_SOON };
                        entry.next_poll = Some(next.min(Instant::now() + wait));
                        entry.urgent = true;
                    }
                }
            }
            Reply::Cancelled {
                key,
                report,
                result,
            } => {
                let Some(entry) = self.assets.get_mut(&key) else {
                    return;
                };
                if report {
                    entry.cancelling = false;
                }
                let message = match result {
                    Ok(m) => m,
                    Err(e) => {
                        error!("{key}: cancelling: {e}");
                        format!("cancel failed: {e}")
                    }
                };
                if report {
                    self.step(&key, Event::CancelDone { message }).await;
                }
            }
        }
    }

    async fn on_submitted(
        &mut self,
        key: ObjectKey,
        run: u64,
        attempt: u32,
        result: std::result::Result<std::result::Result<crate::executor::Submitted, String>, Error>,
    ) {
        let Some(entry) = self.assets.get_mut(&key) else {
            return;
        };
        if entry.submitting == Some((run, attempt)) {
            entry.submitting = None;
        }
        let current = entry.status.run == run
            && entry.status.attempts.max(1) == attempt
            && matches!(entry.status.phase, Phase::Pending | Phase::Submitting);
        if !current {
            // The run was superseded (or the object deleted) while the submission was under
            // way: its job must not run on unobserved.
            if let Ok(Ok(sub)) = result {
                info!(
                    "{key}: job {} belongs to a superseded run; cancelling it",
                    sub.job_id
                );
                let cluster_ref = entry.cluster_ref.clone();
                let stale_tag = self.tag_for(&key, run, attempt);
                if let Ok(Some(ckey)) = self
                    .cluster_for(&key, cluster_ref.as_deref())
                    .and_then(|rc| self.worker_for(&rc))
                {
                    self.workers[&ckey].send(Request::Cancel {
                        key: key.clone(),
                        job_id: Some(sub.job_id),
                        tag: stale_tag,
                        report: false,
                        run_dir: Some(sub.run_dir),
                    });
                }
            }
            return;
        }
        let event = match result {
            Ok(Ok(s)) => Event::Submitted {
                job_id: s.job_id,
                run_dir: s.run_dir,
                adopted: s.adopted,
            },
            Ok(Err(message)) => Event::SubmitFailed { message },
            Err(e) => {
                warn!(
                    "{key}: {e}; retrying the submission in {}s",
                    TRANSPORT_RETRY.as_secs()
                );
                entry.submit_at = Some(Instant::now() + TRANSPORT_RETRY);
                entry.status.message = Some(crate::limits::truncate(
                    &format!("cluster unreachable, retrying: {e}"),
                    crate::limits::MAX_MESSAGE,
                ));
                self.persist(&key);
                return;
            }
        };
        self.step(&key, event).await;
    }

    /// Starts delayed submissions and polls due jobs: local ones one by one, Slurm ones in
    /// one batch per cluster, sent to the cluster's worker.
    async fn tick(&mut self) {
        let now = Instant::now();
        if self.reprobe_at <= now {
            self.reprobe_at = now + REPROBE;
            self.reprobe_without_accounting();
        }
        let env_due: Vec<(ObjectKey, u64)> = self
            .assets
            .iter()
            .filter(|(_, a)| a.env_at.is_some_and(|t| t <= now))
            .map(|(k, a)| (k.clone(), a.status.run))
            .collect();
        for (key, run) in env_due {
            if let Some(ev) = self.prepare_env(&key, run) {
                self.step(&key, ev).await;
            } else {
                self.persist(&key);
            }
        }
        let submits: Vec<ObjectKey> = self
            .assets
            .iter()
            .filter(|(_, a)| a.submit_at.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in submits {
            let (run, attempt) = {
                let s = &self.assets[&key].status;
                (s.run, s.attempts.max(1))
            };
            if let Some(ev) = self.submit(&key, run, attempt).await {
                self.step(&key, ev).await;
            } else {
                self.persist(&key);
            }
        }
        let mut due: Vec<ObjectKey> = self
            .assets
            .iter()
            .filter(|(_, a)| {
                a.submit_at.is_none() && !a.polling && a.next_poll.is_some_and(|t| t <= now)
            })
            .map(|(k, _)| k.clone())
            .collect();
        // A Slurm cluster is polled for all its watched jobs at once: when one is due, the
        // others ride along, so the scheduler sees one query per interval, not one per asset.
        let due_clusters: HashSet<String> = due
            .iter()
            .filter(|k| !self.assets[*k].urgent)
            .filter_map(|k| {
                self.assets[k]
                    .cluster_ref
                    .clone()
                    .map(|c| format!("{}/{c}", k.namespace))
            })
            .collect();
        for (k, a) in &self.assets {
            let riding = a.submit_at.is_none()
                && !a.polling
                && a.next_poll.is_some_and(|t| t > now)
                && a.cluster_ref
                    .as_ref()
                    .is_some_and(|c| due_clusters.contains(&format!("{}/{c}", k.namespace)));
            if riding {
                due.push(k.clone());
            }
        }
        let mut batches: BTreeMap<ObjectKey, Vec<PollItem<ObjectKey>>> = BTreeMap::new();
        for key in due {
            let cluster_ref = self.assets[&key].cluster_ref.clone();
            let rc = self.cluster_for(&key, cluster_ref.as_deref());
            let in_session = self.assets[&key]
                .spec()
                .is_some_and(|s| s.session_ref.is_some());
            let components: Vec<String> = self.assets[&key]
                .spec()
                .map(|s| s.components.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default();
            let resources = match (&rc, self.assets[&key].spec()) {
                // A step asks for its own resources; the queue defaults shaped the allocation.
                (_, Some(s)) if in_session => s.resources.clone(),
                (Ok(rc), Some(s)) => s.resources.merged_over(&rc.spec.queue),
                _ => Default::default(),
            };
            let worker = rc
                .as_ref()
                .ok()
                .and_then(|rc| self.worker_for(rc).ok().flatten());
            if worker.as_ref().is_some_and(|c| self.polling.contains(c)) {
                // That cluster's last poll has not answered yet (a slow or dead cluster):
                // try again an interval later rather than pile up queries.
                let poll = self.poll_interval(&key);
                let entry = self.assets.get_mut(&key).expect("known");
                entry.next_poll = Some(now + if entry.urgent { URGENT_RETRY } else { poll });
                continue;
            }
            let entry = self.assets.get_mut(&key).expect("known");
            entry.next_poll = None;
            entry.urgent = false;
            let Some(run_dir) = entry.status.remote_run_dir.clone() else {
                continue;
            };
            if entry.track_dir.as_deref() != Some(run_dir.as_str()) {
                entry.track = JobTrack::default();
                entry.track_dir = Some(run_dir.clone());
            }
            let job = JobRef {
                job_id: entry.status.job_id.clone(),
                run_dir,
                resources,
                in_session,
                step_id: entry.status.step_id.clone(),
                components,
            };
            if let Some(ckey) = worker {
                entry.polling = true;
                let requested_mem = job.resources.requested_memory();
                batches.entry(ckey).or_default().push(PollItem {
                    key: key.clone(),
                    job,
                    requested_mem,
                    track: std::mem::take(&mut entry.track),
                });
                continue;
            }
            let obs = self.executor.observe(&job, &mut entry.track.reader);
            self.step(&key, Event::Observed(Box::new(obs))).await;
        }
        for (ckey, items) in batches {
            self.polling.insert(ckey.clone());
            self.workers[&ckey].send(Request::Poll(items));
        }
        self.write_operator_metrics();
    }
}
