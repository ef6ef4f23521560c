//! Reading manifests: YAML documents → typed, validated `SlurmAsset` / `SlurmCluster` specs.
//!
//! Every error names the file, the document and the field path (`spec.resources.mem`) with the
//! reason. A document whose kind and name can be read yields a [`Loaded`] object even when its
//! spec is invalid, so that the error can be written into that object's status.

use crate::api::{
    API_VERSION, ClusterMode, EnvironmentSettings, Launcher, LauncherType, Resources,
    SlurmAssetSpec, SlurmClusterSpec, SlurmSessionSpec,
};
use crate::shell::is_env_name;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The kinds this operator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    SlurmAsset,
    SlurmCluster,
    SlurmSession,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SlurmAsset => "SlurmAsset",
            Kind::SlurmCluster => "SlurmCluster",
            Kind::SlurmSession => "SlurmSession",
        }
    }
}

/// Which store the manifest comes from; some fields exist in only one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Standalone,
    Kubernetes,
}

/// A problem with one field of a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Joins field errors into one message, as shown in status and logs.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A document that cannot be attributed to an object (bad YAML, unknown kind, no name, ...).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {reason}", file.display(), document.map(|d| format!(" (document {d})")).unwrap_or_default())]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based index of the YAML document, when known.
    pub document: Option<usize>,
    pub reason: String,
}

/// A typed spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Asset(Box<SlurmAssetSpec>),
    Cluster(Box<SlurmClusterSpec>),
    Session(Box<SlurmSessionSpec>),
}

/// One object read from a manifest.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub file: PathBuf,
    pub document: usize,
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// Content hash of the spec as written (valid or not): a change starts a new generation.
    pub spec_hash: String,
    /// `spec.assetKey` as written, readable even when the spec is invalid (for listings).
    pub asset_key: Option<String>,
    /// `metadata.labels`, copied into the status file so that a reader can select objects
    /// (e.g. those of one Dagster run) without parsing every manifest.
    pub labels: BTreeMap<String, String>,
    pub spec: Result<Spec, Vec<FieldError>>,
}

impl Loaded {
    pub fn asset(&self) -> Option<&SlurmAssetSpec> {
        match &self.spec {
            Ok(Spec::Asset(a)) => Some(a),
            _ => None,
        }
    }
    pub fn session(&self) -> Option<&SlurmSessionSpec> {
        match &self.spec {
            Ok(Spec::Session(s)) => Some(s),
            _ => None,
        }
    }
    pub fn cluster(&self) -> Option<&SlurmClusterSpec> {
        match &self.spec {
            Ok(Spec::Cluster(c)) => Some(c),
            _ => None,
        }
    }
}

/// Parses every document of one manifest file.
pub fn parse_file(file: &Path, text: &str, store: StoreKind) -> Vec<Result<Loaded, ManifestError>> {
    let docs: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, yaml_options()) {
        Ok(d) => d,
        Err(e) => {
            // The parser's message quotes the input: give only where it failed.
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            return vec![Err(ManifestError {
                file: file.to_path_buf(),
                document: None,
                reason: format!("YAML does not parse{at}, or exceeds the parser's limits"),
            })];
        }
    };
    docs.into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(i, v)| parse_document(file, i + 1, v, store))
        .collect()
}

fn parse_document(
    file: &Path,
    document: usize,
    doc: Value,
    store: StoreKind,
) -> Result<Loaded, ManifestError> {
    let err = |reason: String| ManifestError {
        file: file.to_path_buf(),
        document: Some(document),
        reason,
    };
    let Value::Object(mut map) = doc else {
        return Err(err(
            "a manifest must be a mapping with apiVersion, kind, metadata and spec".into(),
        ));
    };
    // Nothing read from a document is echoed until it is known to be one of our manifests:
    // a symlink to a secret file must not reach the log through an error message.
    if map.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION) {
        return Err(err(format!(
            "apiVersion: missing or not {API_VERSION:?} (not a manifest of this operator)"
        )));
    }
    let kind = match map.get("kind").and_then(Value::as_str) {
        Some("SlurmAsset") => Kind::SlurmAsset,
        Some("SlurmCluster") => Kind::SlurmCluster,
        Some("SlurmSession") => Kind::SlurmSession,
        Some(_) => {
            return Err(err(
                "kind: not a kind this operator serves (expected SlurmAsset, SlurmCluster or SlurmSession)"
                    .into(),
            ));
        }
        None => return Err(err("kind: missing".into())),
    };
    for key in map.keys() {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
            return Err(err(format!(
                "{}: unknown field (expected apiVersion, kind, metadata, spec)",
                crate::limits::truncate(key, 64)
            )));
        }
    }
    let meta: ObjectMeta = serde_json::from_value(map.remove("metadata").unwrap_or(Value::Null))
        .map_err(|e| err(format!("metadata: {e}")))?;
    let name = meta
        .name
        .clone()
        .ok_or_else(|| err("metadata.name: missing".into()))?;
    if let Some(reason) = dns_subdomain_problem(&name) {
        return Err(err(format!("metadata.name: {reason}")));
    }
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if let Some(reason) = dns_label_problem(&namespace) {
        return Err(err(format!("metadata.namespace: {reason}")));
    }
    let labels = meta.labels.clone().unwrap_or_default();
    if let Some(reason) = labels_problem(&labels) {
        return Err(err(format!("metadata.labels: {reason}")));
    }
    let spec_value = map.remove("spec").unwrap_or(Value::Null);
    let spec_hash = hash_value(&spec_value);
    let asset_key = spec_value
        .get("assetKey")
        .and_then(Value::as_str)
        .map(str::to_string);
    let manifest_dir = file.parent().unwrap_or(Path::new("."));
    let spec = match kind {
        Kind::SlurmAsset => typed::<SlurmAssetSpec>(spec_value).and_then(|s| {
            let errors = validate_asset(&s, store, manifest_dir);
            if errors.is_empty() {
                Ok(Spec::Asset(Box::new(s)))
            } else {
                Err(errors)
            }
        }),
        Kind::SlurmCluster => typed::<SlurmClusterSpec>(spec_value).and_then(|s| {
            let errors = validate_cluster(&s, store);
            if errors.is_empty() {
                Ok(Spec::Cluster(Box::new(s)))
            } else {
                Err(errors)
            }
        }),
        Kind::SlurmSession => typed::<SlurmSessionSpec>(spec_value).and_then(|s| {
            let errors = validate_session(&s);
            if errors.is_empty() {
                Ok(Spec::Session(Box::new(s)))
            } else {
                Err(errors)
            }
        }),
    };
    Ok(Loaded {
        file: file.to_path_buf(),
        document,
        kind,
        namespace,
        name,
        spec_hash,
        asset_key,
        labels,
        spec,
    })
}

/// Labels as Kubernetes accepts them: at most 64, keys `[prefix/]name` (prefix a DNS
/// subdomain, name up to 63 characters), values up to 63 characters of `[A-Za-z0-9._-]`,
/// starting and ending alphanumeric.
fn labels_problem(labels: &BTreeMap<String, String>) -> Option<String> {
    const MAX_LABELS: usize = 64;
    if labels.len() > MAX_LABELS {
        return Some(format!("more than {MAX_LABELS} labels"));
    }
    let name_ok = |s: &str, empty_ok: bool| {
        if s.is_empty() {
            return empty_ok;
        }
        let b = s.as_bytes();
        s.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
    };
    for (k, v) in labels {
        let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
        let prefix_ok = prefix.is_empty() && !k.contains('/')
            || (prefix.len() <= 253 && dns_subdomain_problem(prefix).is_none());
        if !prefix_ok || !name_ok(name, false) {
            return Some(format!(
                "key {:?} is not a valid label key",
                crate::limits::truncate(k, 64)
            ));
        }
        if !name_ok(v, true) {
            return Some(format!(
                "value of {:?} is not a valid label value (up to 63 characters of letters, digits, '-', '_', '.')",
                crate::limits::truncate(k, 64)
            ));
        }
    }
    None
}

/// Parser limits for manifests: small documents, shallow nesting, few aliases (YAML bombs).
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 200_000;
    budget.max_aliases = 1_000;
    budget.max_anchors = 1_000;
    budget.max_recorded_anchor_events = 100_000;
    budget.max_recorded_anchor_bytes = 4 << 20;
    budget.max_depth = 32;
    budget.max_documents = 256;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = 8 << 20;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    options
}

/// Deserializes a spec and reports the failing field's full path.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, Vec<FieldError>> {
    if value.is_null() {
        return Err(vec![field_err("spec", "missing")]);
    }
    if let Some(e) = find_nul(&value, "spec") {
        return Err(vec![e]);
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        vec![field_err(field, e.into_inner().to_string())]
    })
}

/// NUL bytes cannot travel in argv, environment or files safely: reject them up front.
fn find_nul(v: &Value, path: &str) -> Option<FieldError> {
    match v {
        Value::String(s) if s.contains('\0') => Some(field_err(path, "contains a NUL byte")),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| find_nul(x, &format!("{path}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(field_err(path, "a key contains a NUL byte"))
            } else {
                find_nul(x, &format!("{path}.{k}"))
            }
        }),
        _ => None,
    }
}

/// sha256 of the canonical JSON (serde_json maps are key-sorted).
pub fn hash_value(v: &Value) -> String {
    let bytes = serde_json::to_vec(v).expect("JSON values serialize");
    hex::encode(Sha256::digest(&bytes))[..16].to_string()
}

fn dns_subdomain_problem(s: &str) -> Option<String> {
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = s
        .bytes()
        .next()
        .zip(s.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    (!(ok_chars && ends_ok && s.len() <= 253)).then(|| {
        format!("{s:?} is not a valid name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)")
    })
}

fn dns_label_problem(s: &str) -> Option<String> {
    (dns_subdomain_problem(s).is_some() || s.contains('.') || s.len() > 63).then(|| {
        format!("{s:?} is not a valid namespace (lowercase letters, digits and '-', at most 63 characters)")
    })
}

/// Checks an `extraSbatchArgs` entry (see [`crate::sbatch_options`]).
pub fn sbatch_arg_problem(arg: &str) -> Option<String> {
    crate::sbatch_options::problem(arg)
}

/// Poll interval floors: the scheduler is asked once per interval per cluster.
pub const MIN_SLURM_POLL: std::time::Duration = std::time::Duration::from_secs(1);
pub const MIN_LOCAL_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Length and count bounds of every string and list of a spec (see [`crate::limits`]).
fn size_errors<T: serde::Serialize>(spec: &T) -> Vec<FieldError> {
    let value = serde_json::to_value(spec).unwrap_or(Value::Null);
    crate::limits::check_sizes(&value)
        .into_iter()
        .map(|(f, r)| field_err(f, r))
        .collect()
}

/// A path on the cluster: `~` and `~/x` mean the login user's home (as relative paths do);
/// `~user` forms are refused, since no shell ever expands them.
pub fn remote_path_problem(p: &str) -> Option<String> {
    if p.is_empty() {
        return Some("must not be empty".into());
    }
    if p.starts_with('~') && p != "~" && !p.starts_with("~/") {
        return Some("~user paths are not supported; use an absolute path or ~/...".into());
    }
    if p.contains(['\n', '\r']) {
        return Some("must be on one line".into());
    }
    None
}

/// Upper bounds of counts, far above any real cluster, so that typos fail at once.
const MAX_NODES: u32 = 100_000;
const MAX_TASKS: u32 = 1_000_000;
const MAX_CPUS_PER_TASK: u32 = 4096;
const MAX_GPUS_PER_NODE: u32 = 1024;

/// Semantic checks of a `SlurmSession` spec.
pub fn validate_session(s: &SlurmSessionSpec) -> Vec<FieldError> {
    let mut errors = vec![];
    if let Some(reason) = dns_subdomain_problem(&s.cluster_ref) {
        errors.push(field_err("spec.clusterRef", reason));
    }
    if s.max_concurrent_steps == Some(0) {
        errors.push(field_err("spec.maxConcurrentSteps", "must be at least 1"));
    }
    if s.max_concurrent_steps.is_some_and(|n| n > 1000) {
        errors.push(field_err("spec.maxConcurrentSteps", "at most 1000"));
    }
    if s.pre_deployed_env_path
        .as_deref()
        .is_some_and(|p| p.is_empty() || p.len() > 4096 || p.contains(['\0', '\n']))
    {
        errors.push(field_err(
            "spec.preDeployedEnvPath",
            "must be a path under 4 KiB, without NUL or newline",
        ));
    }
    validate_resources(&s.resources, "spec.resources", &mut errors);
    if let Some(ray) = &s.ray {
        let l = Launcher {
            type_: LauncherType::Ray,
            ray: Some(ray.clone()),
            spark: None,
        };
        let mut ray_errors = vec![];
        validate_launcher(&l, &mut ray_errors);
        errors.extend(ray_errors.into_iter().map(|mut e| {
            e.field = e.field.replace("spec.launcher.ray", "spec.ray");
            e
        }));
    }
    errors
}

/// A host name or IP address as a launcher setting takes it (it reaches a shell quoted, but
/// must also be an address to the programs given it).
fn host_problem(h: &str) -> bool {
    h.is_empty()
        || h.len() > 253
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

fn validate_spark(l: &Launcher, errors: &mut Vec<FieldError>) {
    let Some(spark) = &l.spark else {
        return;
    };
    if l.type_ != LauncherType::Spark {
        errors.push(field_err("spec.launcher.spark", "needs type: spark"));
    }
    if let Some(url) = &spark.master_url {
        let ok = url
            .strip_prefix("spark://")
            .is_some_and(|rest| rest.split(',').all(|h| !host_problem(h)));
        if !ok {
            errors.push(field_err(
                "spec.launcher.spark.masterUrl",
                "must be spark://host:port (or spark://h1:p1,h2:p2)",
            ));
        }
    }
    if let Some(h) = &spark.master_host
        && host_problem(h)
    {
        errors.push(field_err(
            "spec.launcher.spark.masterHost",
            "must be a host name or IP address",
        ));
    }
    if let Some(p) = &spark.spark_home
        && (p.is_empty() || p.len() > 4096 || p.contains(['\0', '\n']))
    {
        errors.push(field_err(
            "spec.launcher.spark.sparkHome",
            "must be a path under 4 KiB, without NUL or newline",
        ));
    }
    for (field, v) in [
        ("executorCores", spark.executor_cores),
        ("numExecutors", spark.num_executors),
    ] {
        if v == Some(0) {
            errors.push(field_err(
                format!("spec.launcher.spark.{field}"),
                "must be at least 1",
            ));
        }
    }
    for (field, m) in [
        ("driverMemory", &spark.driver_memory),
        ("executorMemory", &spark.executor_memory),
    ] {
        if m.as_ref().is_some_and(|m| m.bytes() < 512 * 1024 * 1024) {
            errors.push(field_err(
                format!("spec.launcher.spark.{field}"),
                "must be at least 512M (Spark refuses a heap under 450 MiB)",
            ));
        }
    }
}

fn validate_launcher(l: &Launcher, errors: &mut Vec<FieldError>) {
    validate_spark(l, errors);
    let Some(ray) = &l.ray else {
        return;
    };
    if l.type_ != LauncherType::Ray {
        errors.push(field_err("spec.launcher.ray", "needs type: ray"));
    }
    if ray.extra_start_args.len() > 64 {
        errors.push(field_err(
            "spec.launcher.ray.extraStartArgs",
            "at most 64 arguments",
        ));
    }
    for (i, a) in ray.extra_start_args.iter().enumerate() {
        let at = format!("spec.launcher.ray.extraStartArgs[{i}]");
        if a.len() > 4096 || a.contains('\0') {
            errors.push(field_err(at, "must be under 4 KiB, without NUL"));
        } else if crate::launcher::ray_option_owned(a) {
            errors.push(field_err(
                at,
                format!(
                    "{} is set by the launcher",
                    crate::limits::truncate(a.split('=').next().unwrap_or(a), 40)
                ),
            ));
        }
    }
    if let Some(h) = &ray.head_address
        && host_problem(h)
    {
        errors.push(field_err(
            "spec.launcher.ray.headAddress",
            "must be a host name or IP address",
        ));
    }
    if ray.cpus_per_node == Some(0) {
        errors.push(field_err(
            "spec.launcher.ray.cpusPerNode",
            "must be at least 1",
        ));
    }
}

fn validate_resources(r: &Resources, at: &str, errors: &mut Vec<FieldError>) {
    for (field, value, max) in [
        ("nodes", r.nodes, MAX_NODES),
        ("ntasks", r.ntasks, MAX_TASKS),
        ("cpusPerTask", r.cpus_per_task, MAX_CPUS_PER_TASK),
    ] {
        if let Some(v) = value
            && !(1..=max).contains(&v)
        {
            errors.push(field_err(
                format!("{at}.{field}"),
                format!("must be between 1 and {max}"),
            ));
        }
    }
    if r.gpus_per_node.is_some_and(|g| g > MAX_GPUS_PER_NODE) {
        errors.push(field_err(
            format!("{at}.gpusPerNode"),
            format!("must be at most {MAX_GPUS_PER_NODE}"),
        ));
    }
    if r.mem.is_some() && r.mem_per_cpu.is_some() {
        errors.push(field_err(
            format!("{at}.mem"),
            "mem and memPerCpu are mutually exclusive",
        ));
    }
    for (i, a) in r.extra_sbatch_args.iter().enumerate() {
        if let Some(reason) = sbatch_arg_problem(a) {
            errors.push(field_err(format!("{at}.extraSbatchArgs[{i}]"), reason));
        }
    }
    for (field, v) in [
        ("partition", &r.partition),
        ("qos", &r.qos),
        ("account", &r.account),
        ("reservation", &r.reservation),
        ("constraint", &r.constraint),
    ] {
        if v.as_deref()
            .is_some_and(|s| s.is_empty() || s.contains('\n'))
        {
            errors.push(field_err(
                format!("{at}.{field}"),
                "must be non-empty and on one line",
            ));
        }
    }
}

fn validate_environment(
    e: &EnvironmentSettings,
    at: &str,
    store: StoreKind,
    errors: &mut Vec<FieldError>,
) {
    use crate::api::{PackOn, Packer};
    match (e.packer, &e.pack_command) {
        (Some(Packer::Command), None) => errors.push(field_err(
            format!("{at}.packCommand"),
            "packer: command needs packCommand",
        )),
        (Some(p), Some(_)) if p != Packer::Command => errors.push(field_err(
            format!("{at}.packCommand"),
            "is the command packer's: set packer: command, or remove packCommand",
        )),
        _ => {}
    }
    if e.pack_command
        .as_ref()
        .is_some_and(|c| c.is_empty() || c[0].is_empty())
    {
        errors.push(field_err(
            format!("{at}.packCommand"),
            "needs a program to run",
        ));
    }
    if e.pack_command.is_some()
        && e.pack_on != Some(PackOn::Remote)
        && store == StoreKind::Kubernetes
    {
        errors.push(field_err(
            format!("{at}.packCommand"),
            "in Kubernetes mode a pack command runs only on the login node: set packOn: remote",
        ));
    }
    if e.sources_config_map.is_some() && store != StoreKind::Kubernetes {
        errors.push(field_err(
            format!("{at}.sourcesConfigMap"),
            "is for Kubernetes mode; in standalone mode the sources are files beside the manifest",
        ));
    }
    let paths =
        e.uv.iter()
            .flat_map(|u| {
                [
                    ("uv.project", &u.project),
                    ("uv.requirements", &u.requirements),
                ]
            })
            .chain(e.pixi.iter().map(|p| ("pixi.manifest", &p.manifest)))
            .filter_map(|(f, v)| v.as_ref().map(|v| (f, v.clone())))
            .chain(
                e.pixi
                    .iter()
                    .flat_map(|p| p.inject.iter().map(|v| ("pixi.inject", v.clone()))),
            )
            .chain(e.sources.iter().flatten().map(|v| ("sources", v.clone())));
    for (field, v) in paths {
        if crate::environment::clean_rel(&v).is_none() {
            errors.push(field_err(
                format!("{at}.{field}"),
                "must be a relative path inside the project (no leading / and no ..)",
            ));
        }
    }
    // skipPayloadUpload needs preDeployedEnvPath or remotePayloadPath, from the asset or its
    // cluster: checked once they are merged, when the run is planned.
}

/// Semantic checks of a `SlurmAsset` spec that the type system cannot express.
pub fn validate_asset(
    s: &SlurmAssetSpec,
    store: StoreKind,
    manifest_dir: &Path,
) -> Vec<FieldError> {
    let mut errors = size_errors(s);
    validate_asset_key(&s.asset_key, "spec.assetKey", &mut errors);
    let p = &s.payload;
    let sources = payload_sources(p);
    // Components with payloads of their own carry them all; the asset has none then.
    let side_by_side = s.components.iter().any(|c| c.payload.is_some());
    if side_by_side && !sources.is_empty() {
        errors.push(field_err(
            "spec.payload",
            "the components carry their own payloads: the asset has none of its own",
        ));
    }
    if !side_by_side && sources.len() != 1 {
        errors.push(field_err(
            "spec.payload",
            format!(
                "exactly one of path, inline, configMapRef, remotePath, command must be set (found {})",
                if sources.is_empty() { "none".to_string() } else { sources.join(", ") }
            ),
        ));
    }
    if p.command
        .as_ref()
        .is_some_and(|c| c.is_empty() || c[0].is_empty())
    {
        errors.push(field_err("spec.payload.command", "must name a program"));
    }
    if p.command.is_some() && p.interpreter.is_some() {
        errors.push(field_err(
            "spec.payload.interpreter",
            "applies to script payloads only, not to command",
        ));
    }
    if p.interpreter
        .as_ref()
        .is_some_and(|c| c.is_empty() || c[0].is_empty())
    {
        errors.push(field_err("spec.payload.interpreter", "must name a program"));
    }
    if let Some(path) = &p.path {
        match store {
            StoreKind::Kubernetes => errors.push(field_err(
                "spec.payload.path",
                "is for standalone mode; use inline or configMapRef in Kubernetes",
            )),
            StoreKind::Standalone => {
                if let Err(e) = crate::files::check_confined(
                    manifest_dir,
                    Path::new(path),
                    crate::limits::MAX_PAYLOAD_BYTES,
                ) {
                    errors.push(field_err("spec.payload.path", e.to_string()));
                }
            }
        }
    }
    if p.config_map_ref.is_some() && store == StoreKind::Standalone {
        errors.push(field_err(
            "spec.payload.configMapRef",
            "is for Kubernetes mode; use path or inline in standalone mode",
        ));
    }
    if let Some(rp) = &p.remote_path
        && !rp.starts_with('/')
        && !rp.starts_with("~/")
    {
        errors.push(field_err(
            "spec.payload.remotePath",
            "must be an absolute path (or ~/...)",
        ));
    }
    validate_launcher(&s.launcher, &mut errors);
    let mut seen = std::collections::BTreeSet::new();
    for (i, e) in s.env.iter().enumerate() {
        let at = format!("spec.env[{i}]");
        if !is_env_name(&e.name) {
            errors.push(field_err(
                format!("{at}.name"),
                format!("{:?} is not a valid variable name", e.name),
            ));
        } else if e.name.starts_with("DAGSTER_PIPES_") || e.name.starts_with("SAO_") {
            errors.push(field_err(
                format!("{at}.name"),
                format!("{} is reserved by the operator", e.name),
            ));
        }
        if !seen.insert(e.name.as_str()) {
            errors.push(field_err(
                format!("{at}.name"),
                format!("{} is set twice", e.name),
            ));
        }
        match (&e.value, &e.value_from) {
            (Some(_), None) => {}
            (None, Some(_)) if store == StoreKind::Kubernetes => {}
            (None, Some(_)) => errors.push(field_err(
                format!("{at}.valueFrom"),
                "secretKeyRef is for Kubernetes mode; use value in standalone mode",
            )),
            _ => errors.push(field_err(
                &at,
                "exactly one of value, valueFrom must be set",
            )),
        }
    }
    if s.extras.as_ref().is_some_and(|x| !x.is_object()) {
        errors.push(field_err("spec.extras", "must be a mapping"));
    }
    if s.session_ref
        .as_deref()
        .is_some_and(|n| dns_subdomain_problem(n).is_some())
    {
        errors.push(field_err("spec.sessionRef", "is not a valid object name"));
    }
    if s.session_ref.is_some() && s.launcher.type_ == LauncherType::Spark {
        errors.push(field_err(
            "spec.launcher.type",
            "a Spark asset starts its cluster in an allocation of its own: it cannot join a session",
        ));
    }
    if s.session_ref.is_some() && s.cluster_ref.is_none() {
        errors.push(field_err(
            "spec.clusterRef",
            "an asset with sessionRef names its session's cluster",
        ));
    }
    if s.cluster_ref
        .as_deref()
        .is_some_and(|c| dns_subdomain_problem(c).is_some())
    {
        errors.push(field_err("spec.clusterRef", "is not a valid object name"));
    }
    validate_resources(&s.resources, "spec.resources", &mut errors);
    validate_components(s, &mut errors);
    validate_environment(&s.environment, "spec.environment", store, &mut errors);
    errors
}

fn validate_asset_key(key: &str, at: &str, errors: &mut Vec<FieldError>) {
    if key.is_empty()
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        errors.push(field_err(
            at,
            format!(
                "{:?} is not a Dagster asset key (non-empty segments joined by '/', no whitespace)",
                crate::limits::truncate(key, 128)
            ),
        ));
    }
}

/// The sources a payload sets (exactly one is valid).
fn payload_sources(p: &crate::api::Payload) -> Vec<&'static str> {
    [
        ("path", p.path.is_some()),
        ("inline", p.inline.is_some()),
        ("configMapRef", p.config_map_ref.is_some()),
        ("remotePath", p.remote_path.is_some()),
        ("command", p.command.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect()
}

/// What a heterogeneous job may be: what Slurm cannot do with one is refused here, before
/// anything is submitted.
fn validate_components(s: &SlurmAssetSpec, errors: &mut Vec<FieldError>) {
    if s.components.is_empty() {
        return;
    }
    if s.components.len() < 2 {
        errors.push(field_err(
            "spec.components",
            "a heterogeneous job has two or more components (or none)",
        ));
    }
    if s.components.len() > 16 {
        errors.push(field_err("spec.components", "at most 16 components"));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in s.components.iter().enumerate() {
        let at = format!("spec.components[{i}]");
        if dns_label_problem(&c.name).is_some() {
            errors.push(field_err(
                format!("{at}.name"),
                "must be a DNS label (lowercase letters, digits and '-', at most 63 characters)",
            ));
        } else if !seen.insert(c.name.as_str()) {
            errors.push(field_err(
                format!("{at}.name"),
                format!("{:?} names another component too", c.name),
            ));
        }
        validate_resources(&c.resources, &format!("{at}.resources"), errors);
        if let Some(k) = &c.asset_key {
            validate_asset_key(k, &format!("{at}.assetKey"), errors);
        }
        match &c.payload {
            Some(p) => {
                let sources = payload_sources(p);
                if sources.len() != 1 || sources == ["configMapRef"] {
                    errors.push(field_err(
                        format!("{at}.payload"),
                        "exactly one of path, inline, remotePath, command must be set",
                    ));
                }
            }
            None if s.components.iter().any(|c| c.payload.is_some()) => {
                errors.push(field_err(
                    format!("{at}.payload"),
                    "every component has a payload of its own when one has (or none does)",
                ));
            }
            None => {}
        }
        if let Some(l) = &c.launcher {
            if c.payload.is_none() {
                errors.push(field_err(
                    format!("{at}.launcher"),
                    "only a component with a payload of its own has a launcher of its own (the asset's one payload takes spec.launcher)",
                ));
            }
            let mut own = vec![];
            validate_launcher(l, &mut own);
            errors.extend(own.into_iter().map(|mut e| {
                e.field = e
                    .field
                    .replacen("spec.launcher", &format!("{at}.launcher"), 1);
                e
            }));
        }
        if c.resources
            .extra_sbatch_args
            .iter()
            .any(|a| a.starts_with("--array") || a.starts_with("-a"))
        {
            errors.push(field_err(
                format!("{at}.resources.extraSbatchArgs"),
                "Slurm has no job arrays of heterogeneous jobs",
            ));
        }
    }
    if s.resources
        .extra_sbatch_args
        .iter()
        .any(|a| a.starts_with("--array") || a.starts_with("-a"))
    {
        errors.push(field_err(
            "spec.resources.extraSbatchArgs",
            "Slurm has no job arrays of heterogeneous jobs",
        ));
    }
    if s.session_ref.is_some() {
        errors.push(field_err(
            "spec.components",
            "a heterogeneous job is an allocation of its own: it cannot join a session",
        ));
    }
    let side_by_side = s.components.iter().any(|c| c.payload.is_some());
    if s.launcher.type_ == LauncherType::Spark && !side_by_side {
        errors.push(field_err(
            "spec.components",
            "the spark launcher does not span heterogeneous components in this version (ray does; or give each component its payload and launcher)",
        ));
    }
}

/// Semantic checks of a `SlurmCluster` spec.
pub fn validate_cluster(s: &SlurmClusterSpec, store: StoreKind) -> Vec<FieldError> {
    let mut errors = size_errors(s);
    if let Some(interval) = &s.poll_interval {
        let floor = match s.mode {
            ClusterMode::Local => MIN_LOCAL_POLL,
            ClusterMode::Slurm => MIN_SLURM_POLL,
        };
        if interval.duration() < floor {
            errors.push(field_err(
                "spec.pollInterval",
                format!(
                    "must be at least {}ms in {} mode (each poll costs the scheduler a query)",
                    floor.as_millis(),
                    if s.mode == ClusterMode::Local {
                        "local"
                    } else {
                        "slurm"
                    }
                ),
            ));
        }
    }
    if let Some(reason) = s.remote_base.as_deref().and_then(remote_path_problem) {
        errors.push(field_err("spec.remoteBase", reason));
    }
    if let Some(ssh) = &s.ssh {
        if ssh.port == 0 {
            errors.push(field_err("spec.ssh.port", "must be between 1 and 65535"));
        }
        for (i, j) in ssh.jump_hosts.iter().enumerate() {
            if j.port == 0 {
                errors.push(field_err(
                    format!("spec.ssh.jumpHosts[{i}].port"),
                    "must be between 1 and 65535",
                ));
            }
            if j.host.is_empty()
                || j.host.starts_with('-')
                || j.host
                    .contains(|c: char| c.is_whitespace() || c == ',' || c == '@')
            {
                errors.push(field_err(
                    format!("spec.ssh.jumpHosts[{i}].host"),
                    "must be a host name or address",
                ));
            }
            if j.user.as_deref().is_some_and(|u| {
                u.is_empty()
                    || u.starts_with('-')
                    || u.contains(|c: char| c.is_whitespace() || c == ',' || c == '@' || c == ':')
            }) {
                errors.push(field_err(
                    format!("spec.ssh.jumpHosts[{i}].user"),
                    "must be a user name",
                ));
            }
        }
        for (name, value) in &ssh.extra_options {
            if let Some(reason) = crate::transport::ssh_option_problem(name, value) {
                errors.push(field_err(
                    format!(
                        "spec.ssh.extraOptions.{}",
                        crate::limits::truncate(name, 64)
                    ),
                    reason,
                ));
            }
        }
        if let Some(t) = &ssh.connect_timeout {
            let d = t.duration();
            if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(300) {
                errors.push(field_err(
                    "spec.ssh.connectTimeout",
                    "must be between 1s and 300s",
                ));
            }
        }
        let auths: Vec<&str> = [
            ("keySecretRef", ssh.key_secret_ref.is_some()),
            ("keyPath", ssh.key_path.is_some()),
            ("passwordSecretRef", ssh.password_secret_ref.is_some()),
            ("passwordEnv", ssh.password_env.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, set)| set.then_some(n))
        .collect();
        if auths.len() != 1 {
            errors.push(field_err(
                "spec.ssh",
                format!(
                    "exactly one of keySecretRef, keyPath, passwordSecretRef, passwordEnv must be set (found {})",
                    if auths.is_empty() { "none".to_string() } else { auths.join(", ") }
                ),
            ));
        }
        if store == StoreKind::Kubernetes
            && (ssh.key_path.is_some() || ssh.password_env.is_some() || ssh.totp_env.is_some())
        {
            errors.push(field_err(
                "spec.ssh",
                "keyPath, passwordEnv and totpEnv are for standalone mode; use a Secret reference",
            ));
        }
        if store == StoreKind::Standalone {
            for (field, set) in [
                ("keySecretRef", ssh.key_secret_ref.is_some()),
                ("passwordSecretRef", ssh.password_secret_ref.is_some()),
                ("totpSecretRef", ssh.totp_secret_ref.is_some()),
            ] {
                if set {
                    errors.push(field_err(
                        format!("spec.ssh.{field}"),
                        "Secret references need Kubernetes mode; use keyPath, passwordEnv or totpEnv",
                    ));
                }
            }
        }
        if ssh.totp_secret_ref.is_some() && ssh.totp_env.is_some() {
            errors.push(field_err(
                "spec.ssh",
                "set at most one of totpSecretRef, totpEnv",
            ));
        }
        if let Some(kh) = &ssh.known_hosts {
            let given = [
                kh.path.is_some(),
                kh.secret_ref.is_some(),
                kh.entries.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                errors.push(field_err(
                    "spec.ssh.knownHosts",
                    "exactly one of path, secretRef, entries must be set",
                ));
            }
            match store {
                StoreKind::Kubernetes if kh.path.is_some() => errors.push(field_err(
                    "spec.ssh.knownHosts.path",
                    "is for standalone mode (a file on the operator's host); use secretRef or entries",
                )),
                StoreKind::Standalone if kh.secret_ref.is_some() => errors.push(field_err(
                    "spec.ssh.knownHosts.secretRef",
                    "Secret references need Kubernetes mode; use path or entries",
                )),
                _ => {}
            }
        }
        if ssh.host.is_empty()
            || ssh.host.starts_with('-')
            || ssh.host.contains(char::is_whitespace)
        {
            errors.push(field_err("spec.ssh.host", "must be a host name or address"));
        }
        if ssh.user.is_empty()
            || ssh.user.starts_with('-')
            || ssh.user.contains(char::is_whitespace)
        {
            errors.push(field_err("spec.ssh.user", "must be a user name"));
        }
    } else if s.mode == ClusterMode::Slurm && store == StoreKind::Kubernetes {
        // Standalone mode may take the connection from SLURM_EDGE_NODE_* instead.
        errors.push(field_err("spec.ssh", "is required in slurm mode"));
    }
    validate_resources(&s.queue, "spec.queue", &mut errors);
    validate_environment(&s.environment, "spec.environment", store, &mut errors);
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Result<Loaded, ManifestError> {
        let dir = std::env::temp_dir();
        parse_file(&dir.join("m.yaml"), yaml, StoreKind::Standalone)
            .pop()
            .unwrap()
    }

    fn spec_errors(yaml: &str) -> String {
        describe(&one(yaml).unwrap().spec.unwrap_err())
    }

    const HEAD: &str =
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {name: a}\n";

    #[test]
    fn valid_inline_asset() {
        let l = one(&format!("{HEAD}spec:\n  assetKey: x/y\n  payload: {{inline: 'echo hi'}}\n  resources: {{mem: 4G, timeLimit: '01:00:00'}}\n")).unwrap();
        let a = l.asset().unwrap();
        assert_eq!(a.resources.mem.as_ref().unwrap().bytes(), 4 << 30);
        assert_eq!(l.namespace, "default");
    }

    #[test]
    fn environment_settings_are_checked_field_by_field() {
        let env = |e: &str| {
            spec_errors(&format!(
                "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  environment: {e}\n"
            ))
        };
        let e = env("{packer: command}");
        assert!(
            e.contains("spec.environment.packCommand") && e.contains("needs packCommand"),
            "{e}"
        );
        let e = env("{packer: uv, packCommand: [make]}");
        assert!(e.contains("is the command packer's"), "{e}");
        let e = env("{uv: {project: ../elsewhere}, packer: uv}");
        assert!(e.contains("spec.environment.uv.project"), "{e}");
        let e = env("{packer: pixi, pixi: {inject: [/etc/passwd]}}");
        assert!(e.contains("spec.environment.pixi.inject"), "{e}");
        let e = env("{packer: uv, sourcesConfigMap: proj}");
        assert!(e.contains("is for Kubernetes mode"), "{e}");
        // In Kubernetes mode a pack command must run on the login node.
        let spec: SlurmAssetSpec = serde_saphyr::from_str(
            "assetKey: x\npayload: {inline: x}\nenvironment: {packCommand: [make]}\n",
        )
        .unwrap();
        let k = describe(&validate_asset(
            &spec,
            StoreKind::Kubernetes,
            Path::new("/"),
        ));
        assert!(k.contains("set packOn: remote"), "{k}");
        let ok: SlurmAssetSpec = serde_saphyr::from_str(
            "assetKey: x\npayload: {inline: x}\nenvironment: {packCommand: [make], packOn: remote}\n",
        )
        .unwrap();
        assert!(validate_asset(&ok, StoreKind::Kubernetes, Path::new("/")).is_empty());
    }

    #[test]
    fn launcher_settings_are_checked_field_by_field() {
        let l = |x: &str| {
            spec_errors(&format!(
                "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  launcher: {x}\n"
            ))
        };
        let e = l("{type: ray, ray: {extraStartArgs: ['--port=1', '--resources={\"a\": 1}']}}");
        assert!(
            e.contains("spec.launcher.ray.extraStartArgs[0]: --port is set by the launcher")
                && !e.contains("[1]"),
            "{e}"
        );
        assert!(l("{ray: {dashboard: true}}").contains("spec.launcher.ray: needs type: ray"));
        assert!(l("{spark: {}}").contains("spec.launcher.spark: needs type: spark"));
        let e = l(
            "{type: spark, spark: {masterUrl: 'http://x', masterHost: 'a;b', executorCores: 0, executorMemory: 1M, sparkHome: ''}}",
        );
        for f in [
            "spec.launcher.spark.masterUrl: must be spark://",
            "spec.launcher.spark.masterHost",
            "spec.launcher.spark.executorCores: must be at least 1",
            "spec.launcher.spark.executorMemory: must be at least 512M",
            "spec.launcher.spark.sparkHome",
        ] {
            assert!(e.contains(f), "{f}: {e}");
        }
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  clusterRef: hpc\n  sessionRef: s\n  payload: {{inline: x}}\n  launcher: {{type: spark}}\n"
        ));
        assert!(e.contains("cannot join a session"), "{e}");
        let ok = one(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  launcher: {{type: spark, spark: {{masterUrl: 'spark://m1:7077,m2:7077', numExecutors: 4, driverMemory: 2G}}}}\n"
        ))
        .unwrap();
        assert!(ok.asset().is_some());
        let e = l("{type: ray, ray: {headAddress: 'a b;c'}}");
        assert!(e.contains("spec.launcher.ray.headAddress"), "{e}");
        let ok = one(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  launcher: {{type: ray, ray: {{headAddress: 10.1.2.3, startTimeout: 5m, objectStoreMemory: 2G}}}}\n"
        ))
        .unwrap();
        assert!(ok.asset().is_some());
    }

    #[test]
    fn what_slurm_cannot_do_with_a_heterogeneous_job_is_refused() {
        let c = |x: &str| {
            spec_errors(&format!(
                "{HEAD}spec:\n  assetKey: x\n  clusterRef: hpc\n  payload: {{inline: x}}\n{x}"
            ))
        };
        assert!(c("  components: [{name: a}]\n").contains("two or more components"));
        let e = c("  components: [{name: a}, {name: a}, {name: B_1}]\n");
        assert!(
            e.contains("spec.components[1].name: \"a\" names another component too"),
            "{e}"
        );
        assert!(
            e.contains("spec.components[2].name: must be a DNS label"),
            "{e}"
        );
        let e = c("  sessionRef: s\n  components: [{name: a}, {name: b}]\n");
        assert!(e.contains("cannot join a session"), "{e}");
        let e = c(
            "  resources: {extraSbatchArgs: ['--array=1-3']}\n  components: [{name: a}, {name: b, resources: {extraSbatchArgs: ['--array=2']}}]\n",
        );
        assert!(
            e.contains(
                "spec.resources.extraSbatchArgs: Slurm has no job arrays of heterogeneous jobs"
            ),
            "{e}"
        );
        assert!(
            e.contains("spec.components[1].resources.extraSbatchArgs"),
            "{e}"
        );
        let e = c("  launcher: {type: spark}\n  components: [{name: a}, {name: b}]\n");
        assert!(e.contains("does not span heterogeneous components"), "{e}");
        // A component's own launcher: only with its own payload, checked as the asset's.
        let e = c(
            "  components: [{name: a, launcher: {type: spark}}, {name: b, launcher: {type: ray, spark: {executorCores: 0}}}]\n",
        );
        assert!(
            e.contains("spec.components[0].launcher: only a component with a payload of its own"),
            "{e}"
        );
        assert!(
            e.contains("spec.components[1].launcher.spark: needs type: spark"),
            "{e}"
        );
        assert!(
            e.contains("spec.components[1].launcher.spark.executorCores: must be at least 1"),
            "{e}"
        );
        let ok = one(&format!(
            "{HEAD}spec:\n  assetKey: x\n  clusterRef: hpc\n  launcher: {{type: spark}}\n  components: [{{name: a, payload: {{inline: echo a}}}}, {{name: b, payload: {{inline: echo b}}, launcher: {{type: ray}}}}]\n"
        ))
        .unwrap();
        assert_eq!(
            ok.asset().map(|a| a.components.len()),
            Some(2),
            "{:?}",
            ok.spec.as_ref().err().map(|e| describe(e))
        );
        let ok = one(&format!(
            "{HEAD}spec:\n  assetKey: x\n  clusterRef: hpc\n  payload: {{inline: x}}\n  components: [{{name: a}}, {{name: b, resources: {{cpusPerTask: 2}}}}]\n"
        ))
        .unwrap();
        assert_eq!(ok.asset().unwrap().components.len(), 2);
    }

    #[test]
    fn session_settings_are_checked_field_by_field() {
        let s = |x: &str| {
            let y = format!(
                "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmSession\nmetadata: {{name: s}}\nspec:\n{x}"
            );
            one(&y)
                .unwrap()
                .spec
                .err()
                .map(|e| describe(&e))
                .unwrap_or_default()
        };
        assert_eq!(
            s("  clusterRef: hpc\n  maxConcurrentSteps: 2\n  idleTimeout: 30s\n"),
            ""
        );
        assert!(
            s("  clusterRef: hpc\n  maxConcurrentSteps: 0\n")
                .contains("spec.maxConcurrentSteps: must be at least 1")
        );
        assert!(s("  clusterRef: Not_A_Name\n").contains("spec.clusterRef"));
        assert!(
            s("  clusterRef: hpc\n  ray: {extraStartArgs: ['--head']}\n")
                .contains("spec.ray.extraStartArgs[0]: --head is set by the launcher")
        );
        assert!(s("  clusterRef: hpc\n  resources: {mem: lots}\n").contains("spec.resources.mem"));
        let a = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  sessionRef: s\n  payload: {{inline: x}}\n"
        ));
        assert!(
            a.contains("spec.clusterRef: an asset with sessionRef names its session's cluster"),
            "{a}"
        );
    }

    #[test]
    fn bad_memory_names_field() {
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  resources: {{mem: lots}}\n"
        ));
        assert!(
            e.starts_with("spec.resources.mem: invalid memory quantity \"lots\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_path() {
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x, shell: zsh}}\n"
        ));
        assert!(
            e.contains("spec.payload") && e.contains("unknown field `shell`"),
            "{e}"
        );
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  colour: blue\n"
        ));
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn two_payload_sources() {
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x, command: [ls]}}\n"
        ));
        assert_eq!(
            e,
            "spec.payload: exactly one of path, inline, configMapRef, remotePath, command must be set (found inline, command)"
        );
    }

    #[test]
    fn env_and_sbatch_checks() {
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: x}}\n  env: [{{name: 'A;B', value: v}}, {{name: OK}}]\n  resources: {{extraSbatchArgs: ['--output=/tmp/x', '-N 2', '--exclusive']}}\n"
        ));
        assert!(
            e.contains("spec.env[0].name: \"A;B\" is not a valid variable name"),
            "{e}"
        );
        assert!(
            e.contains("spec.env[1]: exactly one of value, valueFrom"),
            "{e}"
        );
        assert!(e.contains("spec.resources.extraSbatchArgs[0]"), "{e}");
        assert!(e.contains("spec.resources.extraSbatchArgs[1]"), "{e}");
        assert!(!e.contains("extraSbatchArgs[2]"), "{e}");
    }

    #[test]
    fn document_level_errors() {
        let e = one(
            "apiVersion: dagster-slurm.io/v1alpha1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("(document 1): kind: not a kind this operator serves"),
            "{e}"
        );
        assert!(
            !e.to_string().contains("Pod"),
            "values of a non-manifest are never echoed"
        );
        let e = one(&HEAD.replace("name: a", "name: ../etc")).unwrap_err();
        assert!(e.reason.starts_with("metadata.name:"), "{e}");
        let errs = parse_file(Path::new("x.yaml"), "a: [unclosed\n", StoreKind::Standalone);
        let e = errs[0].as_ref().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.yaml: YAML does not parse (line "),
            "{e}"
        );
        assert!(!e.to_string().contains("unclosed"), "{e}");
        // A file that is not a manifest: nothing of it is echoed, even its keys.
        let e = one("root: hunter2\nsecret_token: abcdef\n").unwrap_err();
        assert!(
            !e.to_string().contains("hunter2") && !e.to_string().contains("secret_token"),
            "{e}"
        );
    }

    #[test]
    fn nul_bytes_rejected() {
        let e = spec_errors(&format!(
            "{HEAD}spec:\n  assetKey: x\n  payload: {{inline: \"a\\0b\"}}\n"
        ));
        assert_eq!(e, "spec.payload.inline: contains a NUL byte");
    }

    #[test]
    fn cluster_auth_exactly_one() {
        let y = "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {name: c}\nspec:\n  mode: slurm\n  ssh: {host: h, user: u, keyPath: /k, passwordEnv: P}\n";
        let e = describe(&one(y).unwrap().spec.unwrap_err());
        assert!(
            e.contains("spec.ssh: exactly one of") && e.contains("found keyPath, passwordEnv"),
            "{e}"
        );
        let kh = |known: &str, store| {
            let y = format!(
                "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {{name: c}}\nspec:\n  mode: slurm\n  ssh: {{host: h, user: u, keyPath: /k, knownHosts: {known}}}\n"
            );
            let l = parse_file(Path::new("/m/c.yaml"), &y, store)
                .pop()
                .unwrap()
                .unwrap();
            l.spec.err().map(|e| describe(&e)).unwrap_or_default()
        };
        let e = kh("{path: /kh, entries: [x]}", StoreKind::Standalone);
        assert!(
            e.contains("spec.ssh.knownHosts: exactly one of path, secretRef, entries"),
            "{e}"
        );
        let e = kh("{secretRef: {name: s, key: k}}", StoreKind::Standalone);
        assert!(
            e.contains("spec.ssh.knownHosts.secretRef: Secret references need Kubernetes"),
            "{e}"
        );
        assert_eq!(kh("{path: /kh}", StoreKind::Standalone), "");
    }

    #[test]
    fn standalone_refuses_ssh_secret_references_at_admission() {
        let cluster = |ssh: &str| {
            let y = format!(
                "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmCluster\nmetadata: {{name: c}}\nspec:\n  mode: slurm\n  ssh: {{host: h, user: u, {ssh}}}\n"
            );
            let l = parse_file(Path::new("/m/c.yaml"), &y, StoreKind::Standalone)
                .pop()
                .unwrap()
                .unwrap();
            l.spec.err().map(|e| describe(&e)).unwrap_or_default()
        };
        let r = "{name: s, key: k}";
        for (field, ssh) in [
            ("keySecretRef", format!("keySecretRef: {r}")),
            ("passwordSecretRef", format!("passwordSecretRef: {r}")),
            ("totpSecretRef", format!("keyPath: /k, totpSecretRef: {r}")),
        ] {
            let e = cluster(&ssh);
            assert!(
                e.contains(&format!(
                    "spec.ssh.{field}: Secret references need Kubernetes mode"
                )),
                "{field}: {e}"
            );
        }
        assert_eq!(cluster("keyPath: /k, totpEnv: T"), "");
    }

    #[test]
    fn spec_hash_tracks_content() {
        let a = one(&format!(
            "{HEAD}spec: {{assetKey: x, payload: {{inline: a}}}}\n"
        ))
        .unwrap();
        let b = one(&format!(
            "{HEAD}spec:\n  payload: {{inline: a}}\n  assetKey: x\n"
        ))
        .unwrap();
        let c = one(&format!(
            "{HEAD}spec: {{assetKey: x, payload: {{inline: b}}}}\n"
        ))
        .unwrap();
        assert_eq!(a.spec_hash, b.spec_hash);
        assert_ne!(a.spec_hash, c.spec_hash);
    }
}
