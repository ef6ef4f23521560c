//! SSH transport: one multiplexed OpenSSH master connection per cluster, shared by every asset.
//!
//! The master is started by `ssh -M` (so that key, password and jump-host logins all end up
//! multiplexed: a password reaches ssh only through `SSH_ASKPASS`, answered by this binary's
//! `askpass` command from an environment variable of that one process, never from a file),
//! then driven through the `openssh` crate. Every remote command is a script streamed to
//! `bash -s` on stdin, with a timeout.

use crate::{Error, Result};
use openssh::{Session, Stdio};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where and how to log in, fully resolved (secrets included; never logged or serialised).
#[derive(Clone, PartialEq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub auth: SshAuth,
    /// known_hosts file for strict checking; `None`: the user's default files, still strict.
    pub known_hosts: Option<PathBuf>,
    pub jump_hosts: Vec<String>,
    pub extra_options: Vec<(String, String)>,
    pub connect_timeout: Duration,
}

#[derive(Clone, PartialEq)]
pub enum SshAuth {
    KeyFile(PathBuf),
    Password(String),
}

impl std::fmt::Debug for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.auth {
            SshAuth::KeyFile(p) => format!("key {}", p.display()),
            SshAuth::Password(_) => "password".into(),
        };
        write!(f, "{}@{}:{} ({auth})", self.user, self.host, self.port)
    }
}

/// Output of one remote script.
#[derive(Debug)]
pub struct RemoteOutput {
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// One live master connection.
pub struct Connection {
    session: Session,
    ctl: PathBuf,
    /// Holds the control socket and master log; removed on drop.
    _dir: tempfile::TempDir,
}

/// The environment variable through which `askpass` hands the password to ssh.
pub const ASKPASS_ENV: &str = "SAO_ASKPASS_SECRET";

impl Connection {
    /// Starts a master connection (`ssh -M -N -f`), waiting until it is authenticated.
    pub async fn open(target: &SshTarget, operator_exe: &Path) -> Result<Connection> {
        let dir = tempfile::Builder::new()
            .prefix("sao-ssh-")
            .tempdir()
            .map_err(|e| Error::Transport(format!("creating the control directory: {e}")))?;
        let ctl = dir.path().join("master");
        let log = dir.path().join("master.log");
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.arg("-M")
            .arg("-N")
            .arg("-f")
            .arg("-S")
            .arg(&ctl)
            .arg("-E")
            .arg(&log)
            .args(["-o", "ControlPersist=300"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args([
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
            ])
            .args([
                "-o",
                &format!("ConnectTimeout={}", target.connect_timeout.as_secs().max(1)),
            ])
            .args(["-p", &target.port.to_string()])
            .args(["-l", &target.user]);
        if let Some(kh) = &target.known_hosts {
            cmd.arg("-o")
                .arg(format!("UserKnownHostsFile={}", kh.display()));
        }
        if !target.jump_hosts.is_empty() {
            cmd.arg("-J").arg(target.jump_hosts.join(","));
        }
        for (k, v) in &target.extra_options {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        match &target.auth {
            SshAuth::KeyFile(key) => {
                cmd.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
                    .arg("-i")
                    .arg(key)
                    .args(["-o", "PreferredAuthentications=publickey"]);
            }
            SshAuth::Password(pw) => {
                cmd.args([
                    "-o",
                    "PreferredAuthentications=password,keyboard-interactive",
                    "-o",
                    "PubkeyAuthentication=no",
                    "-o",
                    "NumberOfPasswordPrompts=1",
                ])
                .env("SSH_ASKPASS", operator_exe)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0")
                .env(ASKPASS_ENV, pw);
            }
        }
        cmd.arg("--")
            .arg(&target.host)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let limit = target.connect_timeout + Duration::from_secs(5);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| Error::Transport(format!("connecting to {target:?}: timed out")))?
            .map_err(|e| Error::Transport(format!("starting ssh: {e}")))?;
        if !out.status.success() {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(Error::Transport(format!(
                "connecting to {target:?}: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                log_text.trim()
            )));
        }
        let session = Session::resume(ctl.clone().into_boxed_path(), Some(log.into_boxed_path()));
        Ok(Connection {
            session,
            ctl,
            _dir: dir,
        })
    }

    /// Whether the master still answers.
    pub async fn is_alive(&self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.session.check()).await,
            Ok(Ok(()))
        )
    }

    /// Runs `script` with `bash -s` on the remote host, with a timeout.
    pub async fn run(&self, script: &str, timeout: Duration) -> Result<RemoteOutput> {
        let fut = async {
            let mut child = self
                .session
                .raw_command("bash")
                .raw_arg("-s")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .await
                .map_err(|e| Error::Transport(format!("remote command: {e}")))?;
            if let Some(mut stdin) = child.stdin().take() {
                stdin
                    .write_all(script.as_bytes())
                    .await
                    .map_err(|e| Error::Transport(format!("sending the script: {e}")))?;
                stdin
                    .shutdown()
                    .await
                    .map_err(|e| Error::Transport(format!("sending the script: {e}")))?;
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| Error::Transport(format!("remote command: {e}")))?;
            Ok(RemoteOutput {
                status: out.status.code(),
                stdout: out.stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            Error::Transport(format!(
                "remote command timed out after {}s",
                timeout.as_secs()
            ))
        })?
    }

    /// Stops the master.
    pub async fn close(self) {
        let _ = tokio::process::Command::new("ssh")
            .arg("-S")
            .arg(&self.ctl)
            .args(["-O", "exit", "none"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
    }
}
