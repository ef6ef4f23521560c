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
    /// Outermost first.
    pub jump_hosts: Vec<JumpTarget>,
    pub extra_options: Vec<(String, String)>,
    pub connect_timeout: Duration,
    /// Base32 TOTP seed: one-time codes answer the server's code prompt (keyboard-interactive).
    pub totp_seed: Option<String>,
}

impl SshTarget {
    /// The target of a cluster's `ssh` settings once its address and credentials are
    /// resolved (each mode reads those from its own sources): jump hosts (the user's name by
    /// default), options and the connect timeout (10 s by default) are the same in both.
    pub fn from_settings(
        ssh: &crate::api::SshSettings,
        (host, port, user): (String, u16, String),
        auth: SshAuth,
        known_hosts: Option<PathBuf>,
        totp_seed: Option<String>,
    ) -> SshTarget {
        SshTarget {
            jump_hosts: ssh
                .jump_hosts
                .iter()
                .map(|j| JumpTarget {
                    host: j.host.clone(),
                    port: j.port,
                    user: j.user.clone().unwrap_or_else(|| user.clone()),
                })
                .collect(),
            host,
            port,
            user,
            auth,
            known_hosts,
            extra_options: ssh.extra_options.clone().into_iter().collect(),
            connect_timeout: ssh
                .connect_timeout
                .as_ref()
                .map(|t| t.duration())
                .unwrap_or(Duration::from_secs(10)),
            totp_seed,
        }
    }
}

/// One jump host, logged in to with the cluster's own key or password and checked against its
/// own known hosts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JumpTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
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
        let otp = if self.totp_seed.is_some() {
            " + one-time code"
        } else {
            ""
        };
        write!(f, "{}@{}:{} ({auth}{otp})", self.user, self.host, self.port)
    }
}

/// `ssh -o` options a manifest may set: transport tuning only. Everything else is refused:
/// options that run commands (`ProxyCommand`, `LocalCommand`, `KnownHostsCommand`, ...), read
/// or write files (`IdentityFile`, `UserKnownHostsFile`, `ControlPath`, `Include`, ...), send
/// the operator's environment (`SendEnv`, `SetEnv`), forward anything, or weaken host-key
/// checking (`StrictHostKeyChecking`, `CheckHostIP`, `VerifyHostKeyDNS`, ...).
pub const ALLOWED_SSH_OPTIONS: &[&str] = &[
    "AddressFamily",
    "CASignatureAlgorithms",
    "Ciphers",
    "Compression",
    "ConnectionAttempts",
    "FingerprintHash",
    "HostKeyAlgorithms",
    "IPQoS",
    "KexAlgorithms",
    "MACs",
    "PubkeyAcceptedAlgorithms",
    "PubkeyAcceptedKeyTypes",
    "RekeyLimit",
    "RequiredRSASize",
    "TCPKeepAlive",
];

/// Why an `extraOptions` entry is refused, if it is (names are case-insensitive, as in ssh).
pub fn ssh_option_problem(name: &str, value: &str) -> Option<String> {
    let Some(canonical) = ALLOWED_SSH_OPTIONS
        .iter()
        .find(|o| o.eq_ignore_ascii_case(name))
    else {
        return Some(format!(
            "{:?} is not an allowed SSH option (allowed: {})",
            crate::limits::truncate(name, 64),
            ALLOWED_SSH_OPTIONS.join(", ")
        ));
    };
    if value.is_empty()
        || value.len() > 256
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b",-_.@+ ".contains(&b))
    {
        return Some(format!(
            "{canonical}: the value must be 1-256 letters, digits, spaces and ,-_.@+"
        ));
    }
    None
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
/// The environment variable through which `askpass` gets the TOTP seed.
pub const ASKPASS_TOTP_ENV: &str = "SAO_ASKPASS_TOTP";

/// The current one-time code (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps — what
/// Google Authenticator, FreeOTP and `pam_google_authenticator` use) of a base32 seed.
/// Spaces, dashes, padding and lower case, as seeds are often written, are accepted.
pub fn totp_code(seed: &str, unix_time: u64) -> std::result::Result<String, String> {
    let clean: String = seed
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '=' | '\n' | '\r' | '\t'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let secret = totp_rs::Secret::try_from_base32(&clean)
        .map_err(|_| "not a base32 TOTP seed".to_string())?;
    if secret.as_bytes().is_empty() {
        return Err("the TOTP seed is empty".into());
    }
    // Noncompliant only in accepting seeds under 128 bits, which many sites still issue.
    let totp = totp_rs::Builder::new()
        .with_secret(secret)
        .with_skew(0)
        .build_noncompliant();
    Ok(totp.generate(unix_time).to_string())
}

/// Whether an ssh prompt asks for a one-time code rather than the password.
fn asks_for_code(prompt: &str) -> bool {
    let p = prompt.to_lowercase();
    [
        "verification",
        "code",
        "otp",
        "token",
        "one-time",
        "one time",
        "2fa",
        "factor",
        "authenticator",
    ]
    .iter()
    .any(|w| p.contains(w))
}

/// What the operator binary, run by ssh as `SSH_ASKPASS`, answers to `prompt`: a one-time
/// code to a code prompt, else the password; `None` when it has nothing to give.
pub fn askpass_answer(
    prompt: &str,
    password: Option<&str>,
    totp_seed: Option<&str>,
    unix_time: u64,
) -> Option<String> {
    match (totp_seed, asks_for_code(prompt)) {
        (Some(seed), true) => totp_code(seed, unix_time).ok(),
        _ => password.map(str::to_string),
    }
}

/// The `ssh` options of a login to the cluster or to one of its jump hosts: strict host-key
/// checking against the cluster's known hosts, its key or password, its connect timeout and
/// its `extraOptions`. Jump hosts get the same, as OpenSSH's `-J` would not give them.
fn login_options(target: &SshTarget) -> Result<Vec<String>> {
    let mut o: Vec<String> = [
        "StrictHostKeyChecking=yes",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=3",
    ]
    .iter()
    .flat_map(|v| ["-o".to_string(), v.to_string()])
    .collect();
    let mut opt = |v: String| {
        o.push("-o".into());
        o.push(v);
    };
    opt(format!(
        "ConnectTimeout={}",
        target.connect_timeout.as_secs().max(1)
    ));
    if let Some(kh) = &target.known_hosts {
        opt(path_option("UserKnownHostsFile", kh)?);
    }
    for (k, v) in &target.extra_options {
        // Validated with the manifest; checked again here, where it matters.
        if let Some(why) = ssh_option_problem(k, v) {
            return Err(Error::Transport(format!("spec.ssh.extraOptions: {why}")));
        }
        opt(format!("{k}={v}"));
    }
    let key = match &target.auth {
        SshAuth::KeyFile(key) if target.totp_seed.is_some() => {
            // Key, then a one-time code: keyboard-interactive must stay possible.
            opt("IdentitiesOnly=yes".into());
            opt("PreferredAuthentications=publickey,keyboard-interactive".into());
            opt("PasswordAuthentication=no".into());
            Some(key)
        }
        SshAuth::KeyFile(key) => {
            opt("BatchMode=yes".into());
            opt("IdentitiesOnly=yes".into());
            opt("PreferredAuthentications=publickey".into());
            Some(key)
        }
        SshAuth::Password(_) => {
            opt("PreferredAuthentications=password,keyboard-interactive".into());
            opt("PubkeyAuthentication=no".into());
            opt("NumberOfPasswordPrompts=1".into());
            None
        }
    };
    if let Some(key) = key {
        // Not `-i`: ssh drops an `-i` file it cannot stat before expanding its `%` tokens.
        o.push("-o".into());
        o.push(path_option("IdentityFile", key)?);
    }
    Ok(o)
}

/// `Name="path"`: a path option as ssh parses it, double-quoted (blanks would split it) with its
/// `%` doubled (ssh expands `%` tokens in these paths: `%h` in a directory name must stay `%h`).
fn path_option(name: &str, path: &Path) -> Result<String> {
    let path = literal_path(path)?;
    if path.contains(['"', '\\']) || path.chars().any(char::is_control) {
        return Err(Error::Transport(format!(
            "{path:?}: ssh cannot take a path with a double quote, backslash or control character"
        )));
    }
    Ok(format!("{name}=\"{path}\""))
}

/// A path with each `%` doubled, where ssh would expand `%` tokens.
fn literal_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::Transport(format!("{}: ssh needs a UTF-8 path", p.display())))?;
    Ok(s.replace('%', "%%"))
}

/// The environment variable that hands the jump proxy (below) the hops still to go.
pub const JUMP_CHAIN_ENV: &str = "SAO_JUMP_CHAIN";

/// The jump hosts still to go through, outermost first, and the login options for each.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JumpChain {
    pub options: Vec<String>,
    pub hops: Vec<JumpTarget>,
    /// Where the hops' ssh write their errors: a master with `ControlPersist` sends its
    /// `ProxyCommand`'s stderr to /dev/null, which would hide why a jump host refused.
    #[serde(default)]
    pub log: Option<PathBuf>,
}

/// The `ProxyCommand` through which ssh reaches a host behind jump hosts: this binary's
/// `jump-proxy %h %p`, which runs `ssh -W` to the last hop of [`JUMP_CHAIN_ENV`] with argv
/// built here, not shell text (OpenSSH's `-J` would give the hops none of the cluster's
/// options). ssh expands `%` tokens in the command and runs it with the shell, so the path
/// is [`quote`](crate::shell::quote)d and its `%` doubled.
fn proxy_command(exe: &Path) -> Result<String> {
    let exe = literal_path(exe)?;
    Ok(format!("{} jump-proxy %h %p", crate::shell::quote(&exe)))
}

/// What the jump proxy runs to reach `host:port`: `ssh -W host:port` to the chain's last hop,
/// with the chain's options, and the chain left for that ssh's own jump proxy (`None` when
/// the hop is the outermost).
pub fn jump_proxy_argv(
    chain: &JumpChain,
    host: &str,
    port: &str,
    exe: &Path,
) -> Result<(Vec<String>, Option<JumpChain>)> {
    let Some((hop, rest)) = chain.hops.split_last() else {
        return Err(Error::Transport("jump-proxy: no jump host left".into()));
    };
    if host.is_empty() || host.starts_with('-') || port.parse::<u16>().is_err() {
        return Err(Error::Transport("jump-proxy: not a host and port".into()));
    }
    let mut argv = chain.options.clone();
    argv.extend([
        "-p".into(),
        hop.port.to_string(),
        "-l".into(),
        hop.user.clone(),
    ]);
    let rest = (!rest.is_empty()).then(|| JumpChain {
        options: chain.options.clone(),
        hops: rest.to_vec(),
        log: chain.log.clone(),
    });
    if rest.is_some() {
        argv.push("-o".into());
        argv.push(format!("ProxyCommand={}", proxy_command(exe)?));
    }
    // An IPv6 address as %h comes bare; -W wants it in brackets.
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    argv.extend(["-W".into(), target, "--".into(), hop.host.clone()]);
    Ok((argv, rest))
}

/// The jump proxy, run by ssh as the `ProxyCommand` of a login behind jump hosts: runs the
/// `ssh -W` of [`jump_proxy_argv`] with this process's stdin and stdout as the tunnel, and
/// exits with its code. It waits rather than `exec`s so that the tunnel closes only after
/// that ssh has written why it failed (say, an unknown jump host key): the login's ssh, which
/// ends on the close, must find the reason in its log.
pub fn run_jump_proxy(chain: &str, host: &str, port: &str) -> std::result::Result<i32, Error> {
    let chain: JumpChain = serde_json::from_str(chain)
        .map_err(|_| Error::Transport(format!("jump-proxy: {JUMP_CHAIN_ENV} is not a chain")))?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Transport(format!("jump-proxy: own path: {e}")))?;
    let (argv, rest) = jump_proxy_argv(&chain, host, port, &exe)?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(argv);
    if let Some(log) = &chain.log {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(log)
        {
            cmd.stderr(f);
        }
    }
    match rest.map(|r| serde_json::to_string(&r)) {
        Some(Ok(rest)) => cmd.env(JUMP_CHAIN_ENV, rest),
        _ => cmd.env_remove(JUMP_CHAIN_ENV),
    };
    let status = cmd
        .status()
        .map_err(|e| Error::Transport(format!("jump-proxy: running ssh: {e}")))?;
    Ok(status.code().unwrap_or(255))
}

impl Connection {
    /// Starts a master connection (`ssh -M -N -f`), waiting until it is authenticated.
    pub async fn open(target: &SshTarget, operator_exe: &Path) -> Result<Connection> {
        // The operator's PID in the name: whose masters these are, at a glance.
        let dir = tempfile::Builder::new()
            .prefix(&format!("sao-ssh-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| Error::Transport(format!("creating the control directory: {e}")))?;
        let ctl = dir.path().join("master");
        let log = dir.path().join("master.log");
        let jump_log = dir.path().join("jump.log");
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
            .args(login_options(target)?)
            .args(["-p", &target.port.to_string()])
            .args(["-l", &target.user]);
        if !target.jump_hosts.is_empty() {
            let chain = JumpChain {
                options: login_options(target)?,
                hops: target.jump_hosts.clone(),
                log: Some(jump_log.clone()),
            };
            let chain = serde_json::to_string(&chain)
                .map_err(|e| Error::Transport(format!("the jump chain: {e}")))?;
            cmd.arg("-o")
                .arg(format!("ProxyCommand={}", proxy_command(operator_exe)?))
                .env(JUMP_CHAIN_ENV, chain);
        }
        // Secrets reach ssh only through the askpass answer, from this one process's environment.
        let password = match &target.auth {
            SshAuth::Password(pw) => Some(pw),
            SshAuth::KeyFile(_) => None,
        };
        if password.is_some() || target.totp_seed.is_some() {
            cmd.env("SSH_ASKPASS", operator_exe)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0");
        }
        if let Some(pw) = password {
            cmd.env(ASKPASS_ENV, pw);
        }
        if let Some(seed) = &target.totp_seed {
            cmd.env(ASKPASS_TOTP_ENV, seed);
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
            // What ssh said, its log, then its jump hops' (the last says why a hop refused).
            let said: Vec<String> = [
                String::from_utf8_lossy(&out.stderr).into_owned(),
                std::fs::read_to_string(&log).unwrap_or_default(),
                std::fs::read_to_string(&jump_log).unwrap_or_default(),
            ]
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
            return Err(Error::Transport(format!(
                "connecting to {target:?}: {}",
                said.join("\n")
            )));
        }
        let session = Session::resume(ctl.clone().into_boxed_path(), Some(log.into_boxed_path()));
        tracing::info!("connected to {target:?}");
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

    /// Starts `bash -c SCRIPT` on the remote host with piped stdin and stdout, for a command
    /// that lives as long as its caller keeps it (no timeout): the exit-file watcher.
    /// `script` is the operator's own text, never a manifest value (those travel on stdin).
    pub async fn spawn_long(&self, script: &str) -> Result<openssh::Child<&Session>> {
        self.session
            .raw_command("bash")
            .raw_arg("-c")
            .raw_arg(crate::shell::quote(script))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .await
            .map_err(|e| Error::Transport(format!("remote command: {e}")))
    }

    /// Stops the master, also while a command still holds the connection (that command
    /// then fails): at a shutdown nothing may keep it up for its ControlPersist time.
    pub async fn close(&self) {
        tracing::info!("closing the connection {}", self.ctl.display());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totp_matches_rfc_6238_test_vectors() {
        // RFC 6238 appendix B, SHA-1 seed "12345678901234567890" (base32 below), 6 digits.
        let seed = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        for (t, code) in [
            (59, "287082"),
            (1111111109, "081804"),
            (1111111111, "050471"),
            (1234567890, "005924"),
            (2000000000, "279037"),
        ] {
            assert_eq!(totp_code(seed, t).unwrap(), code, "t={t}");
        }
        // As seeds are often written: lower case, grouped, padded.
        assert_eq!(
            totp_code("gezd gnbv gy3t qojq gezd gnbv gy3t qojq====", 59).unwrap(),
            "287082"
        );
        assert!(totp_code("not base32!", 59).is_err());
        assert!(totp_code("", 59).is_err());
    }

    #[test]
    fn askpass_gives_the_code_to_code_prompts_and_the_password_otherwise() {
        let seed = Some("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let pw = Some("pw");
        for prompt in [
            "(me@login) Verification code: ",
            "Enter PASSCODE:",
            "OTP: ",
            "One-time password (OATH) for `me':",
            "Duo two-factor login",
        ] {
            assert_eq!(
                askpass_answer(prompt, pw, seed, 59).as_deref(),
                Some("287082"),
                "{prompt}"
            );
        }
        assert_eq!(
            askpass_answer("(me@login) Password: ", pw, seed, 59).as_deref(),
            Some("pw")
        );
        assert_eq!(
            askpass_answer("Verification code: ", pw, None, 59).as_deref(),
            Some("pw")
        );
        assert_eq!(askpass_answer("Password: ", None, seed, 59), None);
    }

    #[test]
    fn the_jump_proxy_reaches_the_next_hop_with_the_clusters_options_and_hands_on_the_rest() {
        let hop = |h: &str| JumpTarget {
            host: h.into(),
            port: 2200,
            user: "me".into(),
        };
        let chain = JumpChain {
            options: vec!["-i".into(), "/k/id".into()],
            hops: vec![hop("outer"), hop("inner")],
            log: Some("/ctl/jump.log".into()),
        };
        let exe = Path::new("/opt/sao 1%/bin/op");
        let (argv, rest) = jump_proxy_argv(&chain, "login", "22", exe).unwrap();
        assert_eq!(
            argv,
            [
                "-i",
                "/k/id",
                "-p",
                "2200",
                "-l",
                "me",
                "-o",
                "ProxyCommand='/opt/sao 1%%/bin/op' jump-proxy %h %p",
                "-W",
                "login:22",
                "--",
                "inner"
            ]
        );
        let rest = rest.unwrap();
        assert_eq!(rest.hops, [hop("outer")]);
        assert_eq!(rest.log, chain.log, "every hop writes to the same log");
        // The outermost hop is reached directly; an IPv6 address goes in brackets.
        let (argv, rest) = jump_proxy_argv(&rest, "fd00::5", "2200", exe).unwrap();
        assert!(rest.is_none());
        assert!(
            !argv.iter().any(|a| a.starts_with("ProxyCommand")),
            "{argv:?}"
        );
        assert_eq!(argv[argv.len() - 3..], ["[fd00::5]:2200", "--", "outer"]);
        // What ssh hands over is checked, not trusted.
        assert!(jump_proxy_argv(&chain, "-oProxyCommand=x", "22", exe).is_err());
        assert!(jump_proxy_argv(&chain, "login", "22; x", exe).is_err());
        let empty = JumpChain {
            options: vec![],
            hops: vec![],
            log: None,
        };
        assert!(jump_proxy_argv(&empty, "login", "22", exe).is_err());
    }
}
