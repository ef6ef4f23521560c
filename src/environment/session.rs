//! One conversation with the cluster (or the local host) that makes an environment exist.
//!
//! The operator starts [`script`] (`bash -c`) and reads its `@@SAO ENV` lines:
//! - `HIT`: the environment is published; nothing to send.
//! - `SEND`: the script holds the key's lock and waits for `SIZE <bytes> <format>` and the
//!   bytes on stdin: the archive (packed only now, so a hit never packs) or, for a login-node
//!   pack, the sources. It answers `RECEIVED`, then `PUBLISHED`, or `ERROR`/`INVALID`/
//!   `PACKFAIL` with a reason.
//!
//! Everything lands in `{cache}/.store/{key}-{pid}`, a directory that is never moved (a
//! conda environment knows its own prefix); `{cache}/{key}` is a symlink to it, made by one
//! atomic rename once the environment has been verified. An upload cut short leaves a store
//! directory that no link points to: never used, removed by the next garbage collection.

use super::pack::{self, Archive};
use super::{EnvError, EnvHost, EnvRequest, PythonInfo, RUN_ENV_FILE, SourceFile};
use crate::jobscript::EXIT_FILE;
use crate::shell::quote;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// How long a session may last, waiting for another operator's upload included.
const SESSION_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// An environment used this recently is never collected (a run may be about to submit).
const GC_GRACE_SECS: u64 = 120;
/// Leftovers of cut uploads are removed after this long.
const STALE_SECS: u64 = 6 * 3600;
/// Archives larger than this log their upload's progress.
const PROGRESS_BYTES: u64 = 4 << 20;

pub struct SessionPlan {
    pub cache_dir: String,
    /// The run-dir root's parent (`{base}/runs` holds the run dirs, for garbage collection).
    pub base: String,
    pub key: String,
    pub force: bool,
    pub keep: u32,
    pub max_age: Duration,
    /// Login-node pack commands, or `None` for an archive packed here.
    pub remote_pack: Option<String>,
}

/// What a session did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub hit: bool,
    pub bytes_uploaded: u64,
    pub pack_seconds: f64,
    pub upload_seconds: f64,
}

/// The session's script. Every value is quoted; the sources and archive travel on stdin.
pub fn script(plan: &SessionPlan) -> String {
    let mut s = format!(
        "set -u\numask 077\ncache={}\nbase={}\nkey={}\nforce={}\nkeep={}\nmaxage={}\n",
        quote(&plan.cache_dir),
        quote(&plan.base),
        quote(&plan.key),
        u8::from(plan.force),
        plan.keep,
        plan.max_age.as_secs(),
    );
    s.push_str(
        "say() { printf '@@SAO ENV %s\\n' \"$*\"; }\n\
         mkdir -p \"$cache/.store\" || { say ERROR cannot create the environment cache; exit 0; }\n\
         exec 9>>\"$cache/.lock-$key\"\n\
         if command -v flock >/dev/null 2>&1; then flock -w 10800 9 || { say BUSY; exit 0; }; fi\n\
         if [ \"$force\" = 0 ] && [ -f \"$cache/$key/.sao-ready\" ]; then touch \"$cache/$key/.sao-used\"; say HIT; exit 0; fi\n\
         store=\"$cache/.store/$key-$$\"\n\
         rm -rf -- \"$store\"; mkdir -p \"$store/env\" || { say ERROR cannot create the environment directory; exit 0; }\n\
         published=0\n\
         trap '[ $published = 1 ] || rm -rf -- \"$store\"' EXIT\n\
         say SEND\n\
         IFS=' ' read -r word size fmt || { say ERROR no archive came; exit 0; }\n\
         case $size in ''|*[!0-9]*) say ERROR bad header; exit 0 ;; esac\n\
         head -c \"$size\" > \"$store/incoming\"\n\
         got=$(stat -c %s \"$store/incoming\" 2>/dev/null || echo 0)\n\
         if [ \"$word\" != SIZE ] || [ \"$got\" != \"$size\" ]; then say ERROR the upload was cut short at $got of $size bytes; exit 0; fi\n\
         say RECEIVED\n",
    );
    match &plan.remote_pack {
        None => s.push_str("archive=\"$store/incoming\"\n"),
        Some(commands) => {
            s.push_str(
                "mkdir -p \"$store/src\" && tar -xf \"$store/incoming\" -C \"$store/src\" || { say ERROR the sources did not unpack; exit 0; }\n\
                 rm -f \"$store/incoming\"\n\
                 archive=''; fmt=''\n\
                 ( cd \"$store/src\" || exit 1\n",
            );
            s.push_str(commands);
            s.push_str(
                "printf '%s\\n%s\\n' \"$archive\" \"$fmt\" > \"$store/.packed\"\n\
                 ) > \"$store/pack.log\" 2>&1 || { say PACKFAIL \"$(grep -v '^[[:space:]]*$' \"$store/pack.log\" | tail -n1 | head -c 400)\"; exit 0; }\n\
                 { read -r archive; read -r fmt; } < \"$store/.packed\"\n\
                 if [ \"$fmt\" != dir ] && [ ! -f \"$archive\" ]; then say PACKFAIL the packer left no archive; exit 0; fi\n",
            );
        }
    }
    s.push_str(
        "case $fmt in\n\
         tar) tar -xf \"$archive\" -C \"$store/env\" > \"$store/unpack.log\" 2>&1 || { say INVALID the archive did not unpack with tar; exit 0; } ;;\n\
         sh) ( cd \"$store/env\" && bash \"$archive\" ) > \"$store/unpack.log\" 2>&1 || { say INVALID the self-extracting archive failed; exit 0; } ;;\n\
         dir) ;;\n\
         *) say ERROR unknown archive format; exit 0 ;;\n\
         esac\n\
         rm -f \"$store/incoming\"\n\
         ( cd \"$store/env\" || exit 1\n\
         if [ -f activate.sh ]; then . ./activate.sh; elif [ -f bin/activate ]; then . bin/activate; else echo 'no activate.sh or bin/activate in the environment'; exit 3; fi\n\
         if command -v python3 >/dev/null 2>&1; then py=python3; else py=python; fi\n\
         \"$py\" -c 'import dagster_pipes' ) > \"$store/verify.log\" 2>&1 || { say INVALID \"$(grep -v '^[[:space:]]*$' \"$store/verify.log\" | tail -n1 | head -c 400)\"; exit 0; }\n\
         touch \"$store/env/.sao-ready\" \"$store/env/.sao-used\"\n\
         ln -sfn \".store/$key-$$/env\" \"$cache/.link-$key-$$\" && mv -Tf \"$cache/.link-$key-$$\" \"$cache/$key\" || { say ERROR cannot publish the environment; exit 0; }\n\
         published=1\n\
         say PUBLISHED\n",
    );
    s.push_str(&gc_script());
    s
}

/// Garbage collection, after a publication: keeps the `keep` most recently used
/// environments and drops those unused for `maxage`, but never one that a run dir without an
/// exit file names (a queued or running job), nor one used in the last minutes. Leftovers of
/// cut uploads and replaced environments go once they are stale.
fn gc_script() -> String {
    format!(
        "exec 8>>\"$cache/.gc.lock\"\n\
         if ! command -v flock >/dev/null 2>&1 || flock -n 8; then\n\
         now=$(date +%s)\n\
         inuse=\" $key \"\n\
         for f in \"$base\"/runs/*/*/*/{RUN_ENV_FILE}; do\n\
         [ -f \"$f\" ] || continue\n\
         [ -f \"${{f%/{RUN_ENV_FILE}}}/{EXIT_FILE}\" ] && continue\n\
         read -r k < \"$f\" && inuse=\"$inuse$k \"\n\
         done\n\
         i=0; removed=''\n\
         for k in $(for l in \"$cache\"/*; do [ -L \"$l\" ] || continue; n=${{l##*/}}; u=$(stat -c %Y \"$l/.sao-used\" 2>/dev/null || echo 0); echo \"$u $n\"; done | sort -rn | cut -d' ' -f2); do\n\
         i=$((i + 1))\n\
         u=$(stat -c %Y \"$cache/$k/.sao-used\" 2>/dev/null || echo 0)\n\
         age=$((now - u))\n\
         case \"$inuse\" in *\" $k \"*) continue ;; esac\n\
         [ $age -lt {GC_GRACE_SECS} ] && continue\n\
         if [ $i -gt \"$keep\" ] || [ $age -gt \"$maxage\" ]; then\n\
         t=$(readlink \"$cache/$k\"); rm -f \"$cache/$k\"; t=${{t%/env}}\n\
         case $t in .store/*) rm -rf -- \"$cache/$t\" ;; esac\n\
         rm -f \"$cache/.lock-$k\"\n\
         removed=\"$removed $k\"\n\
         fi\n\
         done\n\
         linked=' '\n\
         for l in \"$cache\"/*; do [ -L \"$l\" ] && linked=\"$linked$(readlink \"$l\") \"; done\n\
         for d in \"$cache\"/.store/*; do\n\
         [ -d \"$d\" ] || continue\n\
         case \"$linked\" in *\" .store/${{d##*/}}/env \"*) continue ;; esac\n\
         m=$(stat -c %Y \"$d\" 2>/dev/null || echo \"$now\")\n\
         [ $((now - m)) -gt {STALE_SECS} ] && rm -rf -- \"$d\"\n\
         done\n\
         [ -n \"$removed\" ] && say GC removed$removed\n\
         fi\n\
         exit 0\n"
    )
}

/// Runs a short script on the host and returns its stdout.
pub async fn run_capture(host: &EnvHost, script: &str) -> Result<String, EnvError> {
    match host {
        EnvHost::Slurm(ex) => {
            let out = ex
                .run_script(script)
                .await
                .map_err(|e| EnvError::transient(e.to_string()))?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        EnvHost::Local => {
            let out = tokio::process::Command::new("bash")
                .args(["-c", script])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(|e| EnvError::transient(format!("bash: {e}")))?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }
}

/// Holds the session on the host.
pub async fn run(
    host: &EnvHost,
    plan: &SessionPlan,
    req: &EnvRequest,
    files: &[SourceFile],
    platform: &str,
    py: Option<&PythonInfo>,
) -> Result<Outcome, EnvError> {
    let text = script(plan);
    let packer = || async {
        if plan.remote_pack.is_some() {
            let started = Instant::now();
            pack::source_bundle(req, files)
                .await
                .map(|a| (a, started.elapsed().as_secs_f64()))
        } else {
            pack::pack_local(req, files, platform, py).await
        }
    };
    let fut = async {
        match host {
            EnvHost::Slurm(ex) => {
                let conn = ex
                    .connection()
                    .await
                    .map_err(|e| EnvError::transient(e.to_string()))?;
                let mut child = conn
                    .spawn_long(&text)
                    .await
                    .map_err(|e| EnvError::transient(e.to_string()))?;
                let stdin = child.stdin().take();
                let stdout = child.stdout().take();
                let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
                    return Err(EnvError::transient(
                        "the remote command has no stdin or stdout",
                    ));
                };
                let outcome = converse(stdin, stdout, packer).await;
                let _ = child.wait().await;
                outcome
            }
            EnvHost::Local => {
                let mut child = tokio::process::Command::new("bash")
                    .args(["-c", &text])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| EnvError::transient(format!("bash: {e}")))?;
                let stdin = child.stdin.take().expect("piped stdin");
                let stdout = child.stdout.take().expect("piped stdout");
                let outcome = converse(stdin, stdout, packer).await;
                let _ = child.wait().await;
                outcome
            }
        }
    };
    tokio::time::timeout(SESSION_TIMEOUT, fut)
        .await
        .map_err(|_| {
            EnvError::transient(format!(
                "preparing the environment took over {}s",
                SESSION_TIMEOUT.as_secs()
            ))
        })?
}

/// Follows the script's lines; packs and sends when asked to.
async fn converse<W, R, F, Fut>(stdin: W, stdout: R, packer: F) -> Result<Outcome, EnvError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(Archive, f64), EnvError>>,
{
    let mut outcome = Outcome::default();
    let mut lines = BufReader::new(stdout).lines();
    let mut stdin = Some(stdin);
    let mut packer = Some(packer);
    let mut upload_started = None;
    let lost = |e: std::io::Error| {
        EnvError::transient(format!(
            "the connection to the cluster failed while preparing the environment: {e}"
        ))
    };
    loop {
        let Some(line) = lines.next_line().await.map_err(lost)? else {
            return Err(EnvError::transient(
                "the cluster ended the environment session before it was published",
            ));
        };
        let Some(rest) = line.strip_prefix("@@SAO ENV ") else {
            continue; // a login shell's noise
        };
        let (word, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let reason = crate::limits::truncate(reason, 600);
        match word {
            "HIT" => {
                outcome.hit = true;
                return Ok(outcome);
            }
            "SEND" => {
                let Some(pack) = packer.take() else {
                    return Err(EnvError::transient(
                        "the cluster asked twice for the archive",
                    ));
                };
                let (archive, secs) = pack().await?;
                outcome.pack_seconds = secs;
                let started = Instant::now();
                upload_started = Some(started);
                let mut w = stdin.take().expect("stdin, once");
                outcome.bytes_uploaded = send(&mut w, &archive).await.map_err(lost)?;
                drop(w);
                tracing::debug!(
                    "sent {} bytes in {:.1}s",
                    outcome.bytes_uploaded,
                    started.elapsed().as_secs_f64()
                );
            }
            "RECEIVED" => {}
            "PUBLISHED" => {
                outcome.upload_seconds = upload_started
                    .map(|t| t.elapsed().as_secs_f64())
                    .unwrap_or_default();
            }
            "GC" => tracing::info!("environment cache: {reason}"),
            "BUSY" => {
                return Err(EnvError::transient(
                    "another operator holds this environment's lock; trying again",
                ));
            }
            "ERROR" => {
                return Err(EnvError::transient(format!(
                    "the environment cache: {reason}"
                )));
            }
            "INVALID" => {
                return Err(EnvError::fatal(format!(
                    "the environment failed its check (activate, then import dagster_pipes): {reason}"
                )));
            }
            "PACKFAIL" => {
                return Err(EnvError::fatal(format!(
                    "packing on the login node failed: {reason}"
                )));
            }
            _ => {}
        }
        // The script exits after PUBLISHED and its garbage collection.
        if word == "PUBLISHED" {
            // Read on until the end, for the collection's report.
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(r) = l.strip_prefix("@@SAO ENV GC ") {
                    tracing::info!("environment cache: {}", crate::limits::truncate(r, 600));
                }
            }
            return Ok(outcome);
        }
    }
}

/// Streams the archive: its header, then its bytes, in chunks (never all in memory).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, archive: &Archive) -> std::io::Result<u64> {
    let mut file = tokio::fs::File::open(&archive.path).await?;
    let size = file.metadata().await?.len();
    w.write_all(format!("SIZE {size} {}\n", archive.format.word()).as_bytes())
        .await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    let mut next_report = size / 10;
    let started = Instant::now();
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        sent += n as u64;
        if size > PROGRESS_BYTES && sent >= next_report {
            tracing::info!(
                "uploading the environment: {} of {} MiB ({:.0}%, {:.1}s)",
                sent >> 20,
                size >> 20,
                sent as f64 * 100.0 / size as f64,
                started.elapsed().as_secs_f64()
            );
            next_report += size / 10;
        }
    }
    w.flush().await?;
    w.shutdown().await?;
    Ok(sent)
}
