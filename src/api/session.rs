//! `SlurmSession`: one allocation that many assets share as job steps.

use super::asset::{LauncherStatus, RaySettings, SlurmAssetStatus};
use super::common::{Condition, Resources};
use crate::quantity::Interval;
use jiff::Timestamp;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A long-lived allocation (one `sbatch`) whose steps run the assets that name it in
/// `sessionRef`: they start without queueing, each with its own run dir, Pipes channel, log
/// tail and per-step metrics. A small agent inside the allocation starts the steps, so they
/// survive an operator restart and a lost SSH connection.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "dagster-slurm.io",
    version = "v1alpha1",
    kind = "SlurmSession",
    namespaced,
    status = "SlurmSessionStatus",
    shortname = "ssession",
    category = "dagster-slurm",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".status.jobId"}"#,
    printcolumn = r#"{"name":"Running","type":"integer","jsonPath":".status.runningCount"}"#,
    printcolumn = r#"{"name":"Queued","type":"integer","jsonPath":".status.queuedCount"}"#,
    printcolumn = r#"{"name":"Remaining","type":"integer","jsonPath":".status.remainingSeconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.maxConcurrentSteps) || self.maxConcurrentSteps >= 1")
        .message("maxConcurrentSteps must be at least 1")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlurmSessionSpec {
    /// Name of the `SlurmCluster` (mode `slurm`) in the same namespace.
    pub cluster_ref: String,
    /// The allocation: overrides of the cluster's queue defaults (nodes, CPUs, memory, time
    /// limit, partition, ...).
    #[serde(default)]
    pub resources: Resources,
    /// Steps that run at once (default 4); more wait in the session's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_steps: Option<u32>,
    /// The allocation ends after this long without a step (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Interval>,
    /// The allocation takes no new steps after this long, and ends once its steps have
    /// (default: only the time limit bounds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<Interval>,
    /// No step starts when less than this is left of the time limit (default `1m`); a step
    /// with its own `timeLimit` also needs that much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_before: Option<Interval>,
    /// Start a Ray cluster once over the allocation; assets with `launcher: ray` run on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<RaySettings>,
    /// An environment already on the cluster to activate for the session's agent and its
    /// Ray cluster (default: the cluster's `environment.preDeployedEnvPath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_deployed_env_path: Option<String>,
}

impl SlurmSessionSpec {
    pub fn max_steps(&self) -> u32 {
        self.max_concurrent_steps.unwrap_or(4).max(1)
    }
    pub fn idle_secs(&self) -> u64 {
        self.idle_timeout
            .as_ref()
            .map_or(300, |i| i.duration().as_secs())
    }
    pub fn drain_secs(&self) -> u64 {
        self.drain_before
            .as_ref()
            .map_or(60, |i| i.duration().as_secs())
    }
}

/// Phase of a session's allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SessionPhase {
    /// Accepted; the allocation is being requested.
    #[default]
    Pending,
    /// The allocation waits in the scheduler's queue.
    Queued,
    /// The allocation runs and takes steps.
    Running,
    /// Near its end: running steps go on, new ones are refused.
    Draining,
    /// The allocation ended (idle timeout, lifetime, deletion).
    Ended,
    /// The allocation could not be obtained, or ended abnormally.
    Failed,
}

impl SessionPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPhase::Pending => "Pending",
            SessionPhase::Queued => "Queued",
            SessionPhase::Running => "Running",
            SessionPhase::Draining => "Draining",
            SessionPhase::Ended => "Ended",
            SessionPhase::Failed => "Failed",
        }
    }
}

/// Observed state of a `SlurmSession`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlurmSessionStatus {
    /// Phase of the allocation.
    #[serde(default)]
    pub phase: SessionPhase,
    /// Machine-readable reason, e.g. `IdleTimeout`, `TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Scheduler job ID of the allocation; its steps are `<jobId>.<step>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Nodes of the allocation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// When the allocation started.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub start_time: Option<Timestamp>,
    /// When the allocation's time limit runs out (or its maximum lifetime, if sooner).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub deadline: Option<Timestamp>,
    /// Seconds left until `deadline`, when the status was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_seconds: Option<i64>,
    /// Assets whose step runs now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running_assets: Vec<String>,
    /// Assets waiting for a step (for the allocation, or for a free slot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued_assets: Vec<String>,
    /// `runningAssets` counted.
    #[serde(default)]
    pub running_count: u32,
    /// `queuedAssets` counted.
    #[serde(default)]
    pub queued_count: u32,
    /// The warm Ray cluster, when the session has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<LauncherStatus>,
    /// Conditions: `Ready` (takes steps now).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The allocation job as the operator tracks it (phase, run dir, metrics, log tail of the
    /// session's agent).
    #[serde(default)]
    pub allocation: SlurmAssetStatus,
}
