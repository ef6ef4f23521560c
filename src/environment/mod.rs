//! Environments (DESIGN section 4): packed once per content, uploaded once per cluster, reused
//! by every run that asks for the same content.
//!
//! An [`EnvRequest`] names the packer and its sources. Its cache key hashes what the packer
//! reads (lockfile, project files, injected files: their contents, never their mtimes), the
//! pack command, the platform and the interpreter. [`prepare`] then holds one session with the
//! cluster (or the local host) under a lock on `{remoteBase}/env-cache/.lock-{key}`: a
//! published environment is a hit; otherwise the archive is packed (on the operator's host, or
//! on the login node from the uploaded sources), streamed, unpacked in a directory of its own,
//! verified (its activation script runs and its interpreter imports `dagster_pipes`) and
//! published by one atomic rename of a symlink. Assets of one process that want one key share
//! one preparation ([`FLIGHTS`]); the remote lock serialises operators and replicas.

pub mod pack;
pub mod session;

use crate::api::{EnvStatus, EnvironmentSettings, PackOn, Packer, PixiSettings, UvSettings};
use crate::executor::slurm::SlurmExecutor;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// Largest source file (a lockfile, a project file, an injected conda package) read.
pub const MAX_SOURCE_BYTES: u64 = 2 << 30;
/// Most source files one environment may name (globs included).
pub const MAX_SOURCE_FILES: usize = 1000;
/// Sources packed on the login node travel as one bundle of at most this size.
pub const MAX_REMOTE_SOURCES_BYTES: u64 = 256 << 20;
/// Environments kept by default, and for how long unused.
pub const DEFAULT_KEEP: u32 = 5;
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);
/// The interpreter of a `uv` environment when none is named: the cluster's `python3`.
pub const DEFAULT_PYTHON: &str = "python3";
/// A run dir's record of the environment its job uses (garbage collection keeps it).
pub const RUN_ENV_FILE: &str = ".sao-env";

/// Where the packer's files come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Sources {
    /// Standalone mode: paths relative to the manifest's directory (confined to it).
    Dir(PathBuf),
    /// Kubernetes mode: the keys of a ConfigMap.
    Map(BTreeMap<String, Vec<u8>>),
}

/// One environment to make exist on one cluster, fully resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvRequest {
    pub packer: Packer,
    pub pack_on: PackOn,
    pub uv: UvSettings,
    pub pixi: PixiSettings,
    pub pack_command: Vec<String>,
    /// Files named by `sources` (for a pack command).
    pub extra_sources: Vec<String>,
    pub cache_inject_globs: Option<Vec<String>>,
    pub sources: Sources,
    pub force: bool,
    /// `remoteBase` as written, resolved against the login user's home
    /// ([`crate::jobscript::remote_base_dir`]); a local cluster's is given absolute.
    pub remote_base: Option<String>,
    pub keep: u32,
    pub max_age: Duration,
    /// Kubernetes mode: packages are installed from wheels only (building an sdist runs its
    /// code in the operator's pod), and a pack command may run only on the login node.
    pub untrusted_host: bool,
}

/// Why an environment could not be made. `transient`: try again later (the cluster or the
/// network failed); otherwise the spec must change.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvError {
    pub message: String,
    pub transient: bool,
}

impl EnvError {
    pub fn fatal(message: impl Into<String>) -> Self {
        EnvError {
            message: message.into(),
            transient: false,
        }
    }
    pub fn transient(message: impl Into<String>) -> Self {
        EnvError {
            message: message.into(),
            transient: true,
        }
    }
}

/// One file that enters the key, and maybe the packer's staging directory.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Relative path, `/`-separated, as the packer sees it.
    pub name: String,
    pub data: SourceData,
    /// Whether the packer needs it staged (false: it only enters the key).
    pub staged: bool,
}

#[derive(Clone, Debug)]
pub enum SourceData {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// The cluster interpreter's facts that choose a `uv` environment's wheels.
#[derive(Clone, Debug, PartialEq)]
pub struct PythonInfo {
    /// `3.11`
    pub version: String,
    /// uv's `--python-platform`, e.g. `x86_64-manylinux_2_36`.
    pub platform: String,
}

impl EnvRequest {
    /// Builds the request of an asset's merged environment settings, if it packs one.
    pub fn from_settings(
        e: &EnvironmentSettings,
        sources: Sources,
        remote_base: Option<String>,
        cache: Option<&crate::api::EnvCacheSettings>,
        untrusted_host: bool,
    ) -> Option<EnvRequest> {
        let packer = e.packer()?;
        Some(EnvRequest {
            packer,
            pack_on: e.pack_on.unwrap_or(PackOn::Local),
            uv: e.uv.clone().unwrap_or_default(),
            pixi: e.pixi.clone().unwrap_or_default(),
            pack_command: e.pack_command.clone().unwrap_or_default(),
            extra_sources: e.sources.clone().unwrap_or_default(),
            cache_inject_globs: e.cache_inject_globs.clone(),
            sources,
            force: e.force_env_push == Some(true),
            remote_base,
            keep: cache.and_then(|c| c.keep).unwrap_or(DEFAULT_KEEP),
            max_age: cache
                .and_then(|c| c.max_age.as_ref())
                .map(|a| a.duration())
                .unwrap_or(DEFAULT_MAX_AGE),
            untrusted_host,
        })
    }

    /// The interpreter a `uv` environment runs with on the cluster.
    pub fn python(&self) -> &str {
        self.uv.python.as_deref().unwrap_or(DEFAULT_PYTHON)
    }

    /// The files the packer reads and the key hashes, in a stable order. Errors name the
    /// field and the file, never its contents.
    pub fn source_files(&self) -> Result<Vec<SourceFile>, EnvError> {
        let mut wanted: Vec<(String, &str, bool, bool)> = vec![]; // (name, field, required, staged)
        match self.packer {
            Packer::Uv => match &self.uv.requirements {
                Some(r) => wanted.push((r.clone(), "uv.requirements", true, true)),
                None => {
                    let dir = self.uv.project.clone().unwrap_or_else(|| ".".into());
                    for f in ["pyproject.toml", "uv.lock"] {
                        wanted.push((join_rel(&dir, f), "uv.project", true, true));
                    }
                }
            },
            Packer::Pixi => {
                let manifest = self.pixi_manifest();
                let lock = join_rel(parent_rel(&manifest), "pixi.lock");
                wanted.push((manifest, "pixi.manifest", true, true));
                wanted.push((lock, "pixi.manifest", false, true));
                for f in &self.pixi.inject {
                    wanted.push((f.clone(), "pixi.inject", true, true));
                }
            }
            Packer::Command => {}
        }
        for f in &self.extra_sources {
            wanted.push((f.clone(), "sources", true, true));
        }
        // Globs only enter the key; the pixi inject files are in it already.
        for g in self.cache_inject_globs.iter().flatten() {
            for name in self.glob(g)? {
                wanted.push((name, "cacheInjectGlobs", true, false));
            }
        }
        let mut out: BTreeMap<String, SourceFile> = BTreeMap::new();
        for (name, field, required, staged) in wanted {
            let clean = clean_rel(&name)
                .ok_or_else(|| EnvError::fatal(format!("spec.environment.{field}: {name:?} must be a relative path inside the project (no `..`)")))?;
            if let Some(existing) = out.get_mut(&clean) {
                existing.staged |= staged;
                continue;
            }
            let data = match &self.sources {
                Sources::Dir(root) => {
                    match crate::files::resolve_confined(root, Path::new(&clean)) {
                        Ok(p) if p.is_file() => SourceData::Path(p),
                        Ok(_) | Err(_) if !required => continue,
                        Ok(_) => {
                            return Err(EnvError::fatal(format!(
                                "spec.environment.{field}: {clean}: not a regular file"
                            )));
                        }
                        Err(e) => {
                            return Err(EnvError::fatal(format!("spec.environment.{field}: {e}")));
                        }
                    }
                }
                Sources::Map(m) => match m.get(&clean) {
                    Some(b) => SourceData::Bytes(b.clone()),
                    None if !required => continue,
                    None => {
                        return Err(EnvError::fatal(format!(
                            "spec.environment.{field}: {clean:?} is not a key of spec.environment.sourcesConfigMap"
                        )));
                    }
                },
            };
            out.insert(
                clean.clone(),
                SourceFile {
                    name: clean,
                    data,
                    staged,
                },
            );
        }
        if out.len() > MAX_SOURCE_FILES {
            return Err(EnvError::fatal(format!(
                "spec.environment: more than {MAX_SOURCE_FILES} source files"
            )));
        }
        Ok(out.into_values().collect())
    }

    pub fn pixi_manifest(&self) -> String {
        self.pixi
            .manifest
            .clone()
            .unwrap_or_else(|| "pixi.toml".into())
    }

    /// Relative names matched by a glob of `cacheInjectGlobs`, confined to the sources.
    fn glob(&self, pattern: &str) -> Result<Vec<String>, EnvError> {
        let bad = || {
            EnvError::fatal(format!(
                "spec.environment.cacheInjectGlobs: {pattern:?} must be a relative glob inside the project (no `..`)"
            ))
        };
        if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
            return Err(bad());
        }
        let pat = glob::Pattern::new(pattern).map_err(|_| bad())?;
        let mut names = vec![];
        match &self.sources {
            Sources::Map(m) => names.extend(m.keys().filter(|k| pat.matches(k)).cloned()),
            Sources::Dir(root) => {
                let full = format!("{}/{pattern}", root.display());
                for p in glob::glob(&full).map_err(|_| bad())?.flatten() {
                    if let Ok(rel) = p.strip_prefix(root)
                        && p.is_file()
                    {
                        names.push(rel.to_string_lossy().into_owned());
                    }
                    if names.len() > MAX_SOURCE_FILES {
                        break;
                    }
                }
            }
        }
        Ok(names)
    }

    /// The platform the environment is built for: uv's wheel platform, pixi's conda
    /// platform, or the cluster's.
    pub fn platform(&self, cluster_platform: &str, py: Option<&PythonInfo>) -> String {
        match self.packer {
            Packer::Uv => py
                .map(|p| format!("{} py{}", p.platform, p.version))
                .unwrap_or_default(),
            Packer::Pixi => self
                .pixi
                .platform
                .clone()
                .unwrap_or_else(|| cluster_platform.to_string()),
            Packer::Command => cluster_platform.to_string(),
        }
    }

    /// The cache key: a hash of everything that makes the environment what it is.
    pub fn cache_key(&self, files: &[SourceFile], platform: &str) -> Result<String, EnvError> {
        let mut h = Sha256::new();
        let mut line = |s: &str| {
            h.update(s.as_bytes());
            h.update(b"\n");
        };
        line("sao-env-v1");
        line(&format!(
            "packer={:?} packOn={:?}",
            self.packer, self.pack_on
        ));
        line(&format!("platform={platform}"));
        match self.packer {
            Packer::Uv => line(&format!(
                "python={} requirements={:?} wheelsOnly={}",
                self.python(),
                self.uv.requirements,
                self.untrusted_host
            )),
            Packer::Pixi => line(&format!(
                "pixi={} env={}",
                self.pixi_manifest(),
                self.pixi.environment.as_deref().unwrap_or("default")
            )),
            Packer::Command => {}
        }
        line(&format!(
            "command={}",
            serde_json::to_string(&self.pack_command).unwrap_or_default()
        ));
        for f in files {
            let (size, digest) = digest_of(f)?;
            line(&format!("file {} {size} {digest}", f.name));
        }
        Ok(hex::encode(h.finalize())[..32].to_string())
    }
}

/// Size and SHA-256 of a source file, read in chunks.
fn digest_of(f: &SourceFile) -> Result<(u64, String), EnvError> {
    match &f.data {
        SourceData::Bytes(b) => Ok((b.len() as u64, hex::encode(Sha256::digest(b)))),
        SourceData::Path(p) => {
            use std::io::Read;
            let mut file = crate::files::open_regular(p)
                .map_err(|e| EnvError::fatal(format!("spec.environment: {e}")))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                let n = file.read(&mut buf).map_err(|e| {
                    EnvError::fatal(format!("spec.environment: {}: {}", f.name, e.kind()))
                })?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > MAX_SOURCE_BYTES {
                    return Err(EnvError::fatal(format!(
                        "spec.environment: {}: larger than the limit of {MAX_SOURCE_BYTES} bytes",
                        f.name
                    )));
                }
                h.update(&buf[..n]);
            }
            Ok((total, hex::encode(h.finalize())))
        }
    }
}

/// `dir/file`, with `.` meaning the project root.
fn join_rel(dir: &str, file: &str) -> String {
    let d = dir.trim_end_matches('/');
    if d.is_empty() || d == "." {
        file.to_string()
    } else {
        format!("{d}/{file}")
    }
}

fn parent_rel(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or(".")
}

/// A relative path without `.`/`..` components or a leading `/`, or `None`.
pub fn clean_rel(p: &str) -> Option<String> {
    if p.starts_with('/') || p.contains('\0') || p.len() > crate::limits::MAX_STRING {
        return None;
    }
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

/// Where a preparation runs: a Slurm cluster over its connection, or the operator's host.
#[derive(Clone)]
pub enum EnvHost {
    Slurm(Arc<SlurmExecutor>),
    Local,
}

impl EnvHost {
    fn id(&self) -> String {
        match self {
            EnvHost::Slurm(ex) => format!("{:?}", ex.target()),
            EnvHost::Local => "local".into(),
        }
    }
}

/// Counters of the work done for environments (`/metrics`, `operator-metrics.yaml`).
#[derive(Debug, Default)]
pub struct EnvCounters {
    pub packs: std::sync::atomic::AtomicU64,
    pub uploads: std::sync::atomic::AtomicU64,
    pub hits: std::sync::atomic::AtomicU64,
    pub bytes_uploaded: std::sync::atomic::AtomicU64,
}

/// This process's environment counters.
pub static COUNTERS: LazyLock<EnvCounters> = LazyLock::new(EnvCounters::default);

type Flight = Arc<tokio::sync::Mutex<Option<(Instant, EnvStatus)>>>;

/// One preparation per (host, cache, key) at a time in this process; its result serves the
/// assets that waited for it for a short while (later ones ask the cluster again).
static FLIGHTS: LazyLock<std::sync::Mutex<HashMap<String, Flight>>> =
    LazyLock::new(Default::default);
const FLIGHT_RESULT_TTL: Duration = Duration::from_secs(30);

/// Python facts per (host, interpreter), learnt once.
static PYTHONS: LazyLock<std::sync::Mutex<HashMap<String, PythonInfo>>> =
    LazyLock::new(Default::default);

/// Makes the environment exist on the host and says where and how it came about.
pub async fn prepare(host: &EnvHost, req: &EnvRequest) -> Result<EnvStatus, EnvError> {
    let started = Instant::now();
    let files = req.source_files()?;
    if req.untrusted_host && req.packer == Packer::Command && req.pack_on == PackOn::Local {
        return Err(EnvError::fatal(
            "spec.environment.packCommand: in Kubernetes mode a pack command runs only on the login node (packOn: remote)",
        ));
    }
    let (home, cluster_platform) = match host {
        EnvHost::Slurm(ex) => {
            let f = ex
                .facts()
                .await
                .map_err(|e| EnvError::transient(e.to_string()))?;
            (f.home, f.platform)
        }
        EnvHost::Local => (
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
            local_platform(),
        ),
    };
    let py = if req.packer == Packer::Uv {
        Some(python_info(host, req.python()).await?)
    } else {
        None
    };
    let platform = req.platform(&cluster_platform, py.as_ref());
    let key = req.cache_key(&files, &platform)?;
    let base = crate::jobscript::remote_base_dir(req.remote_base.as_deref(), &home);
    let cache_dir = format!("{base}/env-cache");
    let flight_id = format!("{}|{cache_dir}|{key}", host.id());
    let flight = FLIGHTS
        .lock()
        .expect("flights lock")
        .entry(flight_id.clone())
        .or_default()
        .clone();
    let mut slot = flight.lock().await;
    if !req.force
        && let Some((at, done)) = slot.as_ref()
        && at.elapsed() < FLIGHT_RESULT_TTL
    {
        COUNTERS
            .hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(EnvStatus {
            cache_hit: Some(true),
            bytes_uploaded: Some(0),
            pack_seconds: Some(0.0),
            upload_seconds: Some(0.0),
            ..done.clone()
        });
    }
    let plan = session::SessionPlan {
        cache_dir: cache_dir.clone(),
        base: base.clone(),
        key: key.clone(),
        force: req.force,
        keep: req.keep,
        max_age: req.max_age,
        remote_pack: (req.pack_on == PackOn::Remote)
            .then(|| pack::remote_pack_commands(req, &platform)),
    };
    let outcome = session::run(host, &plan, req, &files, &platform, py.as_ref()).await?;
    let status = EnvStatus {
        cache_key: Some(key.clone()),
        cache_hit: Some(outcome.hit),
        bytes_uploaded: Some(outcome.bytes_uploaded),
        pack_seconds: Some(round(outcome.pack_seconds)),
        upload_seconds: Some(round(outcome.upload_seconds)),
        path: Some(format!("{cache_dir}/{key}")),
    };
    use std::sync::atomic::Ordering::Relaxed;
    if outcome.hit {
        COUNTERS.hits.fetch_add(1, Relaxed);
    } else {
        COUNTERS.uploads.fetch_add(1, Relaxed);
        COUNTERS
            .bytes_uploaded
            .fetch_add(outcome.bytes_uploaded, Relaxed);
    }
    tracing::info!(
        "environment {key} {} in {:.1}s ({} bytes uploaded)",
        if outcome.hit {
            "found in the cache"
        } else {
            "published"
        },
        started.elapsed().as_secs_f64(),
        outcome.bytes_uploaded
    );
    *slot = Some((Instant::now(), status.clone()));
    Ok(status)
}

fn round(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

fn local_platform() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "linux-64".into(),
        other => format!("linux-{other}"),
    }
}

/// The interpreter's version and wheel platform (asked once per host and interpreter).
async fn python_info(host: &EnvHost, python: &str) -> Result<PythonInfo, EnvError> {
    let id = format!("{}|{python}", host.id());
    if let Some(p) = PYTHONS.lock().expect("pythons lock").get(&id) {
        return Ok(p.clone());
    }
    let script = format!(
        "{} -c 'import sys, platform; print(\"%d.%d\" % sys.version_info[:2]); print(platform.machine()); print(platform.libc_ver()[1] or \"2.17\")'",
        crate::shell::quote(python)
    );
    let out = session::run_capture(host, &script).await?;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let info = match lines.as_slice() {
        [version, machine, libc, ..] => PythonInfo {
            version: version.to_string(),
            platform: wheel_platform(machine, libc),
        },
        _ => {
            return Err(EnvError::fatal(format!(
                "spec.environment.uv.python: {python:?} did not run on the cluster"
            )));
        }
    };
    PYTHONS
        .lock()
        .expect("pythons lock")
        .insert(id, info.clone());
    Ok(info)
}

/// uv's `--python-platform` for a machine and glibc version: the newest manylinux tag uv
/// knows that the glibc satisfies.
pub fn wheel_platform(machine: &str, glibc: &str) -> String {
    let minor: u32 = glibc
        .strip_prefix("2.")
        .and_then(|m| m.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(17);
    let known = [17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40];
    let tag = known
        .iter()
        .rev()
        .find(|k| **k <= minor)
        .copied()
        .unwrap_or(17);
    let arch = match machine {
        "aarch64" | "arm64" => "aarch64",
        _ => "x86_64",
    };
    format!("{arch}-manylinux_2_{tag}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dir: &Path, e: EnvironmentSettings) -> EnvRequest {
        EnvRequest::from_settings(&e, Sources::Dir(dir.to_path_buf()), None, None, false).unwrap()
    }

    fn uv() -> EnvironmentSettings {
        EnvironmentSettings {
            packer: Some(Packer::Uv),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_follows_contents_not_mtimes_and_not_the_payload() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("pyproject.toml"), "[project]\nname='x'\n").unwrap();
        std::fs::write(d.path().join("uv.lock"), "lock 1\n").unwrap();
        std::fs::write(d.path().join("payload.py"), "print(1)\n").unwrap();
        let key = |e: EnvironmentSettings| {
            let r = request(d.path(), e);
            r.cache_key(&r.source_files().unwrap(), "x86_64-manylinux_2_36 py3.11")
                .unwrap()
        };
        let k1 = key(uv());
        // Touching a file (new mtime, same content) and editing the payload change nothing.
        std::fs::write(d.path().join("uv.lock"), "lock 1\n").unwrap();
        std::fs::write(d.path().join("payload.py"), "print(2)\n").unwrap();
        assert_eq!(key(uv()), k1);
        // The lockfile's content does.
        std::fs::write(d.path().join("uv.lock"), "lock 2\n").unwrap();
        let k2 = key(uv());
        assert_ne!(k2, k1);
        // So does every file a glob names, and not only the newest one.
        std::fs::create_dir(d.path().join("wheels")).unwrap();
        std::fs::write(d.path().join("wheels/a.whl"), "a").unwrap();
        std::fs::write(d.path().join("wheels/b.whl"), "b").unwrap();
        let globbed = || EnvironmentSettings {
            cache_inject_globs: Some(vec!["wheels/*.whl".into()]),
            ..uv()
        };
        let k3 = key(globbed());
        assert_ne!(k3, k2);
        std::fs::write(d.path().join("wheels/a.whl"), "a2").unwrap();
        assert_ne!(key(globbed()), k3);
        // The interpreter and the platform enter the key.
        let other_python = EnvironmentSettings {
            uv: Some(UvSettings {
                python: Some("/opt/python3.12/bin/python3".into()),
                ..Default::default()
            }),
            ..uv()
        };
        assert_ne!(key(other_python), key(uv()));
        let r = request(d.path(), uv());
        let files = r.source_files().unwrap();
        assert_ne!(
            r.cache_key(&files, "aarch64-manylinux_2_28 py3.11")
                .unwrap(),
            r.cache_key(&files, "x86_64-manylinux_2_36 py3.11").unwrap()
        );
    }

    #[test]
    fn sources_stay_inside_the_project() {
        let d = tempfile::tempdir().unwrap();
        let e = EnvironmentSettings {
            uv: Some(UvSettings {
                requirements: Some("../../etc/passwd".into()),
                ..Default::default()
            }),
            ..uv()
        };
        let err = request(d.path(), e).source_files().unwrap_err();
        assert!(
            err.message.contains("spec.environment.uv.requirements"),
            "{err:?}"
        );
        assert!(!err.transient);
        let e = EnvironmentSettings {
            cache_inject_globs: Some(vec!["/etc/*".into()]),
            ..uv()
        };
        std::fs::write(d.path().join("pyproject.toml"), "").unwrap();
        std::fs::write(d.path().join("uv.lock"), "").unwrap();
        let err = request(d.path(), e).source_files().unwrap_err();
        assert!(err.message.contains("cacheInjectGlobs"), "{err:?}");
        // A symlink out of the project is refused, naming the file and not its contents.
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("req.txt")).unwrap();
        let e = EnvironmentSettings {
            uv: Some(UvSettings {
                requirements: Some("req.txt".into()),
                ..Default::default()
            }),
            ..uv()
        };
        let err = request(d.path(), e).source_files().unwrap_err();
        assert!(
            err.message.contains("req.txt") && err.message.contains("outside"),
            "{err:?}"
        );
    }

    #[test]
    fn a_configmap_provides_the_files_in_kubernetes_mode() {
        let mut m = BTreeMap::new();
        m.insert("pyproject.toml".to_string(), b"[project]".to_vec());
        let r =
            EnvRequest::from_settings(&uv(), Sources::Map(m.clone()), None, None, true).unwrap();
        let err = r.source_files().unwrap_err();
        assert!(err.message.contains("\"uv.lock\" is not a key"), "{err:?}");
        m.insert("uv.lock".to_string(), b"lock".to_vec());
        let r = EnvRequest::from_settings(&uv(), Sources::Map(m), None, None, true).unwrap();
        let names: Vec<String> = r
            .source_files()
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(names, ["pyproject.toml", "uv.lock"]);
    }

    #[test]
    fn the_newest_manylinux_tag_the_glibc_allows() {
        assert_eq!(wheel_platform("x86_64", "2.36"), "x86_64-manylinux_2_36");
        assert_eq!(wheel_platform("x86_64", "2.27"), "x86_64-manylinux_2_17");
        assert_eq!(wheel_platform("aarch64", "2.41"), "aarch64-manylinux_2_40");
        assert_eq!(wheel_platform("x86_64", ""), "x86_64-manylinux_2_17");
    }

    #[test]
    fn asset_settings_win_over_the_clusters_which_win_over_the_defaults() {
        let cluster = EnvironmentSettings {
            pre_deployed_env_path: Some("/shared/env".into()),
            force_env_push: Some(true),
            cache_inject_globs: Some(vec!["c/*".into()]),
            ..Default::default()
        };
        // Nothing on the asset: the cluster's pre-deployed environment, no packing.
        let merged = EnvironmentSettings::default().merged_over(&cluster);
        assert_eq!(merged.packer(), None);
        assert_eq!(merged.pre_deployed_env_path.as_deref(), Some("/shared/env"));
        // The asset's packer replaces the cluster's source; other fields fall through.
        let asset = EnvironmentSettings {
            cache_inject_globs: Some(vec!["a/*".into()]),
            ..uv()
        };
        let merged = asset.merged_over(&cluster);
        assert_eq!(merged.packer(), Some(Packer::Uv));
        assert_eq!(merged.pre_deployed_env_path, None);
        assert_eq!(merged.force_env_push, Some(true));
        assert_eq!(merged.cache_inject_globs, Some(vec!["a/*".to_string()]));
        // Built-in defaults: packed on the operator's host, the cluster's python3.
        let r = request(Path::new("/"), merged);
        assert_eq!(r.pack_on, PackOn::Local);
        assert_eq!(r.python(), "python3");
        assert_eq!((r.keep, r.max_age), (DEFAULT_KEEP, DEFAULT_MAX_AGE));
        // An asset's pre-deployed path wins over a cluster's packer.
        let cluster = EnvironmentSettings {
            pack_command: Some(vec!["make-env".into()]),
            ..Default::default()
        };
        assert_eq!(
            EnvironmentSettings::default()
                .merged_over(&cluster)
                .packer(),
            Some(Packer::Command)
        );
        let asset = EnvironmentSettings {
            pre_deployed_env_path: Some("/mine".into()),
            ..Default::default()
        };
        assert_eq!(asset.merged_over(&cluster).packer(), None);
    }
}
