//! Environments (issue 12) against the real Slurm test cluster, in standalone mode: the `uv`
//! packer for real (dagster-pipes and PyYAML, a compiled wheel, from PyPI), the cache key,
//! one pack and one upload for many assets and for two operators, packing on the login node,
//! a cut upload, garbage collection, pre-deployed payloads, and the pixi-pack contract.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/uv-env");
const TEST_HOME: &str = "/home/saotest";

/// The uv project of the fixture, copied to `dir/proj`.
fn project(dir: &Path) {
    std::fs::create_dir_all(dir.join("proj")).unwrap();
    for f in ["pyproject.toml", "uv.lock"] {
        std::fs::copy(Path::new(FIXTURE).join(f), dir.join("proj").join(f)).unwrap();
    }
}

const PAYLOAD: &str = "import yaml\nfrom dagster_pipes import open_dagster_pipes\nwith open_dagster_pipes() as p:\n    p.report_asset_materialization(metadata={\"yaml\": yaml.__version__, \"libyaml\": bool(yaml.__with_libyaml__)})\n";

/// A payload for environments without PyYAML: dagster-pipes only.
const PIPES_PAYLOAD: &str = "from dagster_pipes import open_dagster_pipes\nwith open_dagster_pipes() as p:\n    p.report_asset_materialization(metadata={\"yaml\": \"-\"})\n";

/// A SlurmAsset running `payload.py` in an environment (`env`: the lines under
/// `environment:`, indented by four spaces).
fn env_asset(name: &str, run_key: &str, env: &str) -> String {
    format!(
        "apiVersion: dagster-slurm.io/v1alpha1\nkind: SlurmAsset\nmetadata: {{name: {name}}}\nspec:\n  assetKey: env/{name}\n  clusterRef: hpc\n  runKey: {run_key:?}\n  environment:\n{env}  payload:\n    path: payload.py\n"
    )
}

const UV_ENV: &str = "    packer: uv\n    uv: {project: proj, python: /usr/bin/python3}\n";

/// [`wait_object`] on the status alone.
fn wait_long(
    dir: &Path,
    name: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_object(dir, name, what, limit, |o| pred(&o["status"]))["status"].clone()
}

fn done(run_key: &'static str) -> impl Fn(&Value) -> bool {
    move |s| {
        s["runKey"] == run_key
            && matches!(
                s["phase"].as_str(),
                Some("Succeeded" | "Failed" | "Cancelled")
            )
    }
}

fn metric(dir: &Path, name: &str) -> u64 {
    operator_metrics(dir)[name].as_u64().unwrap_or(0)
}

fn succeeded(s: &Value) {
    assert_eq!(s["phase"], "Succeeded", "{s:#}");
}

/// The cache dir of a test's remote base on the cluster (root reads it directly).
fn cache_dir(test_base: &str) -> std::path::PathBuf {
    Path::new(TEST_HOME).join(test_base).join("env-cache")
}

#[test]
fn a_uv_environment_is_packed_once_and_its_key_follows_its_contents() {
    let (tmp, _c) = slurm_dir("env-uv");
    let d = tmp.path();
    project(d);
    write(d, "payload.py", PAYLOAD);
    write(d, "a.yaml", &env_asset("a", "r1", UV_ENV));
    let _op = Operator::start_logged(d, None);

    let first = wait_long(d, "a", "run r1", Duration::from_secs(180), done("r1"));
    succeeded(&first);
    let m = &first["pipes"]["materializations"][0]["metadata"];
    assert_eq!(m["yaml"]["raw_value"], "6.0.4", "{first:#}");
    assert_eq!(
        m["libyaml"]["raw_value"], true,
        "the compiled wheel for the cluster: {first:#}"
    );
    let env = &first["env"];
    let key = env["cacheKey"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 32);
    assert_eq!(env["cacheHit"], false);
    assert!(env["bytesUploaded"].as_u64().unwrap() > 100_000, "{env}");
    assert!(env["packSeconds"].as_f64().is_some() && env["uploadSeconds"].as_f64().is_some());
    assert_eq!(metric(d, "envPacks"), 1);
    assert_eq!(metric(d, "envUploads"), 1);

    // Another run, the payload script changed: same key, a hit, nothing packed or uploaded.
    write(d, "payload.py", &format!("{PAYLOAD}print('second')\n"));
    write(d, "a.yaml", &env_asset("a", "r2", UV_ENV));
    let second = wait_long(d, "a", "run r2", Duration::from_secs(120), done("r2"));
    succeeded(&second);
    assert_eq!(second["env"]["cacheKey"], key.as_str());
    assert_eq!(second["env"]["cacheHit"], true);
    assert_eq!(second["env"]["bytesUploaded"], 0);
    assert_eq!(second["logTail"]["stdout"], "second\n");
    assert_eq!(metric(d, "envPacks"), 1, "a hit packs nothing");
    assert_eq!(metric(d, "envUploads"), 1);

    // The lockfile's content changed (a comment: the same packages): a new key, packed and
    // uploaded again.
    let lock = d.join("proj/uv.lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    std::fs::write(&lock, format!("{text}# edited\n")).unwrap();
    write(d, "a.yaml", &env_asset("a", "r3", UV_ENV));
    let third = wait_long(d, "a", "run r3", Duration::from_secs(180), done("r3"));
    succeeded(&third);
    let key3 = third["env"]["cacheKey"].as_str().unwrap().to_string();
    assert_ne!(key3, key);
    assert_eq!(third["env"]["cacheHit"], false);
    assert_eq!(metric(d, "envUploads"), 2);

    // A file named by cacheInjectGlobs enters the key by its content.
    std::fs::create_dir_all(d.join("data")).unwrap();
    write(d, "data/a.txt", "one");
    write(d, "data/b.txt", "two");
    let globbed = format!("{UV_ENV}    cacheInjectGlobs: [\"data/*.txt\"]\n");
    write(d, "a.yaml", &env_asset("a", "r4", &globbed));
    let fourth = wait_long(d, "a", "run r4", Duration::from_secs(180), done("r4"));
    succeeded(&fourth);
    let key4 = fourth["env"]["cacheKey"].as_str().unwrap().to_string();
    assert_ne!(key4, key3);
    write(d, "data/a.txt", "one, edited");
    write(d, "a.yaml", &env_asset("a", "r5", &globbed));
    let fifth = wait_long(d, "a", "run r5", Duration::from_secs(180), done("r5"));
    succeeded(&fifth);
    assert_ne!(fifth["env"]["cacheKey"].as_str().unwrap(), key4);
    assert_eq!(fifth["env"]["cacheHit"], false);
    assert_eq!(metric(d, "envPacks"), 4);
    // Every published environment is a link to a verified directory.
    for e in std::fs::read_dir(cache_dir(&remote_base("env-uv")))
        .unwrap()
        .flatten()
    {
        let p = e.path();
        if p.is_symlink() {
            assert!(p.join(".sao-ready").is_file(), "{}", p.display());
            assert!(p.join("activate.sh").is_file());
        }
    }
}

/// `n` assets sharing the uv environment, in `dir` (with its own cluster manifest).
fn shared_env_dir(test_base: &str, prefix: &str, n: usize) -> tempfile::TempDir {
    let c = test_cluster();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write(d, "cluster.yaml", &c.manifest("hpc", test_base));
    project(d);
    write(d, "payload.py", PAYLOAD);
    for i in 0..n {
        write(
            d,
            &format!("{prefix}{i}.yaml"),
            &env_asset(&format!("{prefix}{i}"), "r1", UV_ENV),
        );
    }
    tmp
}

#[test]
fn twenty_assets_and_two_operators_pack_and_upload_once() {
    // One operator, 20 assets applied at once.
    let base = remote_base("env-twenty");
    let one = shared_env_dir(&base, "s", 20);
    let _op = Operator::start_logged(one.path(), None);
    for i in 0..20 {
        let s = wait_long(
            one.path(),
            &format!("s{i}"),
            "its end",
            Duration::from_secs(240),
            done("r1"),
        );
        succeeded(&s);
    }
    assert_eq!(metric(one.path(), "envPacks"), 1);
    assert_eq!(metric(one.path(), "envUploads"), 1);

    // Two operator processes, 10 assets each, one remote cache: one pack, one upload in all.
    let base = remote_base("env-two-ops");
    let a = shared_env_dir(&base, "p", 10);
    let b = shared_env_dir(&base, "q", 10);
    let _a = Operator::start_logged(a.path(), None);
    let _b = Operator::start_logged(b.path(), None);
    for (d, prefix) in [(a.path(), "p"), (b.path(), "q")] {
        for i in 0..10 {
            let s = wait_long(
                d,
                &format!("{prefix}{i}"),
                "its end",
                Duration::from_secs(240),
                done("r1"),
            );
            succeeded(&s);
        }
    }
    let packs = metric(a.path(), "envPacks") + metric(b.path(), "envPacks");
    let uploads = metric(a.path(), "envUploads") + metric(b.path(), "envUploads");
    assert_eq!((packs, uploads), (1, 1));
}

#[test]
fn pack_on_remote_packs_on_the_login_node() {
    let (tmp, _c) = slurm_dir("env-remote");
    let d = tmp.path();
    project(d);
    write(d, "payload.py", PAYLOAD);
    write(
        d,
        "r.yaml",
        &env_asset("r", "r1", &format!("{UV_ENV}    packOn: remote\n")),
    );
    let _op = Operator::start_logged(d, None);
    let s = wait_long(d, "r", "its end", Duration::from_secs(240), done("r1"));
    succeeded(&s);
    assert_eq!(
        s["pipes"]["materializations"][0]["metadata"]["yaml"]["raw_value"],
        "6.0.4"
    );
    // Only the sources travelled; nothing was packed on the operator's host.
    let sent = s["env"]["bytesUploaded"].as_u64().unwrap();
    assert!(sent > 0 && sent < 200_000, "{sent}");
    assert_eq!(metric(d, "envPacks"), 0);
    let link = cache_dir(&remote_base("env-remote")).join(s["env"]["cacheKey"].as_str().unwrap());
    let store = std::fs::canonicalize(&link).unwrap();
    assert!(store.join("site-packages/yaml").is_dir());
    assert!(
        store.parent().unwrap().join("src/proj/uv.lock").is_file(),
        "the sources were unpacked on the login node"
    );
}

/// A pack command that makes a tar with dagster_pipes (from the pre-deployed environment),
/// an `activate.sh`, and `blob_mb` MiB of noise; `salt` makes its key its own.
fn pack_script(c: &TestCluster, blob_mb: u32, salt: &str) -> String {
    format!(
        "set -e\n# {salt}\nt=$(mktemp -d)\nmkdir -p \"$t/site\"\ncp -r {env}/lib/python3.11/site-packages/dagster_pipes \"$t/site/\"\n\
         printf '%s\\n' 'export PYTHONPATH=\"$(cd \"$(dirname \"${{BASH_SOURCE[0]}}\")\" && pwd)/site${{PYTHONPATH:+:$PYTHONPATH}}\"' > \"$t/activate.sh\"\n\
         head -c {blob_mb}M /dev/urandom > \"$t/blob\"\n\
         tar -cf \"$SAO_PACK_OUTPUT/env.tar\" -C \"$t\" .\nrm -rf \"$t\"\n",
        env = c.env_path
    )
}

const COMMAND_ENV: &str = "    packCommand: [bash, pack.sh]\n    sources: [pack.sh]\n";

#[test]
fn an_upload_cut_mid_transfer_leaves_nothing_used_and_the_next_try_succeeds() {
    let c = test_cluster();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = remote_base("env-cut");
    // A marker option of this test's own, to find its SSH master among the others.
    let cluster = c.manifest("hpc", &base).replace(
        "ssh: {",
        "ssh: {extraOptions: {ConnectionAttempts: \"13\"}, ",
    );
    write(d, "cluster.yaml", &cluster);
    write(d, "pack.sh", &pack_script(&c, 400, "cut"));
    write(d, "payload.py", PIPES_PAYLOAD);
    write(d, "big.yaml", &env_asset("big", "r1", COMMAND_ENV));
    let _op = Operator::start_logged(d, None);
    // Wait for the archive to be arriving, then kill the connection under it.
    let store = cache_dir(&base).join(".store");
    let deadline = Instant::now() + Duration::from_secs(120);
    let arriving = loop {
        let partial = std::fs::read_dir(&store).ok().and_then(|r| {
            r.flatten()
                .map(|e| e.path().join("incoming"))
                .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > (8 << 20)))
        });
        if let Some(p) = partial {
            break p;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        Command::new("pkill")
            .args(["-f", "ConnectionAttempts=13"])
            .status()
            .unwrap()
            .success()
    );
    // The cut is noticed and retried; meanwhile nothing is published from the partial upload.
    let retrying = wait_long(d, "big", "a retry", Duration::from_secs(60), |s| {
        s["reason"] == "EnvRetrying" || s["phase"] == "Succeeded"
    });
    assert_ne!(retrying["phase"], "Failed", "{retrying:#}");
    let s = wait_long(d, "big", "its end", Duration::from_secs(180), done("r1"));
    succeeded(&s);
    assert_eq!(s["env"]["cacheHit"], false);
    assert!(s["env"]["bytesUploaded"].as_u64().unwrap() > 400 << 20);
    // The one published environment is complete; the cut one is not what it points to.
    let link = cache_dir(&base).join(s["env"]["cacheKey"].as_str().unwrap());
    let target = std::fs::canonicalize(&link).unwrap();
    assert!(target.join(".sao-ready").is_file());
    assert_ne!(target.parent().unwrap(), arriving.parent().unwrap());
    assert!(!arriving.exists(), "the partial upload is gone");
}

#[test]
fn garbage_collection_removes_an_old_unused_environment_and_keeps_a_running_jobs() {
    let c = test_cluster();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = remote_base("env-gc");
    let cluster = c.manifest("hpc", &base).replace(
        "  pollInterval: 1s\n",
        "  pollInterval: 1s\n  envCache: {keep: 1}\n",
    );
    write(d, "cluster.yaml", &cluster);
    write(
        d,
        "payload.py",
        "import dagster_pipes, time, sys\ntime.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)\n",
    );
    let asset = |name: &str, args: &str| {
        write(d, &format!("{name}.sh"), &pack_script(&c, 1, name));
        let env = format!("    packCommand: [bash, {name}.sh]\n    sources: [{name}.sh]\n");
        write(
            d,
            &format!("{name}.yaml"),
            &env_asset(name, "r1", &env).replace(
                "    path: payload.py\n",
                &format!("    path: payload.py\n    args: [{args}]\n"),
            ),
        );
    };
    let cache = cache_dir(&base);
    let backdate = |key: &str| {
        assert!(
            Command::new("touch")
                .args(["-d", "2 hours ago"])
                .arg(cache.join(key).join(".sao-used"))
                .status()
                .unwrap()
                .success()
        );
    };
    let _op = Operator::start_logged(d, None);
    asset("old", "\"0\"");
    let old = wait_long(d, "old", "its end", Duration::from_secs(120), done("r1"));
    succeeded(&old);
    let old_key = old["env"]["cacheKey"].as_str().unwrap().to_string();
    asset("busy", "\"40\"");
    let busy = wait_long(d, "busy", "running", Duration::from_secs(120), |s| {
        s["phase"] == "Running"
    });
    let busy_key = busy["env"]["cacheKey"].as_str().unwrap().to_string();
    backdate(&old_key);
    backdate(&busy_key);
    let old_store = std::fs::canonicalize(cache.join(&old_key)).unwrap();
    // A third environment is published: keep 1 leaves the new one, and the running job's.
    asset("new", "\"0\"");
    let new = wait_long(d, "new", "its end", Duration::from_secs(120), done("r1"));
    succeeded(&new);
    let new_key = new["env"]["cacheKey"].as_str().unwrap();
    assert!(
        !cache.join(&old_key).exists(),
        "the old unused environment is removed"
    );
    assert!(!old_store.exists(), "with its directory");
    assert!(
        cache.join(&busy_key).join(".sao-ready").is_file(),
        "the running job's stays"
    );
    assert!(cache.join(new_key).join(".sao-ready").is_file());
    let busy = wait_long(d, "busy", "its end", Duration::from_secs(120), done("r1"));
    succeeded(&busy);
}

#[test]
fn a_pre_deployed_payload_runs_without_upload_and_a_missing_one_is_named() {
    let (tmp, c) = slurm_dir("env-predeployed");
    let d = tmp.path();
    let name = format!("hello-{}.py", std::process::id());
    let scripts = Path::new(&c.env_path).join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let remote = scripts.join(&name);
    std::fs::write(&remote, "print('from the pre-deployed scripts')\n").unwrap();
    Command::new("chown")
        .args(["-R", "saotest"])
        .arg(&scripts)
        .status()
        .unwrap();
    write(d, &name, "print('uploaded: wrong')\n");
    write(
        d,
        "pre.yaml",
        &slurm_asset(
            "pre",
            "",
            "  debug: true\n  environment: {skipPayloadUpload: true}\n",
        )
        .replace("    inline: |\n", &format!("    path: {name}\n")),
    );
    write(
        d,
        "gone.yaml",
        &slurm_asset("gone", "", "  environment: {skipPayloadUpload: true, remotePayloadPath: /nonexistent/payload.py}\n")
            .replace("    inline: |\n", "    path: payload.py\n"),
    );
    write(d, "payload.py", "print(1)\n");
    let out = run_once(d, None);
    let _ = std::fs::remove_file(&remote);
    assert!(!out.status.success(), "one asset fails");
    let pre = status(d, "pre");
    succeeded(&pre);
    assert_eq!(pre["logTail"]["stdout"], "from the pre-deployed scripts\n");
    assert!(pre["env"].is_null(), "nothing packed: {pre:#}");
    let run_dir = Path::new(pre["remoteRunDir"].as_str().unwrap());
    let uploaded: Vec<String> = std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("payload"))
        .collect();
    assert!(uploaded.is_empty(), "no payload was uploaded: {uploaded:?}");
    let gone = status(d, "gone");
    assert_eq!(gone["phase"], "Failed", "{gone:#}");
    assert!(
        gone["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/payload.py"),
        "{gone:#}"
    );
}

#[test]
fn pixi_pack_is_called_as_the_seed_does_and_its_self_extracting_archive_runs() {
    // pixi-pack cannot reach a conda channel here: a stand-in on PATH records its command
    // line and writes an `environment.sh` of pixi-pack's shape (run in a directory, it
    // unpacks `env/` and writes `activate.sh`), holding dagster_pipes.
    let c = test_cluster();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("project");
    std::fs::create_dir_all(&d).unwrap();
    write(
        &d,
        "cluster.yaml",
        &c.manifest("hpc", &remote_base("env-pixi")),
    );
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let argv_file = tmp.path().join("argv");
    write(
        &bin,
        "pixi-pack",
        &format!(
            "#!/bin/bash\nprintf '%s\\n' \"$@\" > {argv}\nout=''\nwhile [ $# -gt 0 ]; do [ \"$1\" = --output-file ] && out=$2; shift; done\n\
             pkg=$(tar -czf - -C {site} dagster_pipes | base64 -w0)\n\
             {{ echo '#!/bin/bash'; echo 'mkdir -p env/lib'; echo \"echo $pkg | base64 -d | tar -xzf - -C env/lib\";\n\
               echo 'printf \"%s\\n\" \"export PYTHONPATH=$PWD/env/lib\" > activate.sh'; }} > \"$out\"\n",
            argv = argv_file.display(),
            site = format_args!("{}/lib/python3.11/site-packages", c.env_path),
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        bin.join("pixi-pack"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write(&d, "pixi.toml", "[workspace]\nname = \"x\"\n");
    write(&d, "pixi.lock", "version: 6\n");
    std::fs::create_dir_all(d.join("dist")).unwrap();
    write(&d, "dist/mine-0.1-0.conda", "a conda package");
    write(&d, "payload.py", PIPES_PAYLOAD);
    write(
        &d,
        "px.yaml",
        &env_asset(
            "px",
            "r1",
            "    packer: pixi\n    pixi: {environment: prod, inject: [dist/mine-0.1-0.conda]}\n",
        ),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let _op = Operator::start_logged(&d, Some(&path));
    let s = wait_long(&d, "px", "its end", Duration::from_secs(120), done("r1"));
    succeeded(&s);
    assert_eq!(
        s["pipes"]["materializations"].as_array().map(Vec::len),
        Some(1),
        "{s:#}"
    );
    let argv = std::fs::read_to_string(&argv_file).unwrap();
    let argv: Vec<&str> = argv.lines().collect();
    assert_eq!(argv.len(), 10, "{argv:?}");
    assert_eq!(
        argv[..8],
        [
            "--environment",
            "prod",
            "--platform",
            "linux-64",
            "--inject",
            "dist/mine-0.1-0.conda",
            "--create-executable",
            "--output-file"
        ]
    );
    assert!(argv[8].ends_with("/environment.sh"));
    assert_eq!(argv[9], "pixi.toml");
}

#[test]
fn a_local_cluster_packs_into_its_run_base_and_reuses_it() {
    // Local mode: the same manifest without clusterRef; the payload runs on this host in the
    // environment packed for this host's python3.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    project(d);
    write(d, "payload.py", PAYLOAD);
    let local = |run_key: &str| {
        env_asset("loc", run_key, "    packer: uv\n    uv: {project: proj}\n")
            .replace("  clusterRef: hpc\n", "")
    };
    write(d, "loc.yaml", &local("r1"));
    let _op = Operator::start_logged(d, None);
    let first = wait_long(d, "loc", "run r1", Duration::from_secs(180), done("r1"));
    succeeded(&first);
    assert_eq!(
        first["pipes"]["materializations"][0]["metadata"]["yaml"]["raw_value"],
        "6.0.4"
    );
    assert_eq!(first["env"]["cacheHit"], false);
    let path = first["env"]["path"].as_str().unwrap();
    let runs = std::fs::canonicalize(d.join(".runs")).unwrap();
    assert!(
        Path::new(path).starts_with(&runs) || Path::new(path).starts_with(d.join(".runs")),
        "{path}"
    );
    assert!(Path::new(path).join(".sao-ready").is_file());
    write(d, "loc.yaml", &local("r2"));
    let second = wait_long(d, "loc", "run r2", Duration::from_secs(120), done("r2"));
    succeeded(&second);
    assert_eq!(second["env"]["cacheHit"], true);
    assert_eq!(metric(d, "envPacks"), 1);
}

#[test]
fn a_pack_command_runs_on_the_login_node() {
    let (tmp, c) = slurm_dir("env-remote-command");
    let d = tmp.path();
    write(d, "pack.sh", &pack_script(&c, 1, "remote command"));
    write(d, "payload.py", PIPES_PAYLOAD);
    write(
        d,
        "rc.yaml",
        &env_asset("rc", "r1", &format!("{COMMAND_ENV}    packOn: remote\n")),
    );
    let _op = Operator::start_logged(d, None);
    let s = wait_long(d, "rc", "its end", Duration::from_secs(120), done("r1"));
    succeeded(&s);
    assert_eq!(
        s["pipes"]["materializations"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        metric(d, "envPacks"),
        0,
        "nothing packed on the operator's host"
    );
    // Only the sources travelled, not the 1 MiB archive the command made there.
    assert!(
        s["env"]["bytesUploaded"].as_u64().unwrap() < 100_000,
        "{s:#}"
    );
}
