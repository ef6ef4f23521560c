//! The packers: each turns the sources into an archive and an activation contract (unpacked,
//! the archive holds `activate.sh` or `bin/activate`, after which `python3` imports the
//! environment's packages). They run on the operator's host ([`pack_local`]) or, as shell
//! text, on the login node ([`remote_pack_commands`]).
//!
//! The `uv` environment is a directory of wheels installed for the cluster's interpreter
//! (`uv pip install --target`, its version and platform asked of the cluster), with an
//! `activate.sh` that puts it on `PYTHONPATH` and a `bin/python3` that runs the cluster's
//! interpreter: relocatable by construction, and no interpreter to ship.

use super::{EnvError, EnvRequest, PythonInfo, SourceData, SourceFile, Sources};
use crate::api::Packer;
use crate::shell::{join, quote};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a packer may run.
pub const PACK_TIMEOUT: Duration = Duration::from_secs(1800);
/// Where a pack command writes its archive (a directory), if it does not print the path.
pub const PACK_OUTPUT_ENV: &str = "SAO_PACK_OUTPUT";
/// The uv layout's files inside a source bundle.
pub const LAYOUT_DIR: &str = ".sao-layout";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A tar archive (any compression tar detects), unpacked with `tar -xf`.
    Tar,
    /// A self-extracting script (pixi-pack's `--create-executable`), run in the target dir.
    Script,
}

impl ArchiveFormat {
    pub fn of(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e == "sh") {
            ArchiveFormat::Script
        } else {
            ArchiveFormat::Tar
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            ArchiveFormat::Tar => "tar",
            ArchiveFormat::Script => "sh",
        }
    }
}

/// A packed archive; its temporary directory lives as long as it does.
pub struct Archive {
    pub path: PathBuf,
    pub format: ArchiveFormat,
    pub _dir: tempfile::TempDir,
}

/// The `uv` layout's own files: (relative path, content, mode).
pub fn uv_layout(python: &str) -> Vec<(String, String, u32)> {
    let activate = "# slurm-asset-operator uv environment: packages on PYTHONPATH, the cluster's interpreter.\n\
         __sao_env=$(cd \"$(dirname \"${BASH_SOURCE[0]:-$0}\")\" && pwd)\n\
         export PATH=\"$__sao_env/bin:$__sao_env/site-packages/bin:$PATH\"\n\
         export PYTHONPATH=\"$__sao_env/site-packages${PYTHONPATH:+:$PYTHONPATH}\"\n\
         export SAO_ENV_DIR=\"$__sao_env\"\n\
         unset __sao_env\n"
        .to_string();
    // `python3` on the login node may not be `python3` on the compute node's PATH: an
    // interpreter named without a path is looked up past this directory.
    let wrapper = if python.contains('/') {
        format!("#!/bin/sh\nexec {} \"$@\"\n", quote(python))
    } else {
        format!(
            "#!/bin/sh\nd=$(cd \"$(dirname \"$0\")\" && pwd)\nPATH=$(printf '%s' \"$PATH\" | tr ':' '\\n' | grep -vx \"$d\" | paste -sd:)\nexec {} \"$@\"\n",
            quote(python)
        )
    };
    vec![
        ("activate.sh".into(), activate, 0o644),
        ("bin/python3".into(), wrapper.clone(), 0o755),
        ("bin/python".into(), wrapper, 0o755),
    ]
}

/// `pixi-pack`'s argv for the request, writing `output`.
pub fn pixi_pack_argv(req: &EnvRequest, platform: &str, output: &str) -> Vec<String> {
    let mut a = vec![
        "pixi-pack".to_string(),
        "--environment".into(),
        req.pixi
            .environment
            .clone()
            .unwrap_or_else(|| "default".into()),
        "--platform".into(),
        platform.to_string(),
    ];
    for f in &req.pixi.inject {
        a.push("--inject".into());
        a.push(super::clean_rel(f).unwrap_or_else(|| f.clone()));
    }
    a.extend([
        "--create-executable".into(),
        "--output-file".into(),
        output.to_string(),
        req.pixi_manifest(),
    ]);
    a
}

/// `uv pip install`'s argv for a local pack into `target`.
pub fn uv_install_argv(
    req: &EnvRequest,
    py: &PythonInfo,
    requirements: &str,
    target: &str,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "pip",
        "install",
        "--quiet",
        "--no-progress",
        "--target",
        target,
        "--python-platform",
        &py.platform,
        "--python-version",
        &py.version,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if req.untrusted_host {
        // Building an sdist runs its code: not in the operator's pod.
        a.extend(["--only-binary".into(), ":all:".into()]);
    }
    a.extend(["-r".into(), requirements.to_string()]);
    a
}

const UV_EXPORT: [&str; 7] = [
    "export",
    "--frozen",
    "--no-hashes",
    "--no-dev",
    "--no-emit-project",
    "--quiet",
    "--output-file",
];

fn uv_bin() -> String {
    std::env::var("SAO_UV").unwrap_or_else(|_| "uv".into())
}

/// Writes the staged sources under `dir`.
pub fn stage(files: &[SourceFile], dir: &Path) -> Result<(), EnvError> {
    for f in files.iter().filter(|f| f.staged) {
        let to = dir.join(&f.name);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(|e| io_err(&f.name, e))?;
        }
        match &f.data {
            SourceData::Bytes(b) => std::fs::write(&to, b).map_err(|e| io_err(&f.name, e))?,
            SourceData::Path(p) => {
                std::fs::copy(p, &to).map_err(|e| io_err(&f.name, e))?;
            }
        }
    }
    Ok(())
}

fn io_err(name: &str, e: std::io::Error) -> EnvError {
    EnvError::fatal(format!("staging {name}: {}", e.kind()))
}

/// Runs one packer step; its failure names the step and ends with its last words.
async fn run_step(
    what: &str,
    argv: &[String],
    cwd: &Path,
    extra_env: &[(&str, String)],
) -> Result<String, EnvError> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(cwd).env_clear();
    // The packer gets what it needs to find tools and indexes, not the operator's secrets.
    for (k, v) in std::env::vars() {
        let keep = matches!(
            k.as_str(),
            "PATH"
                | "HOME"
                | "LANG"
                | "LC_ALL"
                | "TMPDIR"
                | "XDG_CACHE_HOME"
                | "SSL_CERT_FILE"
                | "SSL_CERT_DIR"
                | "http_proxy"
                | "https_proxy"
                | "no_proxy"
                | "HTTP_PROXY"
                | "HTTPS_PROXY"
                | "NO_PROXY"
        ) || k.starts_with("UV_")
            || k.starts_with("PIXI_");
        if keep {
            cmd.env(k, v);
        }
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(PACK_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            EnvError::fatal(format!(
                "{what}: still running after {}s",
                PACK_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| EnvError::fatal(format!("{what}: cannot run {:?}: {}", argv[0], e.kind())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(EnvError::fatal(format!(
            "{what} failed ({}): {}",
            out.status,
            crate::limits::truncate(last.trim(), 400)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Packs on the operator's host. Returns the archive and the seconds it took.
pub async fn pack_local(
    req: &EnvRequest,
    files: &[SourceFile],
    platform: &str,
    py: Option<&PythonInfo>,
) -> Result<(Archive, f64), EnvError> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("sao-pack-")
        .tempdir()
        .map_err(|e| EnvError::transient(format!("packing: a temporary directory: {e}")))?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).map_err(|e| io_err("src", e))?;
    stage(files, &src)?;
    // Where the packer runs: the project itself in standalone mode (a pack command may read
    // anything of it), else the staged sources.
    let cwd = match &req.sources {
        Sources::Dir(root) => root.clone(),
        Sources::Map(_) => src.clone(),
    };
    let archive = match req.packer {
        Packer::Uv => {
            let py = py.ok_or_else(|| EnvError::fatal("uv: the cluster's Python is unknown"))?;
            let reqs = match &req.uv.requirements {
                Some(r) => src.join(super::clean_rel(r).unwrap_or_default()),
                None => {
                    let project = src.join(
                        super::clean_rel(req.uv.project.as_deref().unwrap_or("."))
                            .unwrap_or_default(),
                    );
                    let out = dir.path().join("requirements.txt");
                    let mut argv = vec![uv_bin()];
                    argv.extend(UV_EXPORT.iter().map(|s| s.to_string()));
                    argv.push(out.display().to_string());
                    run_step("uv export (from uv.lock)", &argv, &project, &[]).await?;
                    out
                }
            };
            let env = dir.path().join("env");
            let mut argv = vec![uv_bin()];
            argv.extend(uv_install_argv(
                req,
                py,
                &reqs.display().to_string(),
                &env.join("site-packages").display().to_string(),
            ));
            run_step("uv pip install", &argv, dir.path(), &[]).await?;
            write_layout(&env, &uv_layout(req.python()))?;
            let tar = dir.path().join("env.tar.gz");
            run_step("tar", &tar_argv("-czf", &tar, &env), dir.path(), &[]).await?;
            tar
        }
        Packer::Pixi => {
            let out = dir.path().join("environment.sh");
            let argv = pixi_pack_argv(req, platform, &out.display().to_string());
            run_step("pixi-pack", &argv, &cwd, &[]).await?;
            out
        }
        Packer::Command => {
            let out_dir = dir.path().join("out");
            std::fs::create_dir_all(&out_dir).map_err(|e| io_err("out", e))?;
            let stdout = run_step(
                "spec.environment.packCommand",
                &req.pack_command,
                &cwd,
                &[(PACK_OUTPUT_ENV, out_dir.display().to_string())],
            )
            .await?;
            command_archive(&out_dir, &stdout, &cwd)?
        }
    };
    let meta = std::fs::metadata(&archive).map_err(|_| {
        EnvError::fatal(format!(
            "the packer wrote no archive at {}",
            archive.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(EnvError::fatal(format!(
            "{}: the archive is not a regular file",
            archive.display()
        )));
    }
    super::COUNTERS
        .packs
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let format = ArchiveFormat::of(&archive);
    Ok((
        Archive {
            path: archive,
            format,
            _dir: dir,
        },
        started.elapsed().as_secs_f64(),
    ))
}

/// The archive a pack command made: the one file it wrote to `$SAO_PACK_OUTPUT`, else the
/// path it printed last (relative to where it ran).
fn command_archive(out_dir: &Path, stdout: &str, cwd: &Path) -> Result<PathBuf, EnvError> {
    let written: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    if let [one] = written.as_slice() {
        return Ok(one.clone());
    }
    let printed = stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| {
        EnvError::fatal(format!(
            "spec.environment.packCommand: wrote no archive to ${PACK_OUTPUT_ENV} and printed no path"
        ))
    })?;
    let p = Path::new(printed);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    })
}

/// `tar FLAGS ARCHIVE -C DIR .`: the whole of `dir`, paths relative to it.
fn tar_argv(flags: &str, archive: &Path, dir: &Path) -> Vec<String> {
    vec![
        "tar".into(),
        flags.into(),
        archive.display().to_string(),
        "-C".into(),
        dir.display().to_string(),
        ".".into(),
    ]
}

fn write_layout(env: &Path, layout: &[(String, String, u32)]) -> Result<(), EnvError> {
    use std::os::unix::fs::PermissionsExt;
    for (name, content, mode) in layout {
        let p = env.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| io_err(name, e))?;
        }
        std::fs::write(&p, content).map_err(|e| io_err(name, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| io_err(name, e))?;
    }
    Ok(())
}

/// The sources of a login-node pack as one tar archive (the uv layout included).
pub async fn source_bundle(req: &EnvRequest, files: &[SourceFile]) -> Result<Archive, EnvError> {
    let dir = tempfile::Builder::new()
        .prefix("sao-sources-")
        .tempdir()
        .map_err(|e| EnvError::transient(format!("a temporary directory: {e}")))?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).map_err(|e| io_err("src", e))?;
    stage(files, &src)?;
    if req.packer == Packer::Uv {
        write_layout(&src.join(LAYOUT_DIR), &uv_layout(req.python()))?;
    }
    let tar = dir.path().join("sources.tar");
    run_step("tar", &tar_argv("-cf", &tar, &src), dir.path(), &[]).await?;
    let size = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
    if size > super::MAX_REMOTE_SOURCES_BYTES {
        return Err(EnvError::fatal(format!(
            "spec.environment: the sources come to {size} bytes, over the {} allowed for packOn: remote",
            super::MAX_REMOTE_SOURCES_BYTES
        )));
    }
    Ok(Archive {
        path: tar,
        format: ArchiveFormat::Tar,
        _dir: dir,
    })
}

/// Shell text that packs on the login node. It runs in the unpacked sources with `$store`
/// the environment's directory, and leaves the environment in `$store/env` (`fmt=dir`) or an
/// archive in `$archive` with its format in `$fmt`.
pub fn remote_pack_commands(req: &EnvRequest, platform: &str) -> String {
    match req.packer {
        Packer::Uv => {
            let mut s = format!("py={}\n", quote(req.python()));
            let reqs = match &req.uv.requirements {
                Some(r) => quote(&super::clean_rel(r).unwrap_or_default()),
                None => {
                    let project = super::clean_rel(req.uv.project.as_deref().unwrap_or("."))
                        .unwrap_or_else(|| ".".into());
                    s.push_str(&format!(
                        "(cd {} && uv {} \"$store/requirements.txt\") || exit 10\n",
                        quote(&project),
                        UV_EXPORT.join(" ")
                    ));
                    "\"$store/requirements.txt\"".to_string()
                }
            };
            s.push_str(&format!(
                "uv pip install --quiet --no-progress --target \"$store/env/site-packages\" --python \"$py\" -r {reqs} || exit 11\n\
                 cp -a {LAYOUT_DIR}/. \"$store/env/\" || exit 12\nfmt=dir\n"
            ));
            s
        }
        Packer::Pixi => {
            // It runs in `$store/src`: the archive lands in `$store`.
            let argv = pixi_pack_argv(req, platform, "../environment.sh");
            format!(
                "{} || exit 10\narchive=\"$store/environment.sh\"; fmt=sh\n",
                join(&argv)
            )
        }
        Packer::Command => format!(
            "export {PACK_OUTPUT_ENV}=\"$store/out\"; mkdir -p \"${PACK_OUTPUT_ENV}\"\n\
             printed=$({} < /dev/null) || exit 10\n\
             set -- \"${PACK_OUTPUT_ENV}\"/*\n\
             if [ $# -eq 1 ] && [ -f \"$1\" ]; then archive=$1; else archive=$(printf '%s\\n' \"$printed\" | sed '/^[[:space:]]*$/d' | tail -n1); fi\n\
             case $archive in /*) ;; *) archive=\"$PWD/$archive\" ;; esac\n\
             case $archive in *.sh) fmt=sh ;; *) fmt=tar ;; esac\n",
            join(&req.pack_command)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EnvironmentSettings, PixiSettings};

    #[test]
    fn pixi_pack_gets_the_seeds_command_line() {
        let e = EnvironmentSettings {
            packer: Some(Packer::Pixi),
            pixi: Some(PixiSettings {
                manifest: Some("envs/pixi.toml".into()),
                environment: Some("prod".into()),
                platform: None,
                inject: vec![
                    "dist/my_pkg-0.1-py_0.conda".into(),
                    "./dist/other.conda".into(),
                ],
            }),
            ..Default::default()
        };
        let req =
            EnvRequest::from_settings(&e, Sources::Dir("/p".into()), None, None, false).unwrap();
        assert_eq!(
            pixi_pack_argv(&req, "linux-64", "/tmp/x/environment.sh"),
            [
                "pixi-pack",
                "--environment",
                "prod",
                "--platform",
                "linux-64",
                "--inject",
                "dist/my_pkg-0.1-py_0.conda",
                "--inject",
                "dist/other.conda",
                "--create-executable",
                "--output-file",
                "/tmp/x/environment.sh",
                "envs/pixi.toml"
            ]
        );
        // On the login node: the same line, run in `$store/src` (the archive lands in `$store`).
        let remote = remote_pack_commands(&req, "linux-64");
        assert!(
            remote.starts_with("pixi-pack --environment prod --platform linux-64 --inject dist/my_pkg-0.1-py_0.conda --inject dist/other.conda --create-executable --output-file ../environment.sh envs/pixi.toml || exit 10\n"),
            "{remote}"
        );
    }

    #[test]
    fn a_hostile_pack_command_is_quoted_word_by_word() {
        let e = EnvironmentSettings {
            pack_command: Some(vec!["make-env".into(), "$(touch /tmp/pwned); `id`".into()]),
            ..Default::default()
        };
        let req =
            EnvRequest::from_settings(&e, Sources::Dir("/p".into()), None, None, false).unwrap();
        let s = remote_pack_commands(&req, "linux-64");
        assert!(
            s.contains("printed=$(make-env '$(touch /tmp/pwned); `id`' < /dev/null)"),
            "{s}"
        );
    }

    #[test]
    fn kubernetes_installs_wheels_only() {
        let e = EnvironmentSettings {
            packer: Some(Packer::Uv),
            ..Default::default()
        };
        let py = PythonInfo {
            version: "3.11".into(),
            platform: "x86_64-manylinux_2_36".into(),
        };
        for (untrusted, expect) in [(true, true), (false, false)] {
            let req = EnvRequest::from_settings(
                &e,
                Sources::Map(Default::default()),
                None,
                None,
                untrusted,
            )
            .unwrap();
            let argv = uv_install_argv(&req, &py, "r.txt", "/t");
            assert_eq!(argv.contains(&":all:".to_string()), expect, "{argv:?}");
            assert!(argv.windows(2).any(|w| w == ["--python-version", "3.11"]));
            assert!(
                argv.windows(2)
                    .any(|w| w == ["--python-platform", "x86_64-manylinux_2_36"])
            );
        }
    }
}
