//! Cluster resolution in standalone mode: where SSH settings' files and variables are found
//! (the resolution itself is [`crate::credentials`], shared with Kubernetes mode).

use super::store::ObjectKey;
use crate::api::{SecretKeyRef, SlurmClusterSpec};
use crate::credentials::CredentialSource;
use crate::manifest::StoreKind;
use crate::transport::SshTarget;
use futures::FutureExt;
use std::path::{Path, PathBuf};

/// Resolves a Slurm cluster's SSH settings in standalone mode (errors begin with the
/// cluster's key).
pub fn ssh_target(
    spec: &SlurmClusterSpec,
    dir: &Path,
    key: &ObjectKey,
) -> std::result::Result<SshTarget, String> {
    crate::credentials::ssh_target(spec, &LocalCredentials { dir })
        .now_or_never()
        .expect("standalone credentials never wait")
        .map_err(|e| format!("{key}: {e}"))
}

/// Standalone mode's credentials: files (relative to the manifest's directory, `~` and
/// `$HOME` expanded) and the operator's environment variables; no Secrets.
struct LocalCredentials<'a> {
    dir: &'a Path,
}

impl CredentialSource for LocalCredentials<'_> {
    async fn secret(&self, field: &str, _: &SecretKeyRef) -> Result<String, String> {
        Err(format!(
            "{field}: Secret references need Kubernetes mode (use keyPath, passwordEnv or totpEnv)"
        ))
    }

    fn env(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn local_file(&self, field: &str, p: &str) -> Result<PathBuf, String> {
        let path = crate::files::expand_home(self.dir, p);
        match std::fs::File::open(&path).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => Ok(path),
            Ok(_) => Err(format!("{field}: {}: not a file", path.display())),
            Err(e) => Err(format!("{field}: {}: {e}", path.display())),
        }
    }

    /// A file of the process's own in the temp dir, named by its content.
    fn private_file(&self, what: &str, content: &str) -> Result<PathBuf, String> {
        let path = std::env::temp_dir().join(format!(
            "sao-{}-{}-{}",
            what.replace('_', "-"),
            std::process::id(),
            crate::manifest::hash_value(&serde_json::json!(content))
        ));
        crate::files::write_private_once(&path, content.as_bytes())
            .map_err(|e| format!("writing {what}: {e}"))?;
        Ok(path)
    }

    fn mode(&self) -> StoreKind {
        StoreKind::Standalone
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
