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
use crate::executor::slurm::{Counters, SlurmExecutor, Watched};
use crate::jobscript::{PlanContext, RunId, RunPlan, plan};
use crate::manifest::{Kind, Loaded, ManifestError, describe};
use crate::pipes::MessageReader;
use crate::transport::{SshAuth, SshTarget};
use crate::{Error, Result};
use jiff::Timestamp;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use store::{ObjectKey, Stored, WriteCache};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Poll interval of local clusters that set none.
const LOCAL_POLL: Duration = Duration::from_millis(500);
const SLURM_POLL: Duration = Duration::from_secs(10);
/// Quiet time after a manifest change before the directory is rescanned.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Wait before retrying a submission that could not reach its cluster.
const TRANSPORT_RETRY: Duration = Duration::from_secs(5);

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
    /// `spec.clusterRef` as last seen (kept when the manifest goes away).
    cluster_ref: Option<String>,
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
    exe: PathBuf,
    slurm: HashMap<ObjectKey, Arc<SlurmExecutor>>,
    counters: Arc<Counters>,
}

/// A cluster as an asset sees it: explicit, or the implicit local one.
struct ResolvedCluster {
    spec: SlurmClusterSpec,
    dir: PathBuf,
    key: Option<ObjectKey>,
}

/// Runs standalone mode until interrupted, or until every asset is terminal with `once`.
pub async fn run(opts: Options) -> Result<Outcome> {
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| Error::io(&opts.dir, e))?;
    let mut driver = Driver {
        dir: dir.clone(),
        executor: LocalExecutor::new(opts.exe.clone()),
        exe: opts.exe,
        slurm: HashMap::new(),
        counters: Arc::new(Counters::default()),
        assets: BTreeMap::new(),
        clusters: BTreeMap::new(),
        errors: vec![],
        logged: HashSet::new(),
        cache: WriteCache::new(store::Modes::of(&dir)),
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
                Kind::SlurmAsset => {
                    seen.insert(key.clone());
                    self.upsert_asset(key, obj);
                }
            }
        }
        let cluster_keys: Vec<ObjectKey> = self.clusters.keys().cloned().collect();
        for key in cluster_keys {
            self.write_cluster_status(&key).await;
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
        let cluster_ref = match (&loaded, &stored) {
            (Some(l), _) => l.asset().and_then(|a| a.cluster_ref.clone()),
            (None, Some(s)) => s.cluster_ref.clone(),
            (None, None) => None,
        };
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
            cluster_ref,
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
            entry.cluster_ref = obj.asset().and_then(|a| a.cluster_ref.clone());
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
        cluster_ref: Option<&str>,
    ) -> std::result::Result<ResolvedCluster, String> {
        let Some(name) = cluster_ref else {
            return Ok(ResolvedCluster {
                spec: SlurmClusterSpec::default(),
                dir: self.dir.clone(),
                key: None,
            });
        };
        let ckey = ObjectKey {
            kind: Kind::SlurmCluster,
            namespace: key.namespace.clone(),
            name: name.to_string(),
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
                let mut spec = c.cluster().expect("a SlurmCluster spec").clone();
                if spec.mode == ClusterMode::Slurm {
                    // The Python tool's environment names fill what the manifest leaves out.
                    if spec.remote_base.is_none() {
                        spec.remote_base = std::env::var("SLURM_DEPLOYMENT_BASE_PATH").ok();
                    }
                    if spec.environment.pre_deployed_env_path.is_none() {
                        spec.environment.pre_deployed_env_path =
                            std::env::var("CI_DEPLOYED_ENVIRONMENT_PATH").ok();
                    }
                }
                Ok(ResolvedCluster {
                    spec,
                    dir: c.file.parent().unwrap_or(&self.dir).to_path_buf(),
                    key: Some(ckey),
                })
            }
        }
    }

    /// The executor of a Slurm cluster, created on first use and replaced when its
    /// connection settings change.
    fn slurm_for(
        &mut self,
        rc: &ResolvedCluster,
    ) -> std::result::Result<Option<Arc<SlurmExecutor>>, String> {
        if rc.spec.mode != ClusterMode::Slurm {
            return Ok(None);
        }
        let key = rc.key.clone().expect("slurm clusters are explicit");
        let target = ssh_target(&rc.spec, &rc.dir, &key)?;
        if let Some(ex) = self.slurm.get(&key)
            && *ex.target() == target
        {
            return Ok(Some(ex.clone()));
        }
        let ex = Arc::new(SlurmExecutor::new(
            target,
            self.exe.clone(),
            self.counters.clone(),
        ));
        self.slurm.insert(key, ex.clone());
        Ok(Some(ex))
    }

    fn facts(&self, key: &ObjectKey) -> Facts {
        let entry = &self.assets[key];
        let spec = entry.spec();
        let invalid = match (&entry.loaded, spec) {
            (Some(l), None) => Some(match &l.spec {
                Err(errors) => describe(errors),
                Ok(_) => "not a SlurmAsset".into(),
            }),
            (_, Some(s)) => self.cluster_for(key, s.cluster_ref.as_deref()).err(),
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
        let entry = &self.assets[key];
        let loaded = entry.loaded.as_ref().ok_or("the manifest is gone")?;
        let spec = loaded.asset().ok_or("the spec is invalid")?;
        let rc = self.cluster_for(key, spec.cluster_ref.as_deref())?;
        let (cluster, cluster_dir) = (rc.spec, rc.dir);
        let ctx = PlanContext {
            asset_dir: loaded.file.parent().unwrap_or(&self.dir),
            cluster: &cluster,
            cluster_dir: &cluster_dir,
            default_base: match remote_home {
                Some(home) => PathBuf::from(format!("{home}/.slurm-asset-operator")),
                None => self.dir.join(".runs"),
            },
            remote_home,
        };
        let id = RunId {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: entry.uid.clone(),
            run,
            attempt,
            epoch: 0,
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
                        next = self.submit(key, run, attempt).await;
                    }
                    Action::Watch => watch = true,
                    Action::Cancel {
                        job_id,
                        run_dir,
                        report,
                    } => {
                        let res = self
                            .cancel(key, job_id.as_deref(), run_dir.as_deref())
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
                        if let Err(e) = self.cleanup(key, &run_dir).await {
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

    /// Submits (or adopts) an attempt. `None`: the cluster could not be reached; the
    /// submission is retried later and the asset stays in `Submitting`.
    async fn submit(&mut self, key: &ObjectKey, run: u64, attempt: u32) -> Option<Event> {
        self.assets.get_mut(key).expect("known").submit_at = None;
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let rc = match self.cluster_for(key, cluster_ref.as_deref()) {
            Ok(rc) => rc,
            Err(message) => return Some(Event::SubmitFailed { message }),
        };
        let slurm = match self.slurm_for(&rc) {
            Ok(s) => s,
            Err(message) => return Some(Event::SubmitFailed { message }),
        };
        let Some(slurm) = slurm else {
            let plan = match self.plan_for(key, run, attempt, None) {
                Ok(p) => p,
                Err(message) => return Some(Event::SubmitFailed { message }),
            };
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
        let outcome = match slurm.facts().await {
            Ok(facts) => match self.plan_for(key, run, attempt, Some(&facts.home)) {
                Ok(plan) => slurm.submit(&plan).await,
                Err(message) => return Some(Event::SubmitFailed { message }),
            },
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Ok(s)) => Some(Event::Submitted {
                job_id: s.job_id,
                run_dir: s.run_dir,
                adopted: s.adopted,
            }),
            Ok(Err(message)) => Some(Event::SubmitFailed { message }),
            Err(e) => {
                warn!(
                    "{key}: {e}; retrying the submission in {}s",
                    TRANSPORT_RETRY.as_secs()
                );
                let entry = self.assets.get_mut(key).expect("known");
                entry.submit_at = Some(Instant::now() + TRANSPORT_RETRY);
                entry.status.message = Some(format!("cluster unreachable, retrying: {e}"));
                None
            }
        }
    }

    fn tag_of(&self, key: &ObjectKey) -> String {
        let e = &self.assets[key];
        RunId {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            uid: e.uid.clone(),
            run: e.status.run,
            attempt: e.status.attempts.max(1),
            epoch: 0,
        }
        .tag()
    }

    async fn cancel(
        &mut self,
        key: &ObjectKey,
        job_id: Option<&str>,
        run_dir: Option<&str>,
    ) -> Result<String> {
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let rc = self
            .cluster_for(key, cluster_ref.as_deref())
            .map_err(Error::Executor)?;
        match self.slurm_for(&rc).map_err(Error::Executor)? {
            Some(slurm) => slurm.cancel(job_id, &self.tag_of(key)).await,
            None => self.executor.cancel(job_id, run_dir).await,
        }
    }

    async fn cleanup(&mut self, key: &ObjectKey, run_dir: &str) -> Result<()> {
        let cluster_ref = self.assets[key].cluster_ref.clone();
        let rc = self
            .cluster_for(key, cluster_ref.as_deref())
            .map_err(Error::Executor)?;
        match self.slurm_for(&rc).map_err(Error::Executor)? {
            Some(slurm) => slurm.cleanup(run_dir).await,
            None => self.executor.cleanup(run_dir),
        }
    }

    /// Starts delayed submissions and polls due jobs: local ones one by one, Slurm ones in
    /// one batch per cluster.
    async fn tick(&mut self) {
        let now = Instant::now();
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
            .filter(|(_, a)| a.submit_at.is_none() && a.next_poll.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        // A Slurm cluster is polled for all its watched jobs at once: when one is due, the
        // others ride along, so the scheduler sees one query per interval, not one per asset.
        let due_clusters: HashSet<String> = due
            .iter()
            .filter_map(|k| {
                self.assets[k]
                    .cluster_ref
                    .clone()
                    .map(|c| format!("{}/{c}", k.namespace))
            })
            .collect();
        for (k, a) in &self.assets {
            let riding = a.submit_at.is_none()
                && a.next_poll.is_some_and(|t| t > now)
                && a.cluster_ref
                    .as_ref()
                    .is_some_and(|c| due_clusters.contains(&format!("{}/{c}", k.namespace)));
            if riding {
                due.push(k.clone());
            }
        }
        let mut batches: BTreeMap<ObjectKey, (Arc<SlurmExecutor>, Vec<ObjectKey>)> =
            BTreeMap::new();
        for key in due {
            let cluster_ref = self.assets[&key].cluster_ref.clone();
            let rc = self.cluster_for(&key, cluster_ref.as_deref());
            let resources = match (&rc, self.assets[&key].spec()) {
                (Ok(rc), Some(s)) => s.resources.merged_over(&rc.spec.queue),
                _ => Default::default(),
            };
            let slurm = rc
                .as_ref()
                .ok()
                .and_then(|rc| self.slurm_for(rc).ok().flatten());
            let entry = self.assets.get_mut(&key).expect("known");
            entry.next_poll = None;
            let Some(run_dir) = entry.status.remote_run_dir.clone() else {
                continue;
            };
            if entry.reader_dir.as_deref() != Some(run_dir.as_str()) {
                entry.reader = MessageReader::default();
                entry.reader_dir = Some(run_dir.clone());
            }
            if let Some(slurm) = slurm {
                let ckey = rc
                    .as_ref()
                    .ok()
                    .and_then(|r| r.key.clone())
                    .expect("slurm cluster");
                batches
                    .entry(ckey)
                    .or_insert_with(|| (slurm, vec![]))
                    .1
                    .push(key);
                continue;
            }
            let job = JobRef {
                job_id: entry.status.job_id.clone(),
                run_dir,
                resources,
            };
            let obs = self.executor.observe(&job, &mut entry.reader);
            self.step(&key, Event::Observed(Box::new(obs))).await;
        }
        for (ckey, (slurm, keys)) in batches {
            let observations = {
                let mut readers: Vec<(ObjectKey, MessageReader)> = keys
                    .iter()
                    .map(|k| {
                        (
                            k.clone(),
                            std::mem::take(&mut self.assets.get_mut(k).expect("known").reader),
                        )
                    })
                    .collect();
                let mut watched: Vec<Watched> = readers
                    .iter_mut()
                    .map(|(k, reader)| {
                        let a = &self.assets[k];
                        let resources = a.spec().map(|s| s.resources.clone()).unwrap_or_default();
                        Watched {
                            job: JobRef {
                                job_id: a.status.job_id.clone(),
                                run_dir: a.status.remote_run_dir.clone().unwrap_or_default(),
                                resources: resources.clone(),
                            },
                            requested_mem: resources.requested_memory(),
                            reader,
                        }
                    })
                    .collect();
                let result = slurm.observe(&mut watched).await;
                drop(watched);
                for (k, reader) in readers {
                    self.assets.get_mut(&k).expect("known").reader = reader;
                }
                result
            };
            match observations {
                Ok(obs) => {
                    for (key, o) in keys.iter().zip(obs) {
                        self.step(key, Event::Observed(Box::new(o))).await;
                    }
                }
                Err(e) => {
                    // A lost connection is not the job's failure: poll again later.
                    warn!("{ckey}: polling failed: {e}");
                    for key in &keys {
                        let poll = self.poll_interval(key);
                        self.assets.get_mut(key).expect("known").next_poll =
                            Some(Instant::now() + poll);
                    }
                }
            }
        }
        self.write_operator_metrics();
    }

    /// `.status/operator-metrics.yaml`: counters of the operator's own work.
    fn write_operator_metrics(&mut self) {
        let c = &self.counters;
        let v = serde_json::json!({
            "sshConnects": c.ssh_connects.load(Ordering::Relaxed),
            "sshReconnects": c.ssh_reconnects.load(Ordering::Relaxed),
            "schedulerPolls": c.scheduler_polls.load(Ordering::Relaxed),
            "remoteCommands": c.remote_commands.load(Ordering::Relaxed),
        });
        let path = self
            .dir
            .join(store::STATUS_DIR)
            .join("operator-metrics.yaml");
        if let Ok(text) = serde_saphyr::to_string(&v)
            && let Err(e) = self.cache.write(&path, text)
        {
            warn!("{e}");
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
            cluster_ref: entry.cluster_ref.clone(),
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
        store::read_stored_at(path).is_some_and(|s| s.deleted)
    }

    async fn write_cluster_status(&mut self, key: &ObjectKey) {
        let obj = self.clusters[key].clone();
        let slurm = if obj.cluster().is_some() {
            // Probe through the same resolution the assets use (env defaults included).
            let rc = ResolvedCluster {
                spec: obj.cluster().expect("cluster").clone(),
                dir: obj.file.parent().unwrap_or(&self.dir).to_path_buf(),
                key: Some(key.clone()),
            };
            match self.slurm_for(&rc) {
                Ok(Some(ex)) => Some(ex.facts().await.map_err(|e| e.to_string())),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        } else {
            None
        };
        let obj = &obj;
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
                    ClusterMode::Slurm => match slurm {
                        Some(Ok(facts)) => {
                            conditions::set(
                                &mut status.conditions,
                                "Reachable",
                                true,
                                "Connected",
                                "",
                                g,
                                now,
                            );
                            status.platform = Some(facts.platform);
                            status.slurm_version = Some(facts.slurm_version);
                            status.accounting_available = Some(facts.accounting);
                        }
                        Some(Err(e)) => conditions::set(
                            &mut status.conditions,
                            "Reachable",
                            false,
                            "ConnectFailed",
                            &e,
                            g,
                            now,
                        ),
                        None => {}
                    },
                }
            }
        }
        let stored = Stored {
            uid,
            generation,
            spec_hash: obj.spec_hash.clone(),
            deleted: false,
            cluster_ref: None,
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

/// Resolves a Slurm cluster's SSH settings (standalone mode: files and environment variables;
/// the Python tool's `SLURM_EDGE_NODE_*` names fill what the manifest leaves out).
fn ssh_target(
    spec: &SlurmClusterSpec,
    dir: &Path,
    key: &ObjectKey,
) -> std::result::Result<SshTarget, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let ssh = spec.ssh.clone().unwrap_or_default();
    let host = Some(ssh.host.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_HOST"))
        .ok_or_else(|| format!("{key}: spec.ssh.host: missing (or set SLURM_EDGE_NODE_HOST)"))?;
    let user = Some(ssh.user.clone())
        .filter(|u| !u.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_USER"))
        .ok_or_else(|| format!("{key}: spec.ssh.user: missing (or set SLURM_EDGE_NODE_USER)"))?;
    let port = if spec.ssh.is_some() {
        ssh.port
    } else {
        env("SLURM_EDGE_NODE_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(22)
    };
    if ssh.totp_secret_ref.is_some() {
        return Err(format!(
            "{key}: spec.ssh.totpSecretRef: Secret references need Kubernetes mode (use totpEnv)"
        ));
    }
    let auth = if let Some(k) = &ssh.key_path {
        SshAuth::KeyFile(dir.join(k))
    } else if let Some(var) = &ssh.password_env {
        SshAuth::Password(env(var).ok_or_else(|| {
            format!("{key}: spec.ssh.passwordEnv: environment variable {var} is not set")
        })?)
    } else if ssh.key_secret_ref.is_some() || ssh.password_secret_ref.is_some() {
        return Err(format!(
            "{key}: spec.ssh: Secret references need Kubernetes mode"
        ));
    } else if let Some(k) = env("SLURM_EDGE_NODE_KEY_PATH") {
        SshAuth::KeyFile(PathBuf::from(k))
    } else if let Some(p) = env("SLURM_EDGE_NODE_PASSWORD") {
        SshAuth::Password(p)
    } else {
        return Err(format!(
            "{key}: spec.ssh: no key or password (set keyPath or passwordEnv)"
        ));
    };
    let totp_seed = match &ssh.totp_env {
        Some(var) => {
            let seed = env(var).ok_or_else(|| {
                format!("{key}: spec.ssh.totpEnv: environment variable {var} is not set")
            })?;
            crate::transport::totp_code(&seed, 0)
                .map_err(|e| format!("{key}: spec.ssh.totpEnv: {var}: {e}"))?;
            Some(seed)
        }
        None => None,
    };
    let known_hosts = match ssh.known_hosts.as_ref() {
        Some(kh) if kh.path.is_some() => kh.path.as_ref().map(|p| dir.join(p)),
        Some(kh) if kh.entries.is_some() => {
            let lines = kh.entries.clone().unwrap_or_default().join("\n") + "\n";
            let path = std::env::temp_dir().join(format!(
                "sao-known-hosts-{}-{}",
                std::process::id(),
                crate::manifest::hash_value(&serde_json::json!(lines))
            ));
            std::fs::write(&path, lines).map_err(|e| format!("{key}: writing known hosts: {e}"))?;
            Some(path)
        }
        _ => env("SLURM_EDGE_NODE_KNOWN_HOSTS").map(PathBuf::from),
    };
    let jump_hosts = ssh
        .jump_hosts
        .iter()
        .map(|j| {
            format!(
                "{}@{}:{}",
                j.user.clone().unwrap_or_else(|| user.clone()),
                j.host,
                j.port
            )
        })
        .collect();
    Ok(SshTarget {
        host,
        port,
        user,
        auth,
        known_hosts,
        jump_hosts,
        extra_options: ssh.extra_options.into_iter().collect(),
        connect_timeout: ssh
            .connect_timeout
            .map(|t| t.duration())
            .unwrap_or(Duration::from_secs(10)),
        totp_seed,
    })
}

/// The platform name in conda/pixi's spelling.
pub fn platform() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "linux-64".into(),
        "aarch64" => "linux-aarch64".into(),
        other => format!("linux-{other}"),
    }
}
