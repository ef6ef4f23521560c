//! A SlurmCluster's SSH settings resolved into an [`SshTarget`], one way for both modes. The
//! modes differ only in where the settings' references lead ([`CredentialSource`]): Secrets
//! in Kubernetes mode; files and the operator's environment in standalone mode, where the
//! Python tool's `SLURM_EDGE_NODE_*` names fill what a manifest leaves out.

use crate::api::{SecretKeyRef, SlurmClusterSpec};
use crate::manifest::StoreKind;
use crate::transport::{SshAuth, SshTarget};
use std::future::Future;
use std::path::PathBuf;

/// Where a mode finds what SSH settings refer to. Errors name the spec field and never a
/// value.
pub trait CredentialSource {
    /// A Secret key's value (Kubernetes mode; standalone mode refuses).
    fn secret(
        &self,
        field: &str,
        r: &SecretKeyRef,
    ) -> impl Future<Output = Result<String, String>> + Send;

    /// One of the operator's environment variables (standalone mode; none in Kubernetes).
    fn env(&self, var: &str) -> Option<String>;

    /// A key or known-hosts file named by the settings, which must be a readable file now:
    /// ssh would only fail to connect, again and again, without saying why.
    fn local_file(&self, field: &str, path: &str) -> Result<PathBuf, String>;

    /// Key or known-hosts material (`what`) copied to a private (0600) file, for ssh to read.
    fn private_file(&self, what: &str, content: &str) -> Result<PathBuf, String>;

    /// The mode whose references these are (for the hints of error messages).
    fn mode(&self) -> StoreKind;
}

/// Resolves the cluster's SSH settings: host, user and port; the one way to log in (a key, or
/// a password); one-time codes (the seed is checked here, so a bad one fails at once rather
/// than at every login); known hosts.
pub async fn ssh_target(
    spec: &SlurmClusterSpec,
    src: &impl CredentialSource,
) -> Result<SshTarget, String> {
    let standalone = src.mode() == StoreKind::Standalone;
    let env = |var: &str| src.env(var).filter(|v| !v.is_empty());
    let missing = |field: &str, var: &str| match standalone {
        true => format!("{field}: missing (or set {var})"),
        false => format!("{field}: missing"),
    };
    let ssh = spec.ssh.clone().unwrap_or_default();
    let host = Some(ssh.host.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_HOST"))
        .ok_or_else(|| missing("spec.ssh.host", "SLURM_EDGE_NODE_HOST"))?;
    let user = Some(ssh.user.clone())
        .filter(|u| !u.is_empty())
        .or_else(|| env("SLURM_EDGE_NODE_USER"))
        .ok_or_else(|| missing("spec.ssh.user", "SLURM_EDGE_NODE_USER"))?;
    let port = match spec.ssh {
        Some(_) => ssh.port,
        None => env("SLURM_EDGE_NODE_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(22),
    };
    let variable = |field: &str, var: &str| {
        env(var).ok_or_else(|| format!("{field}: environment variable {var} is not set"))
    };
    // ssh refuses a key whose last line has no newline.
    let lines = |mut text: String| {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text
    };
    let auth = if let Some(r) = &ssh.key_secret_ref {
        let key = src.secret("spec.ssh.keySecretRef", r).await?;
        SshAuth::KeyFile(src.private_file("key", &lines(key))?)
    } else if let Some(p) = &ssh.key_path {
        SshAuth::KeyFile(src.local_file("spec.ssh.keyPath", p)?)
    } else if let Some(r) = &ssh.password_secret_ref {
        SshAuth::Password(src.secret("spec.ssh.passwordSecretRef", r).await?)
    } else if let Some(var) = &ssh.password_env {
        SshAuth::Password(variable("spec.ssh.passwordEnv", var)?)
    } else if let Some(p) = env("SLURM_EDGE_NODE_KEY_PATH") {
        SshAuth::KeyFile(src.local_file("SLURM_EDGE_NODE_KEY_PATH", &p)?)
    } else if let Some(p) = env("SLURM_EDGE_NODE_PASSWORD") {
        SshAuth::Password(p)
    } else {
        return Err(format!(
            "spec.ssh: no key or password (set {})",
            match standalone {
                true => "keyPath or passwordEnv",
                false => "keySecretRef or passwordSecretRef",
            }
        ));
    };
    let totp_seed = match (&ssh.totp_secret_ref, &ssh.totp_env) {
        (Some(r), _) => {
            let field = "spec.ssh.totpSecretRef";
            let seed = src.secret(field, r).await?;
            Some((
                format!("{field}: Secret {:?} key {:?}", r.name, r.key),
                seed,
            ))
        }
        (None, Some(var)) => {
            let field = "spec.ssh.totpEnv";
            Some((format!("{field}: {var}"), variable(field, var)?))
        }
        (None, None) => None,
    };
    if let Some((source, seed)) = &totp_seed {
        crate::transport::totp_code(seed, 0).map_err(|e| format!("{source}: {e}"))?;
    }
    let known_hosts = match &ssh.known_hosts {
        Some(kh) if kh.secret_ref.is_some() => {
            let r = kh.secret_ref.as_ref().expect("checked");
            let text = src.secret("spec.ssh.knownHosts.secretRef", r).await?;
            Some(src.private_file("known_hosts", &lines(text))?)
        }
        Some(kh) if kh.entries.is_some() => Some(src.private_file(
            "known_hosts",
            &lines(kh.entries.clone().unwrap_or_default().join("\n")),
        )?),
        Some(kh) if kh.path.is_some() => Some(src.local_file(
            "spec.ssh.knownHosts.path",
            kh.path.as_deref().unwrap_or_default(),
        )?),
        _ => match env("SLURM_EDGE_NODE_KNOWN_HOSTS") {
            Some(p) => Some(src.local_file("SLURM_EDGE_NODE_KNOWN_HOSTS", &p)?),
            None => None,
        },
    };
    Ok(SshTarget::from_settings(
        &ssh,
        (host, port, user),
        auth,
        known_hosts,
        totp_seed.map(|(_, seed)| seed),
    ))
}

#[cfg(test)]
mod tests {
    //! The resolution fed by a source of the test's own: the real sources (files and
    //! variables, Secrets) are exercised end to end by the standalone and Kubernetes tests.
    use super::*;
    use futures::FutureExt;
    use std::collections::HashMap;
    use std::sync::Mutex;

    struct Source {
        mode: StoreKind,
        secrets: HashMap<&'static str, &'static str>,
        env: HashMap<&'static str, &'static str>,
        written: Mutex<Vec<(String, String)>>,
    }

    fn source(mode: StoreKind) -> Source {
        Source {
            mode,
            secrets: HashMap::new(),
            env: HashMap::new(),
            written: Mutex::new(vec![]),
        }
    }

    impl CredentialSource for Source {
        async fn secret(&self, field: &str, r: &SecretKeyRef) -> Result<String, String> {
            self.secrets
                .get(r.name.as_str())
                .map(|v| v.to_string())
                .ok_or_else(|| format!("{field}: Secret {:?} not found", r.name))
        }
        fn env(&self, var: &str) -> Option<String> {
            self.env.get(var).map(|v| v.to_string())
        }
        fn local_file(&self, _: &str, path: &str) -> Result<PathBuf, String> {
            Ok(PathBuf::from("/local").join(path))
        }
        fn private_file(&self, what: &str, content: &str) -> Result<PathBuf, String> {
            self.written
                .lock()
                .unwrap()
                .push((what.into(), content.into()));
            Ok(PathBuf::from("/private").join(what))
        }
        fn mode(&self) -> StoreKind {
            self.mode
        }
    }

    fn resolve(yaml: &str, src: &Source) -> Result<SshTarget, String> {
        let spec: SlurmClusterSpec = serde_saphyr::from_str(yaml).unwrap();
        ssh_target(&spec, src).now_or_never().unwrap()
    }

    fn secret_ref(name: &str) -> String {
        format!("{{name: {name}, key: k}}")
    }

    #[test]
    fn secrets_become_private_files_ending_in_a_newline() {
        let mut src = source(StoreKind::Kubernetes);
        src.secrets.insert("key", "-----KEY-----");
        src.secrets.insert("hosts", "h ssh-ed25519 AAAA\n");
        let t = resolve(
            &format!(
                "mode: slurm\nssh: {{host: h, port: 2222, user: u, keySecretRef: {}, knownHosts: {{secretRef: {}}}}}",
                secret_ref("key"),
                secret_ref("hosts")
            ),
            &src,
        )
        .unwrap();
        assert_eq!((t.host.as_str(), t.port, t.user.as_str()), ("h", 2222, "u"));
        assert!(
            matches!(&t.auth, SshAuth::KeyFile(p) if p == std::path::Path::new("/private/key"))
        );
        assert_eq!(t.known_hosts, Some("/private/known_hosts".into()));
        assert_eq!(
            *src.written.lock().unwrap(),
            vec![
                ("key".to_string(), "-----KEY-----\n".to_string()),
                (
                    "known_hosts".to_string(),
                    "h ssh-ed25519 AAAA\n".to_string()
                ),
            ]
        );
    }

    #[test]
    fn the_python_tools_variables_fill_a_cluster_without_ssh_settings() {
        let mut src = source(StoreKind::Standalone);
        for (k, v) in [
            ("SLURM_EDGE_NODE_HOST", "edge"),
            ("SLURM_EDGE_NODE_PORT", "2200"),
            ("SLURM_EDGE_NODE_USER", "alice"),
            ("SLURM_EDGE_NODE_KEY_PATH", "id"),
            ("SLURM_EDGE_NODE_KNOWN_HOSTS", "kh"),
        ] {
            src.env.insert(k, v);
        }
        let t = resolve("mode: slurm", &src).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str()),
            ("edge", 2200, "alice")
        );
        assert!(matches!(&t.auth, SshAuth::KeyFile(p) if p == std::path::Path::new("/local/id")));
        assert_eq!(t.known_hosts, Some("/local/kh".into()));
        // The manifest's own settings win over the variables.
        let t = resolve(
            "mode: slurm\nssh: {host: h, user: u, passwordEnv: PW, knownHosts: {entries: [a, b]}}",
            &{
                let mut s = source(StoreKind::Standalone);
                s.env.insert("SLURM_EDGE_NODE_HOST", "edge");
                s.env.insert("PW", "hunter2");
                s
            },
        )
        .unwrap();
        assert_eq!((t.host.as_str(), t.port), ("h", 22));
        assert!(matches!(&t.auth, SshAuth::Password(p) if p == "hunter2"));
        assert_eq!(t.known_hosts, Some("/private/known_hosts".into()));
    }

    #[test]
    fn errors_name_the_field_and_the_modes_own_remedy_never_a_value() {
        let src = source(StoreKind::Standalone);
        let e = resolve("mode: slurm", &src).unwrap_err();
        assert_eq!(e, "spec.ssh.host: missing (or set SLURM_EDGE_NODE_HOST)");
        let e = resolve("mode: slurm\nssh: {host: h, user: u}", &src).unwrap_err();
        assert_eq!(
            e,
            "spec.ssh: no key or password (set keyPath or passwordEnv)"
        );
        let e = resolve(
            "mode: slurm\nssh: {host: h, user: u, passwordEnv: PW}",
            &src,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "spec.ssh.passwordEnv: environment variable PW is not set"
        );

        let k8s = source(StoreKind::Kubernetes);
        let e = resolve("mode: slurm\nssh: {host: h, user: u}", &k8s).unwrap_err();
        assert_eq!(
            e,
            "spec.ssh: no key or password (set keySecretRef or passwordSecretRef)"
        );
        let e = resolve("mode: slurm", &k8s).unwrap_err();
        assert_eq!(e, "spec.ssh.host: missing");

        // A one-time-code seed that is not base32 fails at once, without its value.
        let mut k8s = source(StoreKind::Kubernetes);
        k8s.secrets.insert("pw", "hunter2");
        k8s.secrets.insert("seed", "not base32 !!");
        let e = resolve(
            &format!(
                "mode: slurm\nssh: {{host: h, user: u, passwordSecretRef: {}, totpSecretRef: {}}}",
                secret_ref("pw"),
                secret_ref("seed")
            ),
            &k8s,
        )
        .unwrap_err();
        assert!(
            e.starts_with("spec.ssh.totpSecretRef: Secret \"seed\" key \"k\": "),
            "{e}"
        );
        assert!(!e.contains("base32 !!") && !e.contains("hunter2"), "{e}");
    }
}
