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
///
/// Precedence: a field set on the asset wins over the cluster's, which wins over the built-in
/// default. Where the environment comes from is decided by the most specific level that says
/// anything about it: `preDeployedEnvPath` (skips packing) or `packer`/`packCommand`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvironmentSettings {
    /// Which packer builds the environment: `uv` (a relocatable environment from
    /// `pyproject.toml` + `uv.lock`, or `requirements.txt`), `pixi` (`pixi-pack`), or
    /// `command` (`packCommand`). Unset: no environment is packed (implied `command` when
    /// `packCommand` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packer: Option<Packer>,
    /// Where the packer runs: `local` (the operator's host, default) or `remote` (the
    /// cluster's login node: air-gapped sites, or a host that cannot build for the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_on: Option<PackOn>,
    /// Settings of the `uv` packer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uv: Option<UvSettings>,
    /// Settings of the `pixi` packer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixi: Option<PixiSettings>,
    /// Your own packer (argv form, no shell), run in the manifest's directory (standalone) or
    /// in a directory holding the sources (Kubernetes, `packOn: remote`). It writes the
    /// archive to `$SAO_PACK_OUTPUT`, or prints the archive's path as its last line of output.
    /// An archive ending in `.sh` is self-extracting (run in the target directory); anything
    /// else is a tar archive. Unpacked, it must hold `activate.sh` or `bin/activate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_command: Option<Vec<String>>,
    /// Files the packer reads, relative to the manifest (standalone). In Kubernetes mode,
    /// the keys of `sourcesConfigMap`. The `uv` and `pixi` packers know their own files;
    /// list here what a `packCommand` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Kubernetes mode: a ConfigMap of the asset's namespace whose keys are the packer's
    /// files (`pyproject.toml`, `uv.lock`, `requirements.txt`, ...): the operator's pod has
    /// no checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources_config_map: Option<String>,
    /// An environment already present on the cluster: a directory with `activate.sh` (pixi-pack)
    /// or `bin/activate` (a venv). Packing is skipped. Relative paths in standalone local mode are
    /// relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_deployed_env_path: Option<String>,
    /// Pack and upload the environment again even when the remote cache has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_env_push: Option<bool>,
    /// Do not upload the payload; run `{preDeployedEnvPath}/scripts/<file>` or `remotePayloadPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_payload_upload: Option<bool>,
    /// Payload path on the cluster when `skipPayloadUpload` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_payload_path: Option<String>,
    /// Globs (relative to the manifest) of files whose content enters the environment cache
    /// key, besides the lockfile and project files. Unset: every `pixi.inject` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_inject_globs: Option<Vec<String>>,
}

/// Which packer builds an environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Packer {
    /// `uv`: a relocatable environment from a uv project or a requirements file.
    Uv,
    /// `pixi-pack`: a conda environment from a pixi project, as a self-extracting script.
    Pixi,
    /// The user's own `packCommand`.
    Command,
}

/// Where the packer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PackOn {
    /// On the operator's host; the archive is uploaded.
    Local,
    /// On the cluster's login node; only the sources are uploaded.
    Remote,
}

/// The `uv` packer's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UvSettings {
    /// Directory holding `pyproject.toml` and `uv.lock` (standalone: relative to the
    /// manifest). Default: the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// A requirements file to install instead of a uv project (pin every version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<String>,
    /// The cluster's Python interpreter that runs the environment (its version and platform
    /// choose the wheels). Default: `python3` on the cluster's `PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
}

/// The `pixi` packer's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PixiSettings {
    /// The pixi manifest (`pixi.toml` or `pyproject.toml`), relative to the manifest.
    /// Default: `pixi.toml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The pixi environment to pack. Default: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The conda platform to pack for. Default: the cluster's (`linux-64`, `linux-aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Local conda packages added to the environment (`--inject`), relative to the manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<String>,
}

impl EnvironmentSettings {
    pub fn merged_over(&self, defaults: &EnvironmentSettings) -> EnvironmentSettings {
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or_else(|| defaults.$f.clone())
            };
        }
        // Where the environment comes from is taken whole from the most specific level that
        // names a source: an asset's packer is not mixed with its cluster's pre-deployed path.
        let names_source = |e: &EnvironmentSettings| {
            e.packer.is_some() || e.pack_command.is_some() || e.pre_deployed_env_path.is_some()
        };
        let source = if names_source(self) { self } else { defaults };
        EnvironmentSettings {
            packer: source.packer,
            pack_command: source.pack_command.clone(),
            pre_deployed_env_path: source.pre_deployed_env_path.clone(),
            pack_on: pick!(pack_on),
            uv: pick!(uv),
            pixi: pick!(pixi),
            sources: pick!(sources),
            sources_config_map: pick!(sources_config_map),
            force_env_push: pick!(force_env_push),
            skip_payload_upload: pick!(skip_payload_upload),
            remote_payload_path: pick!(remote_payload_path),
            cache_inject_globs: pick!(cache_inject_globs),
        }
    }

    /// The packer to run, if the environment is to be packed.
    pub fn packer(&self) -> Option<Packer> {
        if self.pre_deployed_env_path.is_some() {
            return None;
        }
        self.packer
            .or_else(|| self.pack_command.as_ref().map(|_| Packer::Command))
    }
}

/// How long packed environments are kept in a cluster's cache (`{remoteBase}/env-cache`).
/// An environment that a queued or running job uses is never removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvCacheSettings {
    /// Keep at most this many environments, the most recently used ones. Default: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub keep: Option<u32>,
    /// Remove an environment unused for this long, e.g. `30d`, `12h`. Default: `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<crate::quantity::Interval>,
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
    #[serde(with = "crate::api::time")]
    #[schemars(with = "Timestamp")]
    pub last_transition_time: Timestamp,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
