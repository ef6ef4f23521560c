//! Events: what a user reads with `kubectl describe`. One per phase change (Warning when it
//! failed or needs someone to act), and one when something a user must act on starts.

use super::Context;
use crate::api::{SessionPhase, SlurmAssetStatus, SlurmSessionStatus};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType};

/// Publishes one Event; a failure is logged, never fatal (Events are advisory).
pub(super) async fn publish(ctx: &Context, reference: &ObjectReference, ev: KubeEvent) {
    if let Err(e) = ctx.recorder.publish(&ev, reference).await {
        tracing::warn!("publishing an event: {e}");
    }
}

/// The Events of one reconcile of an asset (or a session's allocation), from its status
/// before and after.
pub(super) async fn asset_transition(
    ctx: &Context,
    reference: &ObjectReference,
    before: &SlurmAssetStatus,
    after: &SlurmAssetStatus,
) {
    if after.phase != before.phase || after.run != before.run {
        // Something a user must act on (an unreachable cluster) is a Warning from the start.
        let attention = needs_action(after.message.as_deref());
        let warn = matches!(after.phase, crate::api::Phase::Failed) || attention.is_some();
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
            note: Some(transition_note(
                &format!("run {}: ", after.run),
                before.phase.as_str(),
                after.phase.as_str(),
                after.message.as_deref(),
            )),
            // Events are folded by (type, reason, action): naming the run keeps each run's
            // own Event instead of counting later runs into the first one's.
            action: format!("Run{}", after.run),
            secondary: None,
        };
        publish(ctx, reference, ev).await;
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
        publish(ctx, reference, ev).await;
    }
}

/// The Event of a session's phase change.
pub(super) async fn session_transition(
    ctx: &Context,
    reference: &ObjectReference,
    before: &SlurmSessionStatus,
    after: &SlurmSessionStatus,
) {
    if after.phase == before.phase {
        return;
    }
    let ev = KubeEvent {
        type_: if after.phase == SessionPhase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: after
            .reason
            .clone()
            .unwrap_or_else(|| after.phase.as_str().to_string()),
        note: Some(transition_note(
            "",
            before.phase.as_str(),
            after.phase.as_str(),
            after.message.as_deref(),
        )),
        action: format!("Run{}", after.allocation.run),
        secondary: None,
    };
    publish(ctx, reference, ev).await;
}

/// `<prefix><from> → <to>[: <message>]`.
fn transition_note(prefix: &str, from: &str, to: &str, message: Option<&str>) -> String {
    let message = message.map(|m| format!(": {m}")).unwrap_or_default();
    format!("{prefix}{from} → {to}{message}")
}

/// The Event reason of a status message that asks a user to act, if it does.
pub(super) fn needs_action(message: Option<&str>) -> Option<&'static str> {
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
