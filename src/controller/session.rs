//! Kubernetes mode for `SlurmSession`: the session's allocation is driven as an internal
//! asset (the agent as its payload, see [`crate::session`]) through the same core and
//! backend as assets; its status adds the assets that name it, read from the asset
//! controller's store.

use super::{
    Context, Error, Subject, drive_subject, events, next_action, resolve, settle_deletion,
    under_finalizer, update_cluster_status,
};
use crate::api::{
    API_VERSION, Phase, SessionPhase, SlurmAsset, SlurmAssetSpec, SlurmSession, SlurmSessionStatus,
};
use crate::backend::{Backend, Gate};
use crate::manifest::{describe, validate_session};
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::error_boundary::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// How often a step waiting for its session's allocation looks again (the session's watch
/// wakes it sooner).
const SESSION_WAIT: Duration = Duration::from_secs(2);

/// A change of `remainingSeconds` alone is written at most this often (it changes every
/// second; `deadline` says the same exactly).
const REMAINING_RESOLUTION: i64 = 60;

pub(super) struct SessionContext {
    pub base: Arc<Context>,
    /// The asset controller's store: the session's members are read from it, not listed.
    pub assets: Store<DeserializeGuard<SlurmAsset>>,
}

pub(super) fn error_policy(
    _obj: Arc<DeserializeGuard<SlurmSession>>,
    err: &Error,
    ctx: Arc<SessionContext>,
) -> Action {
    ctx.base.metrics.reconcile_error(err);
    Action::requeue(Duration::from_secs(15))
}

pub(super) async fn reconcile(
    obj: Arc<DeserializeGuard<SlurmSession>>,
    ctx: Arc<SessionContext>,
) -> Result<Action, Error> {
    ctx.base.metrics.reconciles.inc();
    let session = match &obj.0 {
        Ok(s) => s.clone(),
        Err(invalid) => {
            report_malformed(invalid, &ctx.base).await?;
            return Ok(Action::await_change());
        }
    };
    let ns = session.namespace().unwrap_or_else(|| "default".into());
    let api: Api<SlurmSession> = Api::namespaced(ctx.base.client.clone(), &ns);
    under_finalizer(&api, &session, |deleted| apply(&session, &ctx, deleted)).await
}

async fn apply(s: &SlurmSession, ctx: &SessionContext, deleted: bool) -> Result<Action, Error> {
    let base = &*ctx.base;
    let ns = s.namespace().unwrap_or_else(|| "default".into());
    let name = s.name_any();
    let uid = s.uid().unwrap_or_default();
    let previous = s.status.clone().unwrap_or_default();
    let allocation = crate::session::allocation_spec(&name, &s.spec);
    let errors = validate_session(&s.spec);
    let resolved = if errors.is_empty() {
        resolve::resolve(&allocation, &ns, base).await
    } else {
        Err(describe(&errors))
    };
    let subject = Subject {
        ns: &ns,
        name: &name,
        uid: &uid,
        generation: s.metadata.generation.unwrap_or(1),
        spec: &allocation,
        before: &previous.allocation,
        deleted,
        is_session: true,
    };
    let driven = drive_subject(base, &subject, &resolved, Gate::Open, None).await;
    let limit = resolved
        .as_ref()
        .ok()
        .and_then(|r| r.spec.resources.merged_over(&r.cluster.queue).time_limit)
        .and_then(|t| t.seconds());
    let status = crate::session::status(
        &s.spec,
        &previous.conditions,
        &driven.status,
        &members(&ctx.assets, &ns, &name),
        limit,
        Timestamp::now(),
    );
    if worth_writing(&previous, &status) {
        patch_status(base, &ns, &name, &status).await?;
    }
    if let Ok(resolve::Resolved {
        backend: Backend::Slurm(ex),
        cluster_ref: Some((cluster, generation)),
        ..
    }) = &resolved
    {
        update_cluster_status(base, &ns, cluster, *generation, ex).await;
    }
    let reference = s.object_ref(&());
    events::session_transition(base, &reference, &previous, &status).await;
    if deleted {
        settle_deletion(base, s.meta(), &reference, &driven.status).await?;
        base.readers.lock().await.remove(&uid);
        return Ok(Action::await_change());
    }
    Ok(next_action(base, &driven, &resolved))
}

/// The assets naming session `name`, with their phases.
fn members(
    store: &Store<DeserializeGuard<SlurmAsset>>,
    ns: &str,
    name: &str,
) -> Vec<(String, Phase)> {
    store
        .state()
        .iter()
        .filter_map(|a| a.0.as_ref().ok())
        .filter(|a| {
            a.namespace().as_deref() == Some(ns) && a.spec.session_ref.as_deref() == Some(name)
        })
        .map(|a| {
            (
                a.name_any(),
                a.status.as_ref().map(|s| s.phase).unwrap_or_default(),
            )
        })
        .collect()
}

/// Whether the new status says something the stored one does not: anything but the
/// countdown, which is written when it moved by [`REMAINING_RESOLUTION`].
fn worth_writing(before: &SlurmSessionStatus, after: &SlurmSessionStatus) -> bool {
    let without_countdown = |s: &SlurmSessionStatus| SlurmSessionStatus {
        remaining_seconds: None,
        ..s.clone()
    };
    without_countdown(before) != without_countdown(after)
        || match (before.remaining_seconds, after.remaining_seconds) {
            (Some(a), Some(b)) => (a - b).abs() >= REMAINING_RESOLUTION,
            (a, b) => a.is_some() != b.is_some(),
        }
}

async fn patch_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    status: &SlurmSessionStatus,
) -> Result<(), Error> {
    let api: Api<DeserializeGuard<SlurmSession>> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "SlurmSession",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(super::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A SlurmSession whose spec does not parse: `Failed`, reason `Invalid`, written once per
/// generation and error.
async fn report_malformed(
    invalid: &kube::core::error_boundary::InvalidObject,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(super::Malformed {
        ns,
        name,
        uid,
        error,
        seen,
    }) = super::unreported(invalid, ctx).await
    else {
        return Ok(());
    };
    let status = SlurmSessionStatus {
        phase: SessionPhase::Failed,
        reason: Some(crate::core::REASON_INVALID.into()),
        message: Some(format!("spec: {error}")),
        ..Default::default()
    };
    patch_status(ctx, &ns, &name, &status).await?;
    ctx.invalid.lock().await.insert(uid, seen);
    Ok(())
}

/// Where an asset's step goes: its session as stored, checked by [`crate::session::place`].
pub(super) async fn step_target(
    ctx: &Context,
    ns: &str,
    name: &str,
    asset: &SlurmAssetSpec,
) -> (Gate, Option<crate::session::StepTarget>) {
    let api: Api<DeserializeGuard<SlurmSession>> = Api::namespaced(ctx.client.clone(), ns);
    let wait = |m: String| (Gate::Wait(m, SESSION_WAIT), None);
    let session = match api.get_opt(name).await {
        Ok(Some(DeserializeGuard(Ok(s)))) => s,
        Ok(Some(DeserializeGuard(Err(_)))) => {
            return (
                Gate::Refuse(format!("spec.sessionRef: SlurmSession {name:?} is invalid")),
                None,
            );
        }
        Ok(None) => {
            return wait(format!(
                "waiting for SlurmSession {name:?} (not found in namespace {ns:?})"
            ));
        }
        Err(e) => return wait(format!("spec.sessionRef: {e}")),
    };
    if s_deleting(&session) {
        return (
            Gate::Refuse(format!(
                "spec.sessionRef: SlurmSession {name:?} is being deleted"
            )),
            None,
        );
    }
    let mut status = session.status.clone().unwrap_or_default();
    // The stored countdown is coarse (see REMAINING_RESOLUTION): the deadline is exact.
    if let Some(d) = status.deadline {
        status.remaining_seconds = Some(d.duration_since(Timestamp::now()).as_secs().max(0));
    }
    match crate::session::place(asset, name, &session.spec, &status) {
        Ok(t) => (Gate::Open, Some(t)),
        Err((m, true)) => wait(m),
        Err((m, false)) => (Gate::Refuse(m), None),
    }
}

fn s_deleting(s: &SlurmSession) -> bool {
    s.meta().deletion_timestamp.is_some()
}
