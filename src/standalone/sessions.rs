//! Sessions in standalone mode: the index of each session's member assets, and the session's
//! allocation as its members see it.

use super::Driver;
use super::store::ObjectKey;
use crate::api::Phase;
use crate::manifest::Kind;
use jiff::Timestamp;

/// The Driver's side of SlurmSessions: which assets name a session, and what they learn of it.
impl Driver {
    /// The session an asset's spec names.
    pub(super) fn session_of(&self, key: &ObjectKey) -> Option<ObjectKey> {
        let name = self.assets.get(key)?.spec()?.session_ref.clone()?;
        Some(ObjectKey {
            kind: Kind::SlurmSession,
            namespace: key.namespace.clone(),
            name,
        })
    }

    /// Moves `key` in [`Driver::members`] from the session it named (`was`) to the one it
    /// names now.
    pub(super) fn reindex_member(&mut self, key: &ObjectKey, was: Option<ObjectKey>) {
        let now = self.session_of(key);
        if was == now {
            return;
        }
        if let Some(w) = was
            && let Some(set) = self.members.get_mut(&w)
        {
            set.remove(key);
            if set.is_empty() {
                self.members.remove(&w);
            }
        }
        if let Some(n) = now {
            self.members.entry(n).or_default().insert(key.clone());
        }
    }

    /// Where the asset's step goes, when it names a session (`Ok(None)` otherwise). `Err`
    /// says why not now, and whether to wait for the session (`true`) or fail (`false`).
    pub(super) fn session_target(
        &self,
        key: &ObjectKey,
    ) -> std::result::Result<Option<crate::session::StepTarget>, (String, bool)> {
        let Some(spec) = self.assets[key].spec() else {
            return Ok(None);
        };
        let Some(name) = spec.session_ref.as_deref() else {
            return Ok(None);
        };
        let skey = ObjectKey {
            kind: Kind::SlurmSession,
            namespace: key.namespace.clone(),
            name: name.to_string(),
        };
        let Some(entry) = self.assets.get(&skey).filter(|e| !e.deleted) else {
            return Err((
                format!(
                    "waiting for SlurmSession {name:?} (not found in namespace {:?})",
                    key.namespace
                ),
                true,
            ));
        };
        let Some(session) = &entry.session else {
            return Err((format!("SlurmSession {name:?} is invalid"), false));
        };
        crate::session::place(spec, name, session, &self.session_status(&skey)).map(Some)
    }

    /// A session's status: its allocation's, with the assets that name it.
    pub(super) fn session_status(&self, skey: &ObjectKey) -> crate::api::SlurmSessionStatus {
        let entry = &self.assets[skey];
        let spec = entry.session.clone().unwrap_or_default();
        let members: Vec<(String, Phase)> = self
            .members
            .get(skey)
            .into_iter()
            .flatten()
            .filter_map(|k| self.assets.get(k).map(|a| (k.name.clone(), a.status.phase)))
            .collect();
        let limit = self
            .cluster_for(skey, Some(&spec.cluster_ref))
            .ok()
            .and_then(|rc| spec.resources.merged_over(&rc.spec.queue).time_limit)
            .and_then(|t| t.seconds());
        let previous = entry
            .session_status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        crate::session::status(
            &spec,
            &previous,
            &entry.status,
            &members,
            limit,
            Timestamp::now(),
        )
    }
}
