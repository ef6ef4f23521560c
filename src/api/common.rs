//! Types shared by several resources.

use crate::quantity::{Memory, TimeLimit};
use jiff::Timestamp;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Scheduler settings. On a `SlurmCluster` they are the defaults; on a `SlurmAsset` they
/// override the cluster's defaults field by field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    cel,
    validation = Rule::new("!(has(self.mem) && has(self.memPerCpu))")
        .message("mem and memPerCpu are mutually exclusive")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Slurm partition (`--partition`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Quality of service (`--qos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Account to charge (`--account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Reservation to run in (`--reservation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Wall-clock limit (`--time`), e.g. `02:00:00` or `1-00:00:00`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<TimeLimit>,
    /// Number of nodes (`--nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub nodes: Option<u32>,
    /// Tasks in the job (`--ntasks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub ntasks: Option<u32>,
    /// CPUs per task (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub cpus_per_task: Option<u32>,
    /// Memory per node (`--mem`), e.g. `32G`. Mutually exclusive with `memPerCpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<Memory>,
    /// Memory per CPU (`--mem-per-cpu`). Mutually exclusive with `mem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_per_cpu: Option<Memory>,
    /// GPUs per node (`--gpus-per-node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1024))]
    pub gpus_per_node: Option<u32>,
    /// Node feature constraint (`--constraint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
    /// Further `sbatch` options, each one argument of the form `--name=value` or `--flag`.
    /// Options the operator owns (job name, comment, output, error, parsable) are rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_sbatch_args: Vec<String>,
}

impl Resources {
    /// Memory requested for the whole job, in bytes, when any was requested.
    pub fn requested_memory(&self) -> Option<u64> {
        let cpus = u64::from(self.cpus_per_task.unwrap_or(1) * self.ntasks.unwrap_or(1));
        let nodes = u64::from(self.nodes.unwrap_or(1));
        self.mem
            .as_ref()
            .map(|m| m.bytes() * nodes)
            .or_else(|| self.mem_per_cpu.as_ref().map(|m| m.bytes() * cpus))
    }

    /// Field-by-field override: values set on `self` win over `defaults`.
    pub fn merged_over(&self, defaults: &Resources) -> Resources {
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or_else(|| defaults.$f.clone())
            };
        }
        // Memory is one choice: an asset that sets either form replaces the cluster's choice.
        let (mem, mem_per_cpu) = if self.mem.is_some() || self.mem_per_cpu.is_some() {
            (self.mem.clone(), self.mem_per_cpu.clone())
        } else {
            (defaults.mem.clone(), defaults.mem_per_cpu.clone())
        };
        let mut extra = defaults.extra_sbatch_args.clone();
        extra.extend(self.extra_sbatch_args.iter().cloned());
        Resources {
            partition: pick!(partition),
            qos: pick!(qos),
            account: pick!(account),
            reservation: pick!(reservation),
            time_limit: pick!(time_limit),
            nodes: pick!(nodes),
            ntasks: pick!(ntasks),
            cpus_per_task: pick!(cpus_per_task),
            mem,
            mem_per_cpu,
            gpus_per_node: pick!(gpus_per_node),
            constraint: pick!(constraint),
            extra_sbatch_args: extra,
        }
    }
}

/// Where a software environment comes from and how the payload reaches the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentSettings {
    /// Command that packs the environment (argv form), e.g. `["pixi-pack", "--platform", "linux-64"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_command: Option<Vec<String>>,
    /// An environment already present on the cluster: a directory with `activate.sh` (pixi-pack)
    /// or `bin/activate` (a venv). Packing is skipped. Relative paths in standalone local mode are
    /// relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_deployed_env_path: Option<String>,
    /// Upload the packed environment even when the remote cache has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_env_push: Option<bool>,
    /// Do not upload the payload; run `{preDeployedEnvPath}/scripts/<file>` or `remotePayloadPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_payload_upload: Option<bool>,
    /// Payload path on the cluster when `skipPayloadUpload` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_payload_path: Option<String>,
    /// Globs of files whose content enters the environment cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_inject_globs: Option<Vec<String>>,
}

impl EnvironmentSettings {
    pub fn merged_over(&self, defaults: &EnvironmentSettings) -> EnvironmentSettings {
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or_else(|| defaults.$f.clone())
            };
        }
        EnvironmentSettings {
            pack_command: pick!(pack_command),
            pre_deployed_env_path: pick!(pre_deployed_env_path),
            force_env_push: pick!(force_env_push),
            skip_payload_upload: pick!(skip_payload_upload),
            remote_payload_path: pick!(remote_payload_path),
            cache_inject_globs: pick!(cache_inject_globs),
        }
    }
}

/// A reference to one key of a Secret (Kubernetes mode) in the object's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// A reference to one key of a ConfigMap in the object's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    pub name: String,
    /// Key within the ConfigMap.
    pub key: String,
}

/// A status condition, following Kubernetes conventions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Invalid`, `Running`, `Complete`, `Failed`, `Reachable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: Timestamp,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
