//! Cluster resolution in standalone mode: SSH settings from manifests, files and the Python
//! tool's environment variables.

use super::store::ObjectKey;
use crate::api::SlurmClusterSpec;
use crate::transport::{SshAuth, SshTarget};
use std::path::{Path, PathBuf};

/// Resolves a Slurm cluster's SSH settings (standalone mode: files and environment variables;
/// the Python tool's `SLURM_EDGE_NODE_*` names fill what the manifest leaves out).
pub fn ssh_target(
    spec: &SlurmClusterSpec,
    dir: &Path,
    key: &ObjectKey,
) -> std::result::Result<SshTarget, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let ssh = spec.ssh.clone().unwrap_or_default();
    let host = Some(ssh.host.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_HOST"))
        .ok_or_else(|| format!("{key}: spec.ssh.host: missing (or set SLURM_EDGE_NODE_HOST)"))?;
    let user = Some(ssh.user.clone())
        .filter(|u| !u.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_USER"))
        .ok_or_else(|| format!("{key}: spec.ssh.user: missing (or set SLURM_EDGE_NODE_USER)"))?;
    let port = if spec.ssh.is_some() {
        ssh.port
    } else {
        env("SLURM_EDGE_NODE_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(22)
    };
    if ssh.totp_secret_ref.is_some() {
        return Err(format!(
            "{key}: spec.ssh.totpSecretRef: Secret references need Kubernetes mode (use totpEnv)"
        ));
    }
    let auth = if let Some(k) = &ssh.key_path {
        SshAuth::KeyFile(local_file(dir, k, key, "spec.ssh.keyPath")?)
    } else if let Some(var) = &ssh.password_env {
        SshAuth::Password(env(var).ok_or_else(|| {
            format!("{key}: spec.ssh.passwordEnv: environment variable {var} is not set")
        })?)
    } else if ssh.key_secret_ref.is_some() || ssh.password_secret_ref.is_some() {
        return Err(format!(
            "{key}: spec.ssh: Secret references need Kubernetes mode"
        ));
    } else if let Some(k) = env("SLURM_EDGE_NODE_KEY_PATH") {
        SshAuth::KeyFile(local_file(dir, &k, key, "SLURM_EDGE_NODE_KEY_PATH")?)
    } else if let Some(p) = env("SLURM_EDGE_NODE_PASSWORD") {
        SshAuth::Password(p)
    } else {
        return Err(format!(
            "{key}: spec.ssh: no key or password (set keyPath or passwordEnv)"
        ));
    };
    let totp_seed = match &ssh.totp_env {
        Some(var) => {
            let seed = env(var).ok_or_else(|| {
                format!("{key}: spec.ssh.totpEnv: environment variable {var} is not set")
            })?;
            crate::transport::totp_code(&seed, 0)
                .map_err(|e| format!("{key}: spec.ssh.totpEnv: {var}: {e}"))?;
            Some(seed)
        }
        None => None,
    };
    let known_hosts = match ssh.known_hosts.as_ref() {
        Some(kh) if kh.path.is_some() => Some(local_file(
            dir,
            kh.path.as_deref().unwrap_or_default(),
            key,
            "spec.ssh.knownHosts.path",
        )?),
        Some(kh) if kh.entries.is_some() => {
            let lines = kh.entries.clone().unwrap_or_default().join("\n") + "\n";
            let path = std::env::temp_dir().join(format!(
                "sao-known-hosts-{}-{}",
                std::process::id(),
                crate::manifest::hash_value(&serde_json::json!(lines))
            ));
            crate::files::write_private_once(&path, lines.as_bytes())
                .map_err(|e| format!("{key}: writing known hosts: {e}"))?;
            Some(path)
        }
        _ => match env("SLURM_EDGE_NODE_KNOWN_HOSTS") {
            Some(p) => Some(local_file(dir, &p, key, "SLURM_EDGE_NODE_KNOWN_HOSTS")?),
            None => None,
        },
    };
    Ok(SshTarget::from_settings(
        &ssh,
        (host, port, user),
        auth,
        known_hosts,
        totp_seed,
    ))
}

/// A key or known-hosts file named in a manifest or the environment (`~` and `$HOME`
/// expanded, relative to the manifest's directory): it must be a readable file now, since
/// ssh would only fail to connect, again and again, without saying why.
fn local_file(
    dir: &Path,
    p: &str,
    key: &ObjectKey,
    field: &str,
) -> std::result::Result<PathBuf, String> {
    let path = crate::files::expand_home(dir, p);
    match std::fs::File::open(&path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(format!("{key}: {field}: {}: not a file", path.display())),
        Err(e) => Err(format!("{key}: {field}: {}: {e}", path.display())),
    }
}

/// The platform name in conda/pixi's spelling.
pub fn platform() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "linux-64".into(),
        "aarch64" => "linux-aarch64".into(),
        other => format!("linux-{other}"),
    }
}
