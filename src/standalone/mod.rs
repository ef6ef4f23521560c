//! Standalone mode: a directory of manifests is the store, status files are the output.
//!
//! The driver feeds the pure [`crate::core`] with events from the file watcher, the clock and
//! the executor, and carries out the actions it returns. One task owns all state, so no locks.

pub mod store;

use crate::api::{
    ClusterMode, Phase, SlurmAssetSpec, SlurmAssetStatus, SlurmClusterSpec, SlurmClusterStatus,
};
use crate::conditions;
use crate::core::{self, Action, Event, Input};
use crate::executor::JobRef;
use crate::executor::local::LocalExecutor;
use crate::jobscript::{PlanContext, RunId, RunPlan, plan};
use crate::manifest::{Kind, Loaded, ManifestError, describe};
use crate::pipes::MessageReader;
use crate::{Error, Result};
use jiff::Timestamp;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::{ObjectKey, Stored, WriteCache};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Poll interval of local clusters that set none.
const LOCAL_POLL: Duration = Duration::from_millis(500);
const SLURM_POLL: Duration = Duration::from_secs(10);
/// Quiet time after a manifest change before the directory is rescanned.
const DEBOUNCE: Duration = Duration::from_millis(250);

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
    loaded: Option<Loaded>,
    uid: String,
    generation: i64,
    spec_hash: String,
    status: SlurmAssetStatus,
    deleted: bool,
    next_poll: Option<Instant>,
    submit_at: Option<Instant>,
    reader: MessageReader,
    reader_dir: Option<String>,
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
}

pub struct Driver {
    dir: PathBuf,
    executor: LocalExecutor,
    assets: BTreeMap<ObjectKey, AssetEntry>,
    clusters: BTreeMap<ObjectKey, Loaded>,
    errors: Vec<ManifestError>,
    logged: HashSet<String>,
    cache: WriteCache,
}

/// Runs standalone mode until interrupted, or until every asset is terminal with `once`.
pub async fn run(opts: Options) -> Result<Outcome> {
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| Error::io(&opts.dir, e))?;
    let mut driver = Driver {
        dir: dir.clone(),
        executor: LocalExecutor::new(opts.exe),
        assets: BTreeMap::new(),
        clusters: BTreeMap::new(),
        errors: vec![],
        logged: HashSet::new(),
        cache: WriteCache::default(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watch_root = dir.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only changes to manifests matter: not reads (ours included), not our own writes
        // under hidden folders such as .status and .runs.
        let relevant = match &res {
            Ok(ev) => {
                !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev.paths.iter().any(|p| {
                        p.strip_prefix(&watch_root).is_ok_and(|rel| {
                            !rel.components()
                                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
                        })
                    })
            }
            Err(_) => true,
        };
        if relevant {
            tracing::debug!("manifest change: {res:?}");
            let _ = tx.send(());
        }
    })?;
    notify::Watcher::watch(&mut watcher, &dir, notify::RecursiveMode::Recursive)?;
    driver.rescan(true).await;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Executor(format!("installing the SIGTERM handler: {e}")))?;
    loop {
        driver.tick().await;
        if opts.once && driver.all_done() {
            break;
        }
        let wait = driver.next_wakeup();
        tokio::select! {
            Some(()) = rx.recv() => {
                // Debounce: an editor's save is several events; rescan once they settle.
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                driver.rescan(false).await;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => { info!("interrupted; running jobs continue and are adopted on restart"); break; }
            _ = sigterm.recv() => { info!("terminated; running jobs continue and are adopted on restart"); break; }
        }
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
                && (a.status.phase.is_terminal() || a.status.reason.as_deref() == Some("Suspended"))
        })
    }

    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        self.assets
            .values()
            .flat_map(|a| [a.next_poll, a.submit_at])
            .flatten()
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5))
    }

    /// Re-reads the directory and reconciles every object against it.
    async fn rescan(&mut self, startup: bool) {
        let snap = store::scan(&self.dir);
        for e in &snap.errors {
            let msg = e.to_string();
            if self.logged.insert(msg.clone()) {
                error!("{msg}");
            }
        }
        self.errors = snap.errors;
        if let Err(e) = store::write_errors(&self.dir, &self.errors) {
            error!("{e}");
        }
        self.clusters.clear();
        let mut seen = HashSet::new();
        for (key, obj) in snap.objects {
            match key.kind {
                Kind::SlurmCluster => {
                    self.write_cluster_status(&key, &obj);
                    self.clusters.insert(key, obj);
                }
                Kind::SlurmAsset => {
                    seen.insert(key.clone());
                    self.upsert_asset(key, obj);
                }
            }
        }
        if startup {
            // Status files whose manifest vanished while the operator was down: their jobs
            // may still run, so they are treated as deletions.
            for (_, v) in store::list_status_files(&self.dir, Kind::SlurmAsset) {
                let key = ObjectKey {
                    kind: Kind::SlurmAsset,
                    namespace: v["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .into(),
                    name: v["metadata"]["name"].as_str().unwrap_or_default().into(),
                };
                if seen.contains(&key) || key.name.is_empty() {
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
        let (uid, generation, status) = match stored {
            Some(s) if !s.deleted => {
                let generation = if s.spec_hash == hash || hash.is_empty() {
                    s.generation
                } else {
                    s.generation + 1
                };
                let status = serde_json::from_value(s.status).unwrap_or_else(|e| {
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
            loaded,
            uid,
            generation,
            spec_hash: hash,
            status,
            deleted: false,
            next_poll: None,
            submit_at: None,
            reader: MessageReader::default(),
            reader_dir: None,
        }
    }

    fn upsert_asset(&mut self, key: ObjectKey, obj: Loaded) {
        if let Some(entry) = self.assets.get_mut(&key)
            && !entry.deleted
        {
            if entry.spec_hash != obj.spec_hash {
                info!("{key}: spec changed");
                entry.generation += 1;
                entry.spec_hash = obj.spec_hash.clone();
            }
            entry.loaded = Some(obj);
            return;
        }
        let stored = store::read_stored(&self.dir, &key);
        let hash = obj.spec_hash.clone();
        let entry = self.entry_from(Some(obj), stored, hash);
        self.assets.insert(key, entry);
    }

    /// Resolves the asset's cluster: an explicit `clusterRef`, else the implicit local cluster.
    fn cluster_for(
        &self,
        key: &ObjectKey,
        spec: &SlurmAssetSpec,
    ) -> std::result::Result<(SlurmClusterSpec, PathBuf), String> {
        let Some(name) = &spec.cluster_ref else {
            return Ok((implicit_local(), self.dir.clone()));
        };
        let ckey = ObjectKey {
            kind: Kind::SlurmCluster,
            namespace: key.namespace.clone(),
            name: name.clone(),
        };
        let Some(c) = self.clusters.get(&ckey) else {
            return Err(format!(
                "spec.clusterRef: SlurmCluster {name:?} not found in namespace {:?}",
                key.namespace
            ));
        };
        match &c.spec {
            Err(errors) => Err(format!(
                "spec.clusterRef: SlurmCluster {name:?} is invalid: {}",
                describe(errors)
            )),
            Ok(_) => {
                let spec = c.cluster().expect("a SlurmCluster spec").clone();
                if spec.mode == ClusterMode::Slurm {
                    return Err(format!(
                        "spec.clusterRef: SlurmCluster {name:?} has mode slurm, which this version cannot run yet; use mode local"
                    ));
                }
                let dir = c.file.parent().unwrap_or(&self.dir).to_path_buf();
                Ok((spec, dir))
            }
        }
    }

    fn facts(&self, key: &ObjectKey) -> Facts {
        let entry = &self.assets[key];
        let spec = entry.spec();
        let invalid = match (&entry.loaded, spec) {
            (Some(l), None) => Some(match &l.spec {
                Err(errors) => describe(errors),
                Ok(_) => "not a SlurmAsset".into(),
            }),
            (_, Some(s)) => self.cluster_for(key, s).err(),
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
        }
    }

    fn poll_interval(&self, key: &ObjectKey) -> Duration {
        let cluster = self.assets[key]
            .spec()
            .and_then(|s| self.cluster_for(key, s).ok())
            .map(|(c, _)| c);
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
    ) -> std::result::Result<RunPlan, String> {
        let entry = &self.assets[key];
        let loaded = entry.loaded.as_ref().ok_or("the manifest is gone")?;
        let spec = loaded.asset().ok_or("the spec is invalid")?;
        let (cluster, cluster_dir) = self.cluster_for(key, spec)?;
        let ctx = PlanContext {
            asset_dir: loaded.file.parent().unwrap_or(&self.dir),
            cluster: &cluster,
            cluster_dir: &cluster_dir,
            default_base: self.dir.join(".runs"),
        };
        let id = RunId {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: entry.uid.clone(),
            run,
            attempt,
        };
        plan(spec, id, &ctx)
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
                        next = Some(self.submit(key, run, attempt).await);
                    }
                    Action::Watch => watch = true,
                    Action::Cancel {
                        job_id,
                        run_dir,
                        report,
                    } => {
                        let res = self
                            .executor
                            .cancel(job_id.as_deref(), run_dir.as_deref())
                            .await;
                        let message = match res {
                            Ok(m) => m,
                            Err(e) => {
                                error!("{key}: cancelling: {e}");
                                format!("cancel failed: {e}")
                            }
                        };
                        if report {
                            next = Some(Event::CancelDone { message });
                        }
                    }
                    Action::Cleanup { run_dir } => {
                        if let Err(e) = self.executor.cleanup(&run_dir) {
                            warn!("{key}: {e}");
                        }
                    }
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
        let active = entry.next_poll.is_some() || entry.submit_at.is_some();
        if entry.deleted && !active {
            self.assets.remove(key);
        }
    }

    async fn submit(&mut self, key: &ObjectKey, run: u64, attempt: u32) -> Event {
        self.assets.get_mut(key).expect("known").submit_at = None;
        let plan = match self.plan_for(key, run, attempt) {
            Ok(p) => p,
            Err(message) => return Event::SubmitFailed { message },
        };
        match self.executor.submit(&plan).await {
            Ok(s) => Event::Submitted {
                job_id: s.job_id,
                run_dir: s.run_dir,
                adopted: s.adopted,
            },
            Err(e) => Event::SubmitFailed {
                message: e.to_string(),
            },
        }
    }

    /// Starts delayed submissions and polls due jobs.
    async fn tick(&mut self) {
        let now = Instant::now();
        let due: Vec<(ObjectKey, bool)> = self
            .assets
            .iter()
            .filter_map(|(k, a)| {
                if a.submit_at.is_some_and(|t| t <= now) {
                    Some((k.clone(), true))
                } else if a.next_poll.is_some_and(|t| t <= now) {
                    Some((k.clone(), false))
                } else {
                    None
                }
            })
            .collect();
        for (key, is_submit) in due {
            if is_submit {
                let (run, attempt) = {
                    let s = &self.assets[&key].status;
                    (s.run, s.attempts)
                };
                let ev = self.submit(&key, run, attempt).await;
                self.step(&key, ev).await;
                continue;
            }
            let resources = self.assets[&key]
                .spec()
                .map(|s| {
                    let cluster = self
                        .cluster_for(&key, s)
                        .map(|(c, _)| c.queue)
                        .unwrap_or_default();
                    s.resources.merged_over(&cluster)
                })
                .unwrap_or_default();
            let entry = self.assets.get_mut(&key).expect("known");
            entry.next_poll = None;
            let Some(run_dir) = entry.status.remote_run_dir.clone() else {
                continue;
            };
            if entry.reader_dir.as_deref() != Some(run_dir.as_str()) {
                entry.reader = MessageReader::default();
                entry.reader_dir = Some(run_dir.clone());
            }
            let job = JobRef {
                job_id: entry.status.job_id.clone(),
                run_dir,
                resources,
            };
            let obs = self.executor.observe(&job, &mut entry.reader);
            self.step(&key, Event::Observed(Box::new(obs))).await;
        }
    }

    fn persist(&mut self, key: &ObjectKey) {
        let entry = &self.assets[key];
        let status = match serde_json::to_value(&entry.status) {
            Ok(v) => v,
            Err(e) => {
                error!("{key}: {e}");
                return;
            }
        };
        let stored = Stored {
            uid: entry.uid.clone(),
            generation: entry.generation,
            spec_hash: entry.spec_hash.clone(),
            deleted: entry.deleted,
            status,
        };
        let finished_deleting = entry.deleted
            && !matches!(
                entry.status.phase,
                Phase::Submitting
                    | Phase::Queued
                    | Phase::Running
                    | Phase::Packing
                    | Phase::Uploading
            );
        let deleted_at = finished_deleting.then(Timestamp::now);
        let text = store::render_object(
            key,
            &stored,
            entry.loaded.as_ref().map(|l| l.file.as_path()),
            entry.loaded.as_ref().and_then(|l| l.asset_key.as_deref()),
            deleted_at,
        );
        let path = store::status_path(&self.dir, key);
        // A deletion timestamp changes every second; write it once, then leave the file be.
        if finished_deleting && self.cache_has_deleted(&path) {
            return;
        }
        match text.and_then(|t| self.cache.write(&path, t)) {
            Ok(_) => {}
            Err(e) => error!("{key}: writing status: {e}"),
        }
    }

    fn cache_has_deleted(&self, path: &Path) -> bool {
        std::fs::read_to_string(path)
            .map(|t| t.contains("deletionTimestamp"))
            .unwrap_or(false)
    }

    fn write_cluster_status(&mut self, key: &ObjectKey, obj: &Loaded) {
        let stored_prev = store::read_stored(&self.dir, key);
        let (uid, generation, mut status) = match stored_prev {
            Some(s) if !s.deleted => {
                let g = if s.spec_hash == obj.spec_hash {
                    s.generation
                } else {
                    s.generation + 1
                };
                (
                    s.uid,
                    g,
                    serde_json::from_value::<SlurmClusterStatus>(s.status).unwrap_or_default(),
                )
            }
            _ => (
                uuid::Uuid::new_v4().to_string(),
                1,
                SlurmClusterStatus::default(),
            ),
        };
        let now = Timestamp::now();
        let g = Some(generation);
        status.observed_generation = g;
        match &obj.spec {
            Err(errors) => {
                conditions::set(
                    &mut status.conditions,
                    "Invalid",
                    true,
                    "InvalidSpec",
                    &describe(errors),
                    g,
                    now,
                );
            }
            Ok(_) => {
                conditions::set(
                    &mut status.conditions,
                    "Invalid",
                    false,
                    "Valid",
                    "",
                    g,
                    now,
                );
                let spec = obj.cluster().expect("cluster");
                match spec.mode {
                    ClusterMode::Local => {
                        conditions::set(
                            &mut status.conditions,
                            "Reachable",
                            true,
                            "LocalHost",
                            "payloads run on the operator's host",
                            g,
                            now,
                        );
                        status.platform = Some(platform());
                    }
                    ClusterMode::Slurm => {
                        conditions::set(
                            &mut status.conditions,
                            "Reachable",
                            false,
                            "NotImplemented",
                            "slurm mode is not available in this version",
                            g,
                            now,
                        );
                    }
                }
            }
        }
        let stored = Stored {
            uid,
            generation,
            spec_hash: obj.spec_hash.clone(),
            deleted: false,
            status: serde_json::to_value(&status).unwrap_or_default(),
        };
        let path = store::status_path(&self.dir, key);
        match store::render_object(key, &stored, Some(&obj.file), None, None)
            .and_then(|t| self.cache.write(&path, t))
        {
            Ok(_) => {}
            Err(e) => error!("{key}: writing status: {e}"),
        }
    }
}

fn implicit_local() -> SlurmClusterSpec {
    SlurmClusterSpec {
        mode: ClusterMode::Local,
        ssh: None,
        queue: Default::default(),
        remote_base: None,
        environment: Default::default(),
        poll_interval: None,
    }
}

/// The platform name in conda/pixi's spelling.
pub fn platform() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "linux-64".into(),
        "aarch64" => "linux-aarch64".into(),
        other => format!("linux-{other}"),
    }
}
