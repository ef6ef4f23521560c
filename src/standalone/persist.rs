//! Standalone mode's status writer: asset status files (written only when changed, by temp
//! file and rename) and the operator's own metrics file.

use super::Driver;
use super::store::{self, ObjectKey, Stored};
use crate::api::{ClusterMode, Phase};
use crate::manifest::Kind;
use jiff::Timestamp;
use std::path::Path;
use std::sync::atomic::Ordering;
use tracing::{error, warn};

/// The Driver's status writer: only what changed is written, atomically.
impl Driver {
    /// `.status/operator-metrics.yaml`: counters of the operator's own work. Those of SSH,
    /// the scheduler and uploads appear once a Slurm cluster is in use: with local clusters
    /// alone they do not apply (a 0 would read as "none needed").
    pub(super) fn write_operator_metrics(&mut self) {
        let c = &self.counters;
        let env = &crate::environment::COUNTERS;
        let mut v = serde_json::json!({
            "envPacks": env.packs.load(Ordering::Relaxed),
            "envCacheHits": env.hits.load(Ordering::Relaxed),
        });
        let slurm = !self.workers.is_empty()
            || self
                .clusters
                .values()
                .any(|l| l.cluster().is_some_and(|c| c.mode == ClusterMode::Slurm));
        if slurm {
            for (k, n) in [
                ("sshConnects", &c.ssh_connects),
                ("sshReconnects", &c.ssh_reconnects),
                ("schedulerPolls", &c.scheduler_polls),
                ("schedulerQueries", &c.scheduler_queries),
                ("schedulerPollFailures", &c.scheduler_poll_failures),
                ("exitNotices", &c.exit_notices),
                ("remoteCommands", &c.remote_commands),
                ("envUploads", &env.uploads),
                ("envBytesUploaded", &env.bytes_uploaded),
            ] {
                v[k] = n.load(Ordering::Relaxed).into();
            }
        }
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

    pub(super) fn persist(&mut self, key: &ObjectKey) {
        self.persist_one(key);
        // A session lists its running and queued assets: it is written with them.
        let session = self.assets[key]
            .spec()
            .and_then(|s| s.session_ref.clone())
            .map(|name| ObjectKey {
                kind: Kind::SlurmSession,
                namespace: key.namespace.clone(),
                name,
            })
            .filter(|k| self.assets.contains_key(k));
        if let Some(skey) = session {
            self.persist_one(&skey);
        }
    }

    pub(super) fn persist_one(&mut self, key: &ObjectKey) {
        let session = (key.kind == Kind::SlurmSession).then(|| self.session_status(key));
        let entry = self.assets.get_mut(key).expect("known");
        let value = match &session {
            Some(st) => {
                entry.session_status = Some(st.clone());
                serde_json::to_value(st)
            }
            None => serde_json::to_value(&entry.status),
        };
        let entry = &self.assets[key];
        let status = match value {
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
            entry.loaded.as_ref().map(|l| &l.labels),
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

    pub(super) fn cache_has_deleted(&self, path: &Path) -> bool {
        store::read_stored_at(path).is_some_and(|s| s.deleted)
    }
}
