//! `SlurmCluster`: how to reach one Slurm cluster, and its defaults.

use super::common::{Condition, EnvCacheSettings, EnvironmentSettings, Resources, SecretKeyRef};
use crate::quantity::Interval;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A Slurm cluster (or the operator's own host, in `local` mode). The default is the implicit
/// local cluster of assets without `clusterRef`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dagster-slurm.io",
    version = "v1alpha1",
    kind = "SlurmCluster",
    namespaced,
    status = "SlurmClusterStatus",
    shortname = "scluster",
    category = "dagster-slurm",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.ssh.host"}"#,
    printcolumn = r#"{"name":"Slurm","type":"string","jsonPath":".status.slurmVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlurmClusterSpec {
    /// `local` runs payloads on the operator's host; `slurm` submits them over SSH.
    #[serde(default)]
    pub mode: ClusterMode,
    /// How to reach the cluster's login (edge) node. Required in `slurm` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshSettings>,
    /// Queue defaults for every asset on this cluster.
    #[serde(default)]
    pub queue: Resources,
    /// Root of run directories and the environment cache. Default: `~/.slurm-asset-operator`
    /// on the cluster; `<manifest dir>/.runs` in standalone local mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_base: Option<String>,
    /// Environment defaults for every asset on this cluster.
    #[serde(default)]
    pub environment: EnvironmentSettings,
    /// How long packed environments stay in the cluster's cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_cache: Option<EnvCacheSettings>,
    /// How often active jobs are polled, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<Interval>,
}

/// Where payloads run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// On the operator's host, as a local process.
    #[default]
    Local,
    /// As Slurm jobs, over SSH.
    Slurm,
}

/// SSH connection settings. Exactly one authentication method must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(
    cel,
    validation = Rule::new("[has(self.keySecretRef), has(self.keyPath), has(self.passwordSecretRef), has(self.passwordEnv)].filter(x, x).size() == 1")
        .message("exactly one of keySecretRef, keyPath, passwordSecretRef, passwordEnv must be set"),
    validation = Rule::new("!(has(self.totpSecretRef) && has(self.totpEnv))")
        .message("set at most one of totpSecretRef, totpEnv")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SshSettings {
    /// Host name or address of the login node.
    pub host: String,
    /// SSH port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key from a Secret key (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
    /// Private key file on the operator's host (standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_path: Option<String>,
    /// Password from a Secret key (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Name of an environment variable of the operator that holds the password (standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// TOTP seed (base32, as in an `otpauth://` URI) from a Secret key (Kubernetes mode): the
    /// operator answers the login's one-time-code prompt itself (RFC 6238, SHA-1, 6 digits, 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret_ref: Option<SecretKeyRef>,
    /// Name of an environment variable of the operator that holds the TOTP seed (standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_env: Option<String>,
    /// Known-hosts entries for strict host-key checking (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<KnownHosts>,
    /// Hosts to jump through, outermost first. Each is logged in to with this cluster's key or
    /// password and checked against its `knownHosts`, which must list them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump_hosts: Vec<JumpHost>,
    /// Further `ssh -o` options, name → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_options: BTreeMap<String, String>,
    /// Connection timeout, e.g. `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Interval>,
}

fn default_port() -> u16 {
    22
}

/// Known-hosts source: exactly one of `path`, `secretRef`, `entries`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KnownHosts {
    /// A known_hosts file on the operator's host (standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A Secret key holding known_hosts lines (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// known_hosts lines given inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<String>>,
}

/// One jump host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JumpHost {
    /// Host name or address.
    pub host: String,
    /// SSH port.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Login user (default: the cluster's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Observed state of a `SlurmCluster`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlurmClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: `Reachable`, `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Detected platform, e.g. `linux-64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Detected Slurm version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_version: Option<String>,
    /// Whether `sacct` accounting answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting_available: Option<bool>,
}
