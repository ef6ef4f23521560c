//! Cluster resolution in standalone mode: where SSH settings' files and variables are found
//! (the resolution itself is [`crate::credentials`], shared with Kubernetes mode).

use super::store::{self, ObjectKey, Stored};
use super::{Driver, ResolvedCluster};
use crate::api::{ClusterMode, SecretKeyRef, SlurmClusterSpec, SlurmClusterStatus};
use crate::conditions;
use crate::credentials::CredentialSource;
use crate::executor::slurm::SlurmExecutor;
use crate::manifest::StoreKind;
use crate::manifest::{Kind, Loaded, describe};
use crate::transport::SshTarget;
use crate::worker::{ClusterWorker, Request};
use futures::FutureExt;
use jiff::Timestamp;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::error;

/// Resolves a Slurm cluster's SSH settings in standalone mode (errors begin with the
/// cluster's key).
pub fn ssh_target(
    spec: &SlurmClusterSpec,
    dir: &Path,
    key: &ObjectKey,
) -> std::result::Result<SshTarget, String> {
    crate::credentials::ssh_target(spec, &LocalCredentials { dir })
        .now_or_never()
        .expect("standalone credentials never wait")
        .map_err(|e| format!("{key}: {e}"))
}

/// Standalone mode's credentials: files (relative to the manifest's directory, `~` and
/// `$HOME` expanded) and the operator's environment variables; no Secrets.
struct LocalCredentials<'a> {
    dir: &'a Path,
}

impl CredentialSource for LocalCredentials<'_> {
    async fn secret(&self, field: &str, _: &SecretKeyRef) -> Result<String, String> {
        Err(format!(
            "{field}: Secret references need Kubernetes mode (use keyPath, passwordEnv or totpEnv)"
        ))
    }

    fn env(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn local_file(&self, field: &str, p: &str) -> Result<PathBuf, String> {
        let path = crate::files::expand_home(self.dir, p);
        match std::fs::File::open(&path).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(format!("{field}: {}: not a file", path.display())),
            Err(e) => Err(format!("{field}: {}: {e}", path.display())),
        }
    }

    /// A file of the process's own in the temp dir, named by its content.
    fn private_file(&self, what: &str, content: &str) -> Result<PathBuf, String> {
        let path = std::env::temp_dir().join(format!(
            "sao-{}-{}-{}",
            what.replace('_', "-"),
            std::process::id(),
            crate::manifest::hash_value(&serde_json::json!(content))
        ));
        crate::files::write_private_once(&path, content.as_bytes())
            .map_err(|e| format!("writing {what}: {e}"))?;
        Ok(path)
    }

    fn mode(&self) -> StoreKind {
        StoreKind::Standalone
    }
}

/// The Driver's side of clusters: which cluster an asset uses, its worker, its probe and
/// the SlurmCluster's status.
impl Driver {
    /// Resolves the asset's cluster: an explicit `clusterRef`, else the implicit local cluster.
    pub(super) fn cluster_for(
        &self,
        key: &ObjectKey,
        cluster_ref: Option<&str>,
    ) -> std::result::Result<ResolvedCluster, String> {
        let Some(name) = cluster_ref else {
            return Ok(ResolvedCluster {
                spec: SlurmClusterSpec::default(),
                dir: self.dir.clone(),
                key: None,
                spec_hash: String::new(),
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
        self.resolve_cluster(c, ckey)
    }

    /// A SlurmCluster manifest as its assets (and its probe) use it: the Python tool's
    /// environment names fill what the manifest leaves out.
    pub(super) fn resolve_cluster(
        &self,
        c: &Loaded,
        ckey: ObjectKey,
    ) -> std::result::Result<ResolvedCluster, String> {
        let Some(cluster) = c.cluster() else {
            return Err(format!(
                "spec.clusterRef: SlurmCluster {:?} is invalid: {}",
                ckey.name,
                c.spec
                    .as_ref()
                    .err()
                    .map(|e| describe(e))
                    .unwrap_or_default()
            ));
        };
        let mut spec = cluster.clone();
        if spec.mode == ClusterMode::Slurm {
            if spec.remote_base.is_none() {
                spec.remote_base = std::env::var("SLURM_DEPLOYMENT_BASE_PATH").ok();
            }
            if spec.environment.pre_deployed_env_path.is_none() {
                spec.environment.pre_deployed_env_path =
                    std::env::var("CI_DEPLOYED_ENVIRONMENT_PATH").ok();
            }
        }
        let dir = c.file.parent().unwrap_or(&self.dir).to_path_buf();
        // SSH settings that cannot work (a missing key file, an unset variable) make the
        // cluster invalid for its assets, which run again once it is fixed, instead of each
        // failing its submission for good. A cluster with a worker was checked when it got it.
        let has_worker =
            self.workers.contains_key(&ckey) && self.worker_specs.get(&ckey) == Some(&c.spec_hash);
        if spec.mode == ClusterMode::Slurm && !has_worker {
            ssh_target(&spec, &dir, &ckey)?;
        }
        Ok(ResolvedCluster {
            spec,
            dir,
            key: Some(ckey),
            spec_hash: c.spec_hash.clone(),
        })
    }

    /// The worker of a Slurm cluster (`None` for local clusters), started on first use and
    /// replaced when the connection settings change.
    pub(super) fn worker_for(
        &mut self,
        rc: &ResolvedCluster,
    ) -> std::result::Result<Option<ObjectKey>, String> {
        if rc.spec.mode != ClusterMode::Slurm {
            return Ok(None);
        }
        let key = rc.key.clone().expect("slurm clusters are explicit");
        // The hot path (every submit, poll and cancel): an unchanged manifest keeps its worker,
        // without resolving SSH settings (files, environment) again.
        if self.workers.contains_key(&key) && self.worker_specs.get(&key) == Some(&rc.spec_hash) {
            return Ok(Some(key));
        }
        let target = ssh_target(&rc.spec, &rc.dir, &key)?;
        self.worker_specs.insert(key.clone(), rc.spec_hash.clone());
        if self
            .workers
            .get(&key)
            .is_some_and(|w| *w.executor.target() == target)
        {
            return Ok(Some(key));
        }
        let ex = Arc::new(SlurmExecutor::new(
            target,
            self.exe.clone(),
            self.counters.clone(),
        ));
        let worker = ClusterWorker::spawn(ex, key.clone(), self.replies.clone());
        // The old worker (if any) finishes its queue and closes its connection.
        self.workers.insert(key.clone(), worker);
        // New settings, new answers.
        self.polling.remove(&key);
        self.probing.remove(&key);
        self.probes.remove(&key);
        Ok(Some(key))
    }

    /// Starts a probe of a Slurm cluster unless one is under way or has succeeded.
    pub(super) fn probe(&mut self, key: &ObjectKey) {
        // Probe through the same resolution the assets use (env defaults included).
        let Some(Ok(rc)) = self
            .clusters
            .get(key)
            .filter(|c| c.cluster().is_some())
            .map(|c| self.resolve_cluster(c, key.clone()))
        else {
            return;
        };
        match self.worker_for(&rc) {
            Ok(Some(ckey)) => {
                if !self.probing.contains(&ckey)
                    && !self.probes.get(&ckey).is_some_and(|p| p.is_ok())
                {
                    self.probing.insert(ckey.clone());
                    self.workers[&ckey].send(Request::Probe);
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.probes.insert(key.clone(), Err(e));
            }
        }
    }

    pub(super) fn write_cluster_status(&mut self, key: &ObjectKey) {
        let obj = self.clusters[key].clone();
        let slurm = self.probes.get(key).cloned();
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
        match store::render_object(key, &stored, Some(&obj.file), None, Some(&obj.labels), None)
            .and_then(|t| self.cache.write(&path, t))
        {
            Ok(_) => {}
            Err(e) => error!("{key}: writing status: {e}"),
        }
    }

    /// Probes again the clusters found without accounting (slurmdbd may have been down only
    /// while the operator started); their status follows the answer.
    pub(super) fn reprobe_without_accounting(&mut self) {
        let without_accounting: Vec<ObjectKey> = self
            .probes
            .iter()
            .filter(|(_, p)| p.as_ref().is_ok_and(|f| !f.accounting))
            .map(|(k, _)| k.clone())
            .collect();
        for key in without_accounting {
            self.probes.remove(&key);
            self.probe(&key);
        }
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
