//! `SlurmAsset`: one Dagster asset's compute, and the status a Dagster sensor reads.

use super::common::{Condition, ConfigMapKeyRef, EnvironmentSettings, Resources, SecretKeyRef};
use crate::quantity::{Interval, Memory};
use jiff::Timestamp;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Desired compute of one Dagster asset.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dagster-slurm.io",
    version = "v1alpha1",
    kind = "SlurmAsset",
    namespaced,
    status = "SlurmAssetStatus",
    shortname = "sasset",
    category = "dagster-slurm",
    printcolumn = r#"{"name":"Asset","type":"string","jsonPath":".spec.assetKey"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".status.jobId"}"#,
    printcolumn = r#"{"name":"CPU-Eff","type":"number","jsonPath":".status.metrics.cpuEfficiency"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".status.phase"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlurmAssetSpec {
    /// Dagster asset key, path segments joined by `/`, e.g. `analytics/train_model`.
    pub asset_key: String,
    /// Name of the `SlurmCluster` in the same namespace. Absent: an implicit local cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ref: Option<String>,
    /// Changing this value starts a new run, e.g. the Dagster run ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
    /// What to run (unless every component has a payload of its own).
    #[serde(default)]
    pub payload: Payload,
    /// How to launch the payload inside the allocation.
    #[serde(default)]
    pub launcher: Launcher,
    /// Overrides of the cluster's queue defaults.
    #[serde(default)]
    pub resources: Resources,
    /// Environment variables for the payload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Free JSON handed to the payload as the Dagster Pipes context `extras`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_json")]
    pub extras: Option<serde_json::Value>,
    /// Dagster's Pipes context for the payload, as the Dagster step that launched this asset
    /// sees it (the `dagster-slurm-asset` package fills it in); absent fields default to this
    /// asset's key, `runKey` and attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipes_context: Option<PipesContext>,
    /// Overrides of the cluster's environment settings.
    #[serde(default)]
    pub environment: EnvironmentSettings,
    /// Name of a `SlurmSession` to run inside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ref: Option<String>,
    /// Resubmission after infrastructure failures.
    #[serde(default)]
    pub retry: Retry,
    /// Remove the run directory when the run fails (it is always removed after success unless `debug`).
    #[serde(default)]
    pub cleanup_on_failure: bool,
    /// Keep run directories and artefacts, whatever the outcome.
    #[serde(default)]
    pub debug: bool,
    /// Do not start new runs while true.
    #[serde(default)]
    pub suspend: bool,
    /// Two or more components make one heterogeneous job (`sbatch ... : ...`), queued once.
    /// Each has its own resources (over `resources`). The asset's payload runs in component 0
    /// and reaches the others with `srun --het-group=N` (their nodes are in
    /// `SLURM_JOB_NODELIST_HET_GROUP_N` and in `components.json` in the run dir).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub components: Vec<Component>,
}

/// One component of a heterogeneous job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Component {
    /// The component's name (a DNS label), unique in the asset: its key in status and in
    /// `components.json`.
    pub name: String,
    /// Its resources, over the asset's `resources` (which are over the cluster's defaults).
    #[serde(default)]
    pub resources: Resources,
    /// Its own payload: then every component has one, and they run side by side, each once
    /// on its component's first node (`srun --het-group=N`), each with its own run dir
    /// (`components/<name>/`), exit code, log tail and Pipes channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    /// The asset key its payload reports under (default: the asset's): a Dagster
    /// multi-asset, one key per component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_key: Option<String>,
    /// How its own payload is started (default: the asset's `launcher`): a Ray cluster or a
    /// Spark standalone cluster over this component's nodes only. Only with a payload of its
    /// own: the asset's one payload takes the asset's `launcher`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<Launcher>,
}

fn free_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "Free JSON handed to the payload as the Dagster Pipes context `extras`."
    })
}

/// The Dagster Pipes context (`PipesContextData`) handed to the payload; `extras` come from
/// `spec.extras`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipesContext {
    /// Keys of the assets the payload materializes, e.g. `["analytics/a", "analytics/b"]`
    /// (default: `spec.assetKey`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asset_keys: Vec<String>,
    /// Code version per asset key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_version_by_asset_key: Option<BTreeMap<String, Option<String>>>,
    /// Data provenance per asset key, in Pipes' wire form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_provenance")]
    pub provenance_by_asset_key: Option<BTreeMap<String, serde_json::Value>>,
    /// Partition key of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// Partition key range of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key_range: Option<PartitionRange>,
    /// Partition time window of the step (ISO 8601 bounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_time_window: Option<PartitionRange>,
    /// Dagster run ID (default: `spec.runKey`, else `<uid>-<run>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Dagster job name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Retry number of the Dagster step (default: the operator's resubmissions of this run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_number: Option<u32>,
}

/// A range of partition keys or a time window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionRange {
    /// First key, or the window's start.
    pub start: String,
    /// Last key, or the window's end.
    pub end: String,
}

fn free_provenance(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {"x-kubernetes-preserve-unknown-fields": true},
        "description": "Data provenance per asset key, in Pipes' wire form."
    })
}

/// The payload: exactly one of `path`, `inline`, `configMapRef`, `remotePath`, `command`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    cel,
    validation = Rule::new("[has(self.path), has(self.inline), has(self.configMapRef), has(self.remotePath), has(self.command)].filter(x, x).size() == 1")
        .message("exactly one of path, inline, configMapRef, remotePath, command must be set")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Payload {
    /// A script file; in standalone mode relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The script's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// A script held in a ConfigMap key (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
    /// A script already on the cluster (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_path: Option<String>,
    /// A command to run (argv form), e.g. `["python", "-m", "train.entrypoint"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments appended to the script or command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Interpreter for a script payload (argv form). Default: `python3` for `*.py`, else `bash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<Vec<String>>,
}

/// The launcher that turns the payload into a job script.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.ray) || self.type == 'ray'")
        .message("ray settings need type: ray"),
    validation = Rule::new("!has(self.spark) || self.type == 'spark'")
        .message("spark settings need type: spark")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Launcher {
    /// `bash` (default), `ray` or `spark`.
    #[serde(default, rename = "type")]
    pub type_: LauncherType,
    /// Settings of the Ray launcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<RaySettings>,
    /// Settings of the Spark launcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spark: Option<SparkSettings>,
}

/// How the Spark launcher starts its cluster: a standalone master on the job's first node and
/// a worker on every node (`srun --overlap`), all torn down when the payload ends. The payload
/// finds it in `SPARK_MASTER_URL` and in `SPARK_CONF_DIR` (a `spark-defaults.conf` with these
/// settings, so `SparkSession.builder.getOrCreate()` and `spark-submit` use them). Local mode
/// runs `local[*]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SparkSettings {
    /// Memory of the driver (the payload's JVM), e.g. `1G` (default `512M`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_memory: Option<Memory>,
    /// Memory of each executor (default: a worker's memory shared among its executors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_memory: Option<Memory>,
    /// Cores of each executor (default: all a worker's cores, one executor per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub executor_cores: Option<u32>,
    /// Executors in all (default: as many as the workers' cores hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub num_executors: Option<u32>,
    /// A Spark master that already runs (`spark://host:7077`): none is started, the payload
    /// uses this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_url: Option<String>,
    /// Where Spark is installed on the cluster (default: `$SPARK_HOME` of the job's
    /// environment, else the `pyspark` package's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spark_home: Option<String>,
    /// How long the master and every worker may take to start and register (default `2m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<Interval>,
    /// The address workers and the payload use to reach the master (default: the first
    /// node's IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_host: Option<String>,
}

impl SparkSettings {
    pub fn start_timeout_secs(&self) -> u64 {
        self.start_timeout
            .as_ref()
            .map_or(RaySettings::DEFAULT_START_TIMEOUT_SECS, |t| {
                t.duration().as_secs()
            })
    }
}

/// How the Ray launcher starts its cluster: a head on the job's first node, one worker on
/// every other node, all torn down when the payload ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RaySettings {
    /// CPUs each node offers to Ray (default: the CPUs Slurm allocated on the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub cpus_per_node: Option<u32>,
    /// GPUs each node offers to Ray (default: the job's `gpusPerNode`, else Ray's detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1024))]
    pub gpus_per_node: Option<u32>,
    /// Object store memory per node, e.g. `2G` (default: Ray's, 30% of the node's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store_memory: Option<Memory>,
    /// Extra arguments for every `ray start`, e.g. `["--resources={\"ssd\": 1}"]`. The
    /// launcher's own (addresses, ports, `--head`, `--block`, `--temp-dir`) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_start_args: Vec<String>,
    /// How long the head and every worker may take to start and join (default `2m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<Interval>,
    /// Start the Ray dashboard on the head (default false); its port goes into the status.
    #[serde(default)]
    pub dashboard: bool,
    /// The address workers and the payload use to reach the head, for sites whose node
    /// names do not resolve to a reachable interface (default: the head's own IP address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_address: Option<String>,
}

impl RaySettings {
    pub const DEFAULT_START_TIMEOUT_SECS: u64 = 120;
    pub fn start_timeout_secs(&self) -> u64 {
        self.start_timeout
            .as_ref()
            .map_or(Self::DEFAULT_START_TIMEOUT_SECS, |t| {
                t.duration().as_secs().max(1)
            })
    }
}

/// Launcher kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LauncherType {
    /// Run the payload directly in the batch script.
    #[default]
    Bash,
    /// Start a Ray cluster over the allocation first.
    Ray,
    /// Start a Spark cluster over the allocation first.
    Spark,
}

/// One environment variable for the payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// Variable name: letters, digits and `_`, not starting with a digit.
    pub name: String,
    /// Literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Value taken from a Secret (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Source of an environment variable's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVarSource {
    /// A key of a Secret in the asset's namespace.
    pub secret_key_ref: SecretKeyRef,
}

/// Resubmission policy for infrastructure failures (NODE_FAIL, BOOT_FAIL, PREEMPTED, lost transport).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Resubmissions allowed per run (0: none).
    #[serde(default)]
    pub limit: u32,
    /// Wait before each resubmission, e.g. `30s`.
    #[serde(default = "default_backoff")]
    pub backoff: Interval,
    /// Also resubmit when the payload itself exits non-zero.
    #[serde(default)]
    pub on_payload_failure: bool,
}

fn default_backoff() -> Interval {
    Interval::parse("10s").expect("valid literal")
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            limit: 0,
            backoff: default_backoff(),
            on_payload_failure: false,
        }
    }
}

/// Lifecycle phase of the current run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, waiting to start.
    #[default]
    Pending,
    /// Packing the environment.
    Packing,
    /// Uploading the environment and payload.
    Uploading,
    /// Submitting the job (or adopting one already submitted).
    Submitting,
    /// Waiting in the scheduler's queue.
    Queued,
    /// Running.
    Running,
    /// Finished with exit code 0.
    Succeeded,
    /// Finished unsuccessfully, or the spec is invalid.
    Failed,
    /// Cancelled by deletion or by a newer run.
    Cancelled,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Packing => "Packing",
            Phase::Uploading => "Uploading",
            Phase::Submitting => "Submitting",
            Phase::Queued => "Queued",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Cancelled => "Cancelled",
        }
    }
}

/// Observed state of a `SlurmAsset`: the contract the Dagster sensor reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlurmAssetStatus {
    /// Phase of the current run.
    #[serde(default)]
    pub phase: Phase,
    /// The spec generation the current run was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `spec.runKey` of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
    /// Number of runs started so far; the current run's number.
    #[serde(default)]
    pub run: u64,
    /// Submissions of the current run (1 + resubmissions after infrastructure failures).
    #[serde(default)]
    pub attempts: u32,
    /// Scheduler job ID of the current attempt (the process-group ID in local mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// In a session: the job step that runs the current attempt, `<jobId>.<step>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// A heterogeneous job's components: each one's job ID (`<jobId>+<N>`), nodes, state and
    /// metrics (`metrics` holds the totals over all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
    /// Raw scheduler state, e.g. `RUNNING`, `TIMEOUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_state: Option<String>,
    /// Machine-readable reason of the phase, e.g. `NonZeroExit`, `TIMEOUT`, `InvalidSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Exit code of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the job was submitted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub submit_time: Option<Timestamp>,
    /// When the job started.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub start_time: Option<Timestamp>,
    /// When the job ended.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub end_time: Option<Timestamp>,
    /// Nodes the job ran on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Efficiency metrics of the finished job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Environment cache facts of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvStatus>,
    /// What the payload reported through Dagster Pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipes: Option<PipesStatus>,
    /// The last lines of the job's output (bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<LogTail>,
    /// What the launcher started for the current attempt (Ray's head address and ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<LauncherStatus>,
    /// Run directory of the current attempt on the cluster (or the local host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_run_dir: Option<String>,
    /// Earlier runs, newest first (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RunSummary>,
    /// Conditions: `Invalid`, `Running`, `Complete`, `Failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One component of a heterogeneous job, as the scheduler reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// The component's name (`spec.components[].name`).
    pub name: String,
    /// `<jobId>+<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The component's nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// The component's Slurm state, e.g. `RUNNING`, `COMPLETED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_state: Option<String>,
    /// The component's exit code, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The component's own efficiency figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// With a payload of its own: the end of its stdout and stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<LogTail>,
    /// With a payload of its own: what it reported through Dagster Pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipes: Option<PipesStatus>,
    /// With a launcher of its own: what it started over the component's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<LauncherStatus>,
}

/// seff-style efficiency figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Wall-clock seconds from start to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_seconds: Option<f64>,
    /// CPU time over wall time × allocated CPUs, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_efficiency: Option<f64>,
    /// User + system CPU seconds summed over all steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_cpu_seconds: Option<f64>,
    /// Allocated CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_cpus: Option<u32>,
    /// Allocated nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_nodes: Option<u32>,
    /// Maximum resident set size over all steps, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_bytes: Option<u64>,
    /// `maxRssBytes` over the requested memory, 0..1 (absent when no memory was requested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_efficiency: Option<f64>,
    /// Elapsed × allocated nodes, in hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_hours: Option<f64>,
    /// Elapsed × allocated CPUs, in hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_hours: Option<f64>,
    /// Elapsed × allocated GPUs, in hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours: Option<f64>,
}

/// What the launcher of the current attempt started, as the job script reported it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LauncherStatus {
    /// `ray` (or `spark`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The address the payload reaches the cluster at, e.g. Ray's `10.0.0.5:6379`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_address: Option<String>,
    /// Port of the dashboard on the head, when it was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard_port: Option<u16>,
    /// Nodes that joined the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_joined: Option<u32>,
    /// Nodes of the allocation the cluster was to span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_expected: Option<u32>,
    /// Why the cluster could not be started, naming the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine-readable reason of `error` (default `LauncherFailed`), e.g. `SessionEnding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Environment cache facts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvStatus {
    /// Content hash of the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Whether the environment was already on the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    /// Bytes uploaded for this run's environment (0 on a cache hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_uploaded: Option<u64>,
    /// Seconds spent packing (0 when nothing was packed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_seconds: Option<f64>,
    /// Seconds spent uploading, unpacking, verifying and publishing (0 on a cache hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_seconds: Option<f64>,
    /// Where the environment lives on the cluster (`{remoteBase}/env-cache/{cacheKey}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Dagster Pipes messages reported by the payload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipesStatus {
    /// Messages read so far.
    #[serde(default)]
    pub message_count: u64,
    /// Whether the payload opened and closed its Pipes session.
    #[serde(default)]
    pub opened: bool,
    /// Whether the payload closed its Pipes session (a clean end).
    #[serde(default)]
    pub closed: bool,
    /// Materializations, in the order reported (bounded to the last 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub materializations: Vec<PipesMaterialization>,
    /// Asset-check results (bounded to the last 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub check_results: Vec<PipesCheckResult>,
    /// Custom messages' payloads (bounded to the last 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_json_list")]
    pub custom_messages: Vec<serde_json::Value>,
    /// The payload's latest log messages (`context.log.*`), bounded to the last 50, each cut
    /// to 1 KiB; `index` orders them across status updates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<PipesLog>,
    /// Messages skipped or cut because they exceeded the operator's limits (a line over
    /// 256 KiB, metadata over 16 KiB, or the oldest results when all of them exceed 128 KiB).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_messages: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn free_json_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"x-kubernetes-preserve-unknown-fields": true},
        "description": "Custom messages' payloads (bounded to the last 20)."
    })
}

fn free_metadata(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "Metadata in Pipes' wire form: name → {raw_value, type}."
    })
}

/// A log message reported through Pipes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipesLog {
    /// Position of the message in the payload's message stream (1 = first message).
    pub index: u64,
    /// `DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`.
    pub level: String,
    /// The message text.
    pub message: String,
}

/// A materialization reported through `report_asset_materialization`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipesMaterialization {
    /// Asset key (absent: the run's only asset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_key: Option<String>,
    /// Data version, if reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_version: Option<String>,
    /// Metadata in Pipes' wire form: name → `{raw_value, type}`.
    #[serde(default)]
    #[schemars(schema_with = "free_metadata")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// An asset-check result reported through `report_asset_check`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipesCheckResult {
    /// Asset key (absent: the run's only asset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_key: Option<String>,
    /// Name of the check.
    pub check_name: String,
    /// Whether the check passed.
    pub passed: bool,
    /// `ERROR` or `WARN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// Metadata in Pipes' wire form.
    #[serde(default)]
    #[schemars(schema_with = "free_metadata")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// The end of the job's output streams.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogTail {
    /// Last lines of standard output.
    #[serde(default)]
    pub stdout: String,
    /// Last lines of standard error.
    #[serde(default)]
    pub stderr: String,
    /// Size of the whole standard output so far, in bytes: what a reader has not seen yet is
    /// the end of `stdout` past the size it saw last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    /// Size of the whole standard error so far, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
}

/// A finished (or superseded) earlier run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// Run number.
    pub run: u64,
    /// Spec generation of that run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `spec.runKey` of that run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_key: Option<String>,
    /// Final phase.
    pub phase: Phase,
    /// Reason of the final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Job ID of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Attempts made.
    #[serde(default)]
    pub attempts: u32,
    /// Start time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub start_time: Option<Timestamp>,
    /// End time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::api::time::option"
    )]
    #[schemars(with = "Option<Timestamp>")]
    pub end_time: Option<Timestamp>,
}
