//! Resolution of a spec's references in Kubernetes mode: its SlurmCluster and the Secrets
//! and ConfigMaps it reads, into a backend (one Slurm executor per cluster) and a plan input.

use super::{Context, POLL_LOCAL, POLL_SLURM};
use crate::api::{ClusterMode, SecretKeyRef, SlurmAssetSpec, SlurmCluster, SlurmClusterSpec};
use crate::backend::Backend;
use crate::credentials::CredentialSource;
use crate::executor::slurm::SlurmExecutor;
use crate::jobscript::PlanContext;
use crate::manifest::{StoreKind, describe, validate_cluster};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A spec with every reference resolved.
pub(super) struct Resolved {
    pub spec: SlurmAssetSpec,
    pub cluster: SlurmClusterSpec,
    /// The referenced SlurmCluster's name and generation (none for the implicit local one).
    pub cluster_ref: Option<(String, Option<i64>)>,
    pub backend: Backend,
    pub poll: Duration,
    /// The environment the asset packs (its sources are read when it is prepared).
    pub env: Option<crate::environment::EnvRequest>,
}

/// Resolves a spec's references (an asset's, or a session's allocation's), or says which
/// field is wrong and why. The spec is valid (checked by the caller, for its kind).
pub(super) async fn resolve(
    spec: &SlurmAssetSpec,
    ns: &str,
    ctx: &Context,
) -> Result<Resolved, String> {
    let mut spec = spec.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(r) = spec.payload.config_map_ref.take() {
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let cm = cms
            .get_opt(&r.name)
            .await
            .map_err(|e| format!("spec.payload.configMapRef: {e}"))?
            .ok_or_else(|| {
                format!(
                    "spec.payload.configMapRef: ConfigMap {:?} not found",
                    r.name
                )
            })?;
        let text = cm
            .data
            .and_then(|d| d.get(&r.key).cloned())
            .ok_or_else(|| {
                format!(
                    "spec.payload.configMapRef: ConfigMap {:?} has no key {:?}",
                    r.name, r.key
                )
            })?;
        // The key is the script's file name: the same interpreter rule as `payload.path`.
        if spec.payload.interpreter.is_none() && r.key.ends_with(".py") {
            spec.payload.interpreter = Some(vec!["python3".into()]);
        }
        spec.payload.inline = Some(text);
    }
    for (i, e) in spec.env.iter_mut().enumerate() {
        if let Some(from) = e.value_from.take() {
            let r = from.secret_key_ref;
            e.value = Some(
                secret_value(
                    &secrets,
                    &r.name,
                    &r.key,
                    &format!("spec.env[{i}].valueFrom.secretKeyRef"),
                )
                .await?,
            );
        }
    }
    let mut cluster_ref = None;
    let cluster = match &spec.cluster_ref {
        None => SlurmClusterSpec::default(),
        Some(name) => {
            let api: Api<SlurmCluster> = Api::namespaced(ctx.client.clone(), ns);
            let c = api
                .get_opt(name)
                .await
                .map_err(|e| format!("spec.clusterRef: {e}"))?
                .ok_or_else(|| {
                    format!("spec.clusterRef: SlurmCluster {name:?} not found in namespace {ns:?}")
                })?;
            let errors = validate_cluster(&c.spec, StoreKind::Kubernetes);
            if !errors.is_empty() {
                return Err(format!(
                    "spec.clusterRef: SlurmCluster {name:?} is invalid: {}",
                    describe(&errors)
                ));
            }
            cluster_ref = Some((name.clone(), c.metadata.generation));
            c.spec
        }
    };
    let (backend, poll) = match cluster.mode {
        ClusterMode::Local if !ctx.allow_local => {
            return Err(format!(
                "spec.clusterRef: {} runs payloads on the operator's own host, which is disabled in Kubernetes mode (an administrator can start the operator with --allow-local-execution); name a SlurmCluster in slurm mode",
                match &spec.cluster_ref {
                    Some(name) => format!("SlurmCluster {name:?} is in local mode and"),
                    None => "no clusterRef means the implicit local cluster, which".to_string(),
                }
            ));
        }
        ClusterMode::Local => (Backend::Local(ctx.local.clone()), POLL_LOCAL),
        ClusterMode::Slurm => {
            let key = format!("{ns}/{}", spec.cluster_ref.clone().unwrap_or_default());
            let credentials = SecretCredentials {
                secrets: &secrets,
                work: &ctx.work_dir,
                cluster: &key,
            };
            let target = crate::credentials::ssh_target(&cluster, &credentials).await?;
            let mut map = ctx.slurm.lock().await;
            let ex = match map.get(&key) {
                Some(ex) if *ex.target() == target => ex.clone(),
                _ => {
                    let ex = Arc::new(SlurmExecutor::new(
                        target,
                        ctx.exe.clone(),
                        ctx.counters.clone(),
                    ));
                    ex.watch_exits(ctx.exits.clone());
                    map.insert(key, ex.clone());
                    ex
                }
            };
            (Backend::Slurm(ex), POLL_SLURM)
        }
    };
    let poll = cluster
        .poll_interval
        .as_ref()
        .map(|i| i.duration())
        .unwrap_or(poll);
    let env = env_request(ctx, &spec, &cluster);
    Ok(Resolved {
        spec,
        cluster,
        cluster_ref,
        backend,
        poll,
        env,
    })
}

/// The sources of an environment in Kubernetes mode: the keys of
/// `spec.environment.sourcesConfigMap` (the operator's pod has no checkout). Read only when
/// the environment is prepared; a ConfigMap not there yet is waited for (its watch wakes
/// the asset).
pub(super) async fn env_sources(
    ctx: &Context,
    ns: &str,
    name: Option<&str>,
) -> Result<crate::environment::Sources, crate::environment::EnvError> {
    use crate::environment::EnvError;
    let mut files = std::collections::BTreeMap::new();
    if let Some(name) = name {
        let field = "spec.environment.sourcesConfigMap";
        let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let cm = cms
            .get_opt(name)
            .await
            .map_err(|e| EnvError::transient(format!("{field}: {e}")))?
            .ok_or_else(|| EnvError::transient(format!("{field}: ConfigMap {name:?} not found")))?;
        for (k, v) in cm.data.unwrap_or_default() {
            files.insert(k, v.into_bytes());
        }
        for (k, v) in cm.binary_data.unwrap_or_default() {
            files.insert(k, v.0);
        }
    }
    Ok(crate::environment::Sources::Map(files))
}

/// The environment an asset packs, if it packs one (its sources still to be read).
fn env_request(
    ctx: &Context,
    spec: &SlurmAssetSpec,
    cluster: &SlurmClusterSpec,
) -> Option<crate::environment::EnvRequest> {
    use crate::environment::{EnvRequest, Sources};
    let merged = spec.environment.merged_over(&cluster.environment);
    merged.packer()?;
    let remote_base = match cluster.mode {
        ClusterMode::Slurm => cluster.remote_base.clone(),
        ClusterMode::Local => {
            let local_base = ctx.work_dir.join("runs");
            Some(crate::jobscript::base_dir(&PlanContext {
                asset_dir: &local_base,
                cluster,
                cluster_dir: &local_base,
                default_base: local_base.clone(),
                remote_home: None,
            }))
        }
    };
    EnvRequest::from_settings(
        &merged,
        Sources::Map(Default::default()),
        remote_base,
        cluster.env_cache.as_ref(),
        true,
    )
}

async fn secret_value(
    api: &Api<Secret>,
    name: &str,
    key: &str,
    field: &str,
) -> Result<String, String> {
    let s = api
        .get_opt(name)
        .await
        .map_err(|e| format!("{field}: {e}"))?
        .ok_or_else(|| format!("{field}: Secret {name:?} not found"))?;
    let bytes = s
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| format!("{field}: Secret {name:?} has no key {key:?}"))?;
    String::from_utf8(bytes.0)
        .map_err(|_| format!("{field}: Secret {name:?} key {key:?} is not UTF-8"))
}

/// Kubernetes mode's credentials: Secrets in the cluster's namespace, copied to private
/// files (0600) in the operator's work directory; no local files or variables.
struct SecretCredentials<'a> {
    secrets: &'a Api<Secret>,
    work: &'a std::path::Path,
    /// The cluster's `namespace/name`, which names its private files.
    cluster: &'a str,
}

impl CredentialSource for SecretCredentials<'_> {
    async fn secret(&self, field: &str, r: &SecretKeyRef) -> Result<String, String> {
        secret_value(self.secrets, &r.name, &r.key, field).await
    }

    fn env(&self, _: &str) -> Option<String> {
        None
    }

    fn local_file(&self, field: &str, _: &str) -> Result<PathBuf, String> {
        Err(format!(
            "{field}: is for standalone mode (a file on the operator's host); use a Secret reference"
        ))
    }

    fn private_file(&self, what: &str, content: &str) -> Result<PathBuf, String> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.work.join("ssh");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join(format!(
            "{}-{what}",
            crate::manifest::hash_value(&serde_json::json!(self.cluster))
        ));
        // Concurrent reconciles of one cluster's assets must not rewrite it under ssh's feet.
        crate::files::write_private_once(&file, content.as_bytes())
            .map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(file)
    }

    fn mode(&self) -> StoreKind {
        StoreKind::Kubernetes
    }
}
