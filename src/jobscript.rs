//! The bash launcher: turns a resolved run into the job script and the submit command.
//!
//! The script is the same in local and Slurm mode; only the command that starts it differs
//! (`sbatch --parsable ...` versus the local supervisor). Every manifest string reaches the
//! script through [`shell::quote`] or as a file.

use crate::api::{
    ClusterMode, Launcher, LauncherType, Resources, SlurmAssetSpec, SlurmClusterSpec,
};
use crate::shell::{join, quote};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const JOB_SCRIPT: &str = "job.sh";
pub const EXIT_FILE: &str = "exit";
pub const STDOUT_FILE: &str = "stdout.log";
pub const STDERR_FILE: &str = "stderr.log";

/// Who is running: identifies one attempt of one run of one object.
#[derive(Clone, Debug, PartialEq)]
pub struct RunId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub run: u64,
    pub attempt: u32,
    /// The operator's leadership epoch (the Lease's transition count; 0 without leader
    /// election): the fencing token a submission carries, so a deposed leader cannot submit.
    pub epoch: u64,
    /// A session's allocation: its run dirs live under `sessions/`, apart from the assets'
    /// (an asset and a session may share a name).
    pub session: bool,
}

impl RunId {
    /// The operator's tag carried by every job, found again after a restart.
    pub fn tag(&self) -> String {
        format!("sao.{}.{}.{}", self.uid, self.run, self.attempt)
    }
}

/// Everything needed to write and start one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    pub id: RunId,
    pub mode: ClusterMode,
    pub asset_key: String,
    /// Dagster run ID handed to the payload: `spec.runKey`, else `<uid>-<run>`.
    pub dagster_run_id: String,
    pub run_dir: String,
    /// A payload file to place in the run dir: (file name, content).
    pub payload_file: Option<(String, Vec<u8>)>,
    /// The payload's argv, as the job script runs it.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// An environment to activate first: pre-deployed, or packed into the cluster's cache.
    pub env_path: Option<String>,
    /// The packed environment's cache key, recorded in the run dir (its garbage
    /// collection keeps an environment that a queued or running job uses).
    pub env_key: Option<String>,
    /// Files on the cluster the payload needs that were not uploaded with it
    /// (`skipPayloadUpload`): a missing one fails the submission, naming it.
    pub required_files: Vec<String>,
    pub resources: Resources,
    /// How the payload is started: directly, or after a Ray cluster.
    pub launcher: Launcher,
    /// A step of a session's allocation instead of a job of its own.
    pub session: Option<crate::session::Placement>,
    /// A heterogeneous job: each component's name and resources (over `resources`); the
    /// first is the one the job script runs in.
    pub components: Vec<(String, Resources)>,
    /// Components with payloads of their own: their plans (run dirs inside this one).
    pub component_plans: Vec<RunPlan>,
    /// The plan of a component with a payload of its own: its het group and name; its
    /// launcher spans the group's nodes (its script runs in a step on the first).
    pub het_group: Option<(usize, String)>,
    pub extras: Option<Value>,
    pub pipes_context: Option<crate::api::PipesContext>,
}

/// Where a standalone spec's relative paths are resolved.
#[derive(Clone, Debug)]
pub struct PlanContext<'a> {
    pub asset_dir: &'a Path,
    pub cluster: &'a SlurmClusterSpec,
    pub cluster_dir: &'a Path,
    /// Run-directory root used when the cluster sets no `remoteBase`.
    pub default_base: PathBuf,
    /// The login user's home on a Slurm cluster: relative remote paths start there.
    pub remote_home: Option<&'a str>,
}

impl RunPlan {
    /// Runs in the packed environment the run's status names.
    pub fn use_env(&mut self, env: Option<&crate::api::EnvStatus>) {
        if let Some(e) = env
            && let Some(path) = &e.path
        {
            self.env_path = Some(path.clone());
            self.env_key = e.cache_key.clone();
        }
    }
}

/// Where run dirs and the environment cache live on a cluster without `remoteBase`, under the
/// login user's home.
pub const DEFAULT_REMOTE_BASE: &str = ".slurm-asset-operator";

/// A Slurm cluster's root of run dirs and environment cache: `remoteBase` resolved against the
/// login user's home as [`plan`] resolves it, or the default.
pub fn remote_base_dir(remote_base: Option<&str>, home: &str) -> String {
    match remote_base {
        Some(b) => resolve_path(false, Some(home), Path::new("/"), b),
        None => format!("{home}/{DEFAULT_REMOTE_BASE}"),
    }
}

/// The root of the cluster's run dirs and environment cache, as [`plan`] resolves it.
pub fn base_dir(ctx: &PlanContext) -> String {
    let local = ctx.cluster.mode == ClusterMode::Local;
    match &ctx.cluster.remote_base {
        Some(b) => resolve_path(local, ctx.remote_home, ctx.cluster_dir, b),
        None => absolutize(&ctx.default_base),
    }
}

/// `~`, `~/x` and `$HOME/x` are the login user's home on a cluster (no shell expands them
/// for us); other relative paths start there too. Locally they are relative to `dir`.
fn resolve_path(local: bool, remote_home: Option<&str>, dir: &Path, p: &str) -> String {
    let home_rel = crate::files::home_relative(p);
    match (local, remote_home, home_rel) {
        (true, _, _) => absolutize(&crate::files::expand_home(dir, p)),
        (false, Some(home), Some(rest)) => {
            format!("{home}/{rest}").trim_end_matches('/').to_string()
        }
        (false, Some(home), None) if !p.starts_with('/') => format!("{home}/{p}"),
        (false, _, _) => p.to_string(),
    }
}

/// Resolves a spec against its cluster into a [`RunPlan`]. Errors name the field.
pub fn plan(spec: &SlurmAssetSpec, id: RunId, ctx: &PlanContext) -> Result<RunPlan, String> {
    let run_dir = format!(
        "{}/{}/{}/{}/{}-{}",
        base_dir(ctx),
        if id.session { "sessions" } else { "runs" },
        id.namespace,
        id.name,
        id.run,
        id.attempt
    );
    let mut p = plan_at(spec, id, ctx, run_dir)?;
    // Components with payloads of their own: each a plan of its own, in a run dir inside
    // this one, with its payload and asset key over the asset's settings.
    if spec.components.iter().any(|c| c.payload.is_some()) {
        for (g, (c, (_, resources))) in spec.components.iter().zip(&p.components).enumerate() {
            let mut sub = spec.clone();
            sub.components.clear();
            sub.payload = c.payload.clone().unwrap_or_default();
            if let Some(l) = &c.launcher {
                sub.launcher = l.clone();
            }
            sub.asset_key = c
                .asset_key
                .clone()
                .unwrap_or_else(|| spec.asset_key.clone());
            sub.resources = resources.clone();
            if let Some(pc) = &mut sub.pipes_context {
                pc.asset_keys = vec![sub.asset_key.clone()];
            }
            let dir = format!("{}/{COMPONENTS_DIR}/{}", p.run_dir, c.name);
            let mut cp = plan_at(&sub, p.id.clone(), ctx, dir)
                .map_err(|e| e.replacen("spec.", &format!("spec.components[{}].", c.name), 1))?;
            cp.het_group = Some((g, c.name.clone()));
            p.component_plans.push(cp);
        }
    }
    Ok(p)
}

/// Where the run dirs of components with payloads of their own are, in the job's.
pub const COMPONENTS_DIR: &str = "components";

fn plan_at(
    spec: &SlurmAssetSpec,
    id: RunId,
    ctx: &PlanContext,
    run_dir: String,
) -> Result<RunPlan, String> {
    let cluster = ctx.cluster;
    let resources = spec.resources.merged_over(&cluster.queue);
    let environment = spec.environment.merged_over(&cluster.environment);
    let local = cluster.mode == ClusterMode::Local;
    if local && !spec.components.is_empty() {
        return Err(
            "spec.components: heterogeneous jobs run on Slurm clusters, not in local mode".into(),
        );
    }
    let resolve = |dir: &Path, p: &str| resolve_path(local, ctx.remote_home, dir, p);
    let env_path = environment.pre_deployed_env_path.as_ref().map(|p| {
        let dir = if spec.environment.pre_deployed_env_path.is_some() {
            ctx.asset_dir
        } else {
            ctx.cluster_dir
        };
        resolve(dir, p)
    });
    let p = &spec.payload;
    let script_name = |name: &str| -> String {
        Path::new(name)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .filter(|f| !f.starts_with('.') && !f.is_empty())
            .map(|f| format!("payload-{f}"))
            .unwrap_or_else(|| "payload.sh".into())
    };
    let interpreter = |file: &str| -> Vec<String> {
        p.interpreter.clone().unwrap_or_else(|| {
            if file.ends_with(".py") {
                vec!["python3".into()]
            } else {
                vec!["bash".into()]
            }
        })
    };
    let skip_upload = environment.skip_payload_upload == Some(true);
    let mut required_files = vec![];
    let (payload_file, mut argv) = if let Some(cmd) = &p.command {
        (None, cmd.clone())
    } else if let Some(remote) = &p.remote_path {
        (
            None,
            [interpreter(remote), vec![resolve(ctx.asset_dir, remote)]].concat(),
        )
    } else if let Some(path) = &p.path {
        if skip_upload {
            let remote = match (&environment.remote_payload_path, &env_path) {
                (Some(r), _) => r.clone(),
                (None, Some(env)) => format!("{env}/scripts/{}", script_name(path).trim_start_matches("payload-")),
                (None, None) => return Err("spec.environment.skipPayloadUpload: needs preDeployedEnvPath or remotePayloadPath".into()),
            };
            required_files.push(remote.clone());
            (None, [interpreter(path), vec![remote]].concat())
        } else {
            let content = crate::files::read_confined(
                ctx.asset_dir,
                Path::new(path),
                crate::limits::MAX_PAYLOAD_BYTES,
            )
            .map_err(|e| format!("spec.payload.path: {e}"))?;
            let name = script_name(path);
            let argv = [interpreter(path), vec![format!("{run_dir}/{name}")]].concat();
            (Some((name, content)), argv)
        }
    } else if let Some(text) = &p.inline {
        let name = "payload.sh".to_string();
        let argv = [
            p.interpreter.clone().unwrap_or_else(|| vec!["bash".into()]),
            vec![format!("{run_dir}/{name}")],
        ]
        .concat();
        (Some((name, text.clone().into_bytes())), argv)
    } else if spec.components.iter().any(|c| c.payload.is_some()) {
        // The components carry the payloads: the job script starts them.
        (None, vec![])
    } else {
        return Err("spec.payload: no source to run (configMapRef must be resolved first)".into());
    };
    argv.extend(p.args.iter().cloned());
    let env = spec
        .env
        .iter()
        .map(|e| {
            e.value
                .clone()
                .map(|v| (e.name.clone(), v))
                .ok_or_else(|| format!("spec.env: {} has no resolved value", e.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let components = spec
        .components
        .iter()
        .map(|c| (c.name.clone(), c.resources.merged_over(&resources)))
        .collect();
    Ok(RunPlan {
        dagster_run_id: spec
            .run_key
            .clone()
            .unwrap_or_else(|| format!("{}-{}", id.uid, id.run)),
        id,
        mode: cluster.mode,
        asset_key: spec.asset_key.clone(),
        run_dir,
        payload_file,
        argv,
        env,
        env_path,
        env_key: None,
        required_files,
        resources,
        launcher: spec.launcher.clone(),
        session: None,
        components,
        component_plans: vec![],
        het_group: None,
        extras: spec.extras.clone(),
        pipes_context: spec.pipes_context.clone(),
    })
}

fn absolutize(p: &Path) -> String {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    // Normalise `.` and `..` lexically so that run dirs print cleanly.
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.display().to_string()
}

/// The job script. Writes the exit file (exit code, start and end time) as its last act, so
/// that an operator that missed the end still learns the outcome.
pub fn render_script(plan: &RunPlan) -> String {
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# slurm-asset-operator job: {}/{} run {} attempt {} (tag {})\n",
        plan.id.namespace,
        plan.id.name,
        plan.id.run,
        plan.id.attempt,
        plan.id.tag()
    ));
    s.push_str("# Generated: every value taken from the manifest is quoted. Do not edit.\n");
    s.push_str("umask 077\n");
    s.push_str(&format!("cd {} || exit 1\n", quote(&plan.run_dir)));
    s.push_str("__sao_start=$(date +%s)\n");
    for (k, v) in crate::pipes::bootstrap_env(&plan.run_dir) {
        s.push_str(&format!("export {k}={}\n", quote(&v)));
    }
    s.push_str(&format!("export SAO_RUN_DIR={}\n", quote(&plan.run_dir)));
    s.push_str(&format!(
        "export SAO_ASSET_KEY={}\n",
        quote(&plan.asset_key)
    ));
    for (k, v) in &plan.env {
        // Names are validated as identifiers; values are quoted.
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    if !plan.components.is_empty() {
        s.push_str(&components_file(&plan.components));
    }
    // Activation happens in the script's own shell: a launcher's processes use it too.
    s.push_str("__sao_activate() {\n");
    if let Some(env) = &plan.env_path {
        let q = |f: &str| quote(&format!("{env}/{f}"));
        s.push_str(&format!(
            "  if [ -f {a} ]; then . {a}; elif [ -f {b} ]; then . {b}; else echo {msg} >&2; return 127; fi\n",
            a = q("activate.sh"),
            b = q("bin/activate"),
            msg = quote(&format!(
                "slurm-asset-operator: no activate.sh or bin/activate in {env}"
            )),
        ));
    }
    s.push_str("  return 0\n}\n");
    if plan.component_plans.is_empty() {
        s.push_str(&format!(
            "__sao_payload() {{\n  {} < /dev/null\n}}\n",
            join(&plan.argv)
        ));
    } else {
        // Components with payloads of their own run side by side, each once on its first
        // node (where its launcher, if any, starts its head); the job's exit code is the
        // first failing one's.
        s.push_str("__sao_payload() {\n  local pids=() i r rc=0\n");
        for (g, cp) in plan.component_plans.iter().enumerate() {
            let d = &cp.run_dir;
            s.push_str(&format!(
                "  srun --het-group={g} --nodes=1 --ntasks=1 -w \"$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_{g}\" | head -n1)\" --input=none --output={} --error={} bash {} &\n  pids+=($!)\n",
                quote(&format!("{d}/{STDOUT_FILE}")),
                quote(&format!("{d}/{STDERR_FILE}")),
                quote(&format!("{d}/{JOB_SCRIPT}")),
            ));
        }
        s.push_str(
            "  for i in \"${!pids[@]}\"; do wait \"${pids[$i]}\"; r=$?; [ \"$rc\" -ne 0 ] || rc=$r; done\n  return \"$rc\"\n}\n",
        );
    }
    if plan.session.is_some() {
        // A step cancelled before it started ends at once; one that starts records its ID
        // (sacct's `<job>.<step>`) for its metrics.
        s.push_str(&format!(
            "[ -e {} ] && exit 0\n",
            crate::session::CANCELLED_FILE
        ));
        s.push_str(&format!(
            "printf '%s.%s\\n%s\\n' \"${{SLURM_JOB_ID:-}}\" \"${{SLURM_STEP_ID:-}}\" \"${{SLURM_STEP_NODELIST:-}}\" > {}\n",
            crate::session::STEP_FILE
        ));
    }
    match plan.launcher.type_ {
        // Components with payloads of their own start their own launchers, each over its
        // component's nodes.
        _ if !plan.component_plans.is_empty() => {
            s.push_str("__sao_activate && __sao_payload\n__sao_rc=$?\n")
        }
        // In a session a Ray asset uses the session's warm cluster (RAY_ADDRESS comes
        // from the agent's environment).
        LauncherType::Ray if plan.session.is_none() => {
            let ray = plan.launcher.ray.clone().unwrap_or_default();
            // A component's own cluster spans its group only, named after it.
            let components: Vec<(usize, String)> = match &plan.het_group {
                Some(group) => vec![group.clone()],
                None => plan
                    .components
                    .iter()
                    .enumerate()
                    .map(|(g, (n, _))| (g, n.clone()))
                    .collect(),
            };
            s.push_str(&crate::launcher::ray_functions(
                &ray,
                plan.resources.gpus_per_node,
                &components,
            ));
            s.push_str(&payload_in_cluster("ray"));
        }
        LauncherType::Spark => {
            let spark = plan.launcher.spark.clone().unwrap_or_default();
            s.push_str(&crate::launcher::spark_functions(
                &spark,
                plan.het_group.as_ref().map(|(g, _)| *g),
            ));
            s.push_str(&payload_in_cluster("spark"));
        }
        _ => s.push_str("__sao_activate && __sao_payload\n__sao_rc=$?\n"),
    }
    s.push_str(&format!(
        "printf 'exit_code=%s\\nstart=%s\\nend=%s\\n' \"$__sao_rc\" \"$__sao_start\" \"$(date +%s)\" > {EXIT_FILE}.tmp && mv -f {EXIT_FILE}.tmp {EXIT_FILE}\n"
    ));
    s.push_str("exit \"$__sao_rc\"\n");
    s
}

/// Runs the payload in the cluster a launcher's `__sao_<name>_up` starts, and always takes
/// it down: scancel and the time limit send SIGTERM first, so the trap does it too.
fn payload_in_cluster(name: &str) -> String {
    format!(
        "trap '__sao_{name}_down; exit 143' TERM\n\
         if ! __sao_activate; then __sao_rc=127\n\
         elif __sao_{name}_up; then __sao_payload; __sao_rc=$?\n\
         else __sao_rc=1; fi\n\
         __sao_{name}_down\n"
    )
}

/// The file a heterogeneous job's payload reads to reach every component:
/// `{"jobId", "components": [{"name", "hetGroup", "jobId", "nodes", "srun"}]}` (also
/// `SAO_COMPONENTS_FILE`); the `SLURM_*_HET_GROUP_<N>` variables say the same.
pub const COMPONENTS_FILE: &str = "components.json";

fn components_file(components: &[(String, Resources)]) -> String {
    let names: Vec<&str> = components.iter().map(|(n, _)| n.as_str()).collect();
    format!(
        r#"# A heterogeneous job: what the payload needs to reach every component.
__sao_names=({names})
{{
  printf '{{"jobId": "%s", "components": [' "${{SLURM_JOB_ID:-}}"
  for __sao_i in "${{!__sao_names[@]}}"; do
    __sao_v=SLURM_JOB_NODELIST_HET_GROUP_$__sao_i
    __sao_nodes=$(scontrol show hostnames "${{!__sao_v:-}}" 2>/dev/null | sed 's/.*/"&"/' | paste -sd, -)
    [ "$__sao_i" -eq 0 ] || printf ', '
    printf '{{"name": "%s", "hetGroup": %s, "jobId": "%s+%s", "nodes": [%s], "srun": ["srun", "--het-group=%s"]}}' \
      "${{__sao_names[$__sao_i]}}" "$__sao_i" "${{SLURM_JOB_ID:-}}" "$__sao_i" "$__sao_nodes" "$__sao_i"
  done
  printf ']}}\n'
}} > {COMPONENTS_FILE}
export SAO_COMPONENTS_FILE="$PWD/{COMPONENTS_FILE}"
"#,
        names = join(&names),
    )
}

/// The exact `sbatch` argv for Slurm mode; every option is its own argument.
pub fn sbatch_argv(plan: &RunPlan) -> Vec<String> {
    let r = &plan.resources;
    let dir = &plan.run_dir;
    // The user's options come first: sbatch keeps the last value of an option, so the
    // operator's own (the tag above all) always win, whatever the validation let through.
    let mut a = vec!["sbatch".to_string()];
    // A heterogeneous job: the first component's options, then the operator's own (which
    // apply to the job), then `:` and each further component's.
    let first = plan.components.first().map_or(r, |(_, c)| c);
    a.extend(first.extra_sbatch_args.iter().cloned());
    resource_options(&mut a, first);
    a.extend([
        "--parsable".into(),
        // The tag is the job name: squeue and sacct can both find it by name after a restart.
        format!("--job-name={}", plan.id.tag()),
        format!(
            "--comment={}/{} run {} attempt {} epoch {}",
            plan.id.namespace, plan.id.name, plan.id.run, plan.id.attempt, plan.id.epoch
        ),
        format!("--chdir={dir}"),
        format!("--output={dir}/{STDOUT_FILE}"),
        format!("--error={dir}/{STDERR_FILE}"),
    ]);
    for (_, c) in plan.components.iter().skip(1) {
        a.push(":".into());
        a.extend(c.extra_sbatch_args.iter().cloned());
        resource_options(&mut a, c);
        // Each component carries the tag too: `squeue -n`/`sacct --name` find all of them.
        a.push(format!("--job-name={}", plan.id.tag()));
    }
    a.push(format!("{dir}/{JOB_SCRIPT}"));
    a
}

/// The `sbatch` options of one set of resources (a job's, or one component's).
fn resource_options(a: &mut Vec<String>, r: &Resources) {
    let mut opt = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            a.push(format!("--{name}={v}"));
        }
    };
    opt("partition", r.partition.clone());
    opt("qos", r.qos.clone());
    opt("account", r.account.clone());
    opt("reservation", r.reservation.clone());
    opt(
        "time",
        r.time_limit.as_ref().map(|t| t.as_str().to_string()),
    );
    opt("nodes", r.nodes.map(|n| n.to_string()));
    opt("ntasks", r.ntasks.map(|n| n.to_string()));
    opt("cpus-per-task", r.cpus_per_task.map(|n| n.to_string()));
    opt("mem", r.mem.as_ref().map(|m| m.as_str().to_string()));
    opt(
        "mem-per-cpu",
        r.mem_per_cpu.as_ref().map(|m| m.as_str().to_string()),
    );
    opt("gpus-per-node", r.gpus_per_node.map(|n| n.to_string()));
    opt("constraint", r.constraint.clone());
}

/// The command that starts the job: `sbatch` in Slurm mode, the local supervisor in local mode.
pub fn submit_argv(plan: &RunPlan, operator_exe: &str) -> Vec<String> {
    match plan.mode {
        ClusterMode::Slurm => sbatch_argv(plan),
        ClusterMode::Local => vec![
            operator_exe.to_string(),
            "local-supervise".into(),
            "--run-dir".into(),
            plan.run_dir.clone(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EnvVar, Payload};

    fn spec(payload: Payload) -> SlurmAssetSpec {
        serde_json::from_value(serde_json::json!({"assetKey": "a/b", "payload": {"inline": "x"}}))
            .map(|mut s: SlurmAssetSpec| {
                s.payload = payload;
                s
            })
            .unwrap()
    }

    fn id() -> RunId {
        RunId {
            namespace: "default".into(),
            name: "a".into(),
            uid: "u1".into(),
            run: 2,
            attempt: 1,
            epoch: 0,
            session: false,
        }
    }

    /// The plan of `s` on a Slurm cluster with `remote_base`, for the login home `/home/u`.
    fn slurm_plan(s: &SlurmAssetSpec, remote_base: &str) -> RunPlan {
        let cluster: SlurmClusterSpec =
            serde_json::from_value(serde_json::json!({"mode": "slurm", "remoteBase": remote_base}))
                .unwrap();
        let ctx = PlanContext {
            asset_dir: Path::new("/m"),
            cluster: &cluster,
            cluster_dir: Path::new("/m"),
            default_base: "/x".into(),
            remote_home: Some("/home/u"),
        };
        plan(s, id(), &ctx).unwrap()
    }

    #[test]
    fn components_become_one_heterogeneous_sbatch_and_a_components_file() {
        let mut s = spec(Payload {
            inline: Some("x".into()),
            ..Default::default()
        });
        s.resources.mem = Some(crate::quantity::Memory::parse("100M").unwrap());
        s.components = serde_json::from_value(serde_json::json!([
            {"name": "cpu", "resources": {"ntasks": 1, "extraSbatchArgs": ["--exclusive"]}},
            {"name": "gpu", "resources": {"gpusPerNode": 1, "mem": "2G"}},
        ]))
        .unwrap();
        let p = slurm_plan(&s, "/b");
        let argv = sbatch_argv(&p);
        let colon = argv
            .iter()
            .position(|a| a == ":")
            .expect("a second component");
        let (first, second) = argv.split_at(colon);
        // The operator's own options (and the tag) are the job's; each component has its
        // resources, the asset's as their defaults.
        assert!(first.contains(&"--ntasks=1".to_string()), "{argv:?}");
        assert!(first.contains(&"--mem=100M".to_string()), "{argv:?}");
        assert!(first.contains(&"--exclusive".to_string()), "{argv:?}");
        assert!(first.iter().any(|a| a.starts_with("--output=")));
        assert!(
            second.contains(&"--gpus-per-node=1".to_string()),
            "{argv:?}"
        );
        assert!(second.contains(&"--mem=2G".to_string()), "{argv:?}");
        assert!(!second.iter().any(|a| a.starts_with("--output=")));
        assert_eq!(argv.iter().filter(|a| *a == ":").count(), 1);
        assert!(argv.last().unwrap().ends_with("/job.sh"));
        let script = render_script(&p);
        assert!(script.contains("__sao_names=(cpu gpu)"), "{script}");
        assert!(script.contains("> components.json"));
        // Local mode has no heterogeneous jobs: the plan says so, naming the field.
        let cluster = SlurmClusterSpec::default();
        let ctx = PlanContext {
            asset_dir: Path::new("/m"),
            cluster: &cluster,
            cluster_dir: Path::new("/m"),
            default_base: "/x".into(),
            remote_home: None,
        };
        assert!(
            plan(&s, id(), &ctx)
                .unwrap_err()
                .starts_with("spec.components:")
        );
    }

    #[test]
    fn components_with_payloads_start_their_own_launchers_over_their_own_groups() {
        let mut s = spec(Payload::default());
        s.launcher.type_ = LauncherType::Ray;
        s.components = serde_json::from_value(serde_json::json!([
            {"name": "etl", "payload": {"inline": "a"}, "launcher": {"type": "spark"}},
            {"name": "tune", "payload": {"inline": "b"}},
            {"name": "plain", "payload": {"inline": "c"}, "launcher": {"type": "bash"}},
        ]))
        .unwrap();
        let p = slurm_plan(&s, "/b");
        let job = render_script(&p);
        // The job starts no cluster of its own: each component starts its own, pinned to
        // its group's first node.
        assert!(!job.contains("__sao_ray_up"), "{job}");
        assert!(!job.contains("__sao_spark_up"), "{job}");
        assert!(job.contains(
            "srun --het-group=1 --nodes=1 --ntasks=1 -w \"$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_1\" | head -n1)\""
        ), "{job}");
        let [etl, tune, plain] = &p.component_plans[..] else {
            panic!("three component plans");
        };
        let etl = render_script(etl);
        assert!(etl.contains("__sao_spark_up"));
        assert!(etl.contains("SLURM_JOB_NODELIST_HET_GROUP_0"));
        // The asset's launcher is the default of a component's.
        let tune = render_script(tune);
        assert!(tune.contains("__sao_ray_components=([1]=tune)"), "{tune}");
        let plain = render_script(plain);
        assert!(!plain.contains("__sao_ray_up") && !plain.contains("__sao_spark_up"));
    }

    #[test]
    fn hostile_strings_are_quoted_in_script_and_sbatch() {
        let mut s = spec(Payload {
            command: Some(vec!["echo".into(), "$(id)".into()]),
            args: vec!["a;b".into(), "it's".into()],
            ..Default::default()
        });
        s.env = vec![EnvVar {
            name: "X".into(),
            value: Some("`rm -rf /`".into()),
            value_from: None,
        }];
        s.resources.partition = Some("p; rm".into());
        let p = slurm_plan(&s, "/base dir");
        assert_eq!(p.run_dir, "/base dir/runs/default/a/2-1");
        let script = render_script(&p);
        assert!(script.contains("cd '/base dir/runs/default/a/2-1' || exit 1"));
        assert!(script.contains("export X='`rm -rf /`'"));
        assert!(script.contains("echo '$(id)' 'a;b' 'it'\\''s' < /dev/null"));
        let argv = sbatch_argv(&p);
        assert!(argv.contains(&"--partition=p; rm".to_string()));
        assert!(argv.contains(&"--job-name=sao.u1.2.1".to_string()));
        assert_eq!(argv.last().unwrap(), "/base dir/runs/default/a/2-1/job.sh");
    }

    #[test]
    fn tilde_means_the_login_home_on_a_cluster() {
        let s = spec(Payload {
            remote_path: Some("~/bin/run.sh".into()),
            ..Default::default()
        });
        for (base, want) in [
            ("~", "/home/u/runs/default/a/2-1"),
            ("~/", "/home/u/runs/default/a/2-1"),
            ("~/scratch", "/home/u/scratch/runs/default/a/2-1"),
            ("$HOME/scratch", "/home/u/scratch/runs/default/a/2-1"),
            ("${HOME}", "/home/u/runs/default/a/2-1"),
            ("scratch", "/home/u/scratch/runs/default/a/2-1"),
            ("/abs", "/abs/runs/default/a/2-1"),
        ] {
            let p = slurm_plan(&s, base);
            assert_eq!(p.run_dir, want, "{base}");
            assert_eq!(p.argv, ["bash", "/home/u/bin/run.sh"]);
        }
    }

    #[test]
    fn python_path_payload_uses_python3() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.py"), "print(1)").unwrap();
        let s = spec(Payload {
            path: Some("t.py".into()),
            ..Default::default()
        });
        let cluster = SlurmClusterSpec::default();
        let ctx = PlanContext {
            asset_dir: dir.path(),
            cluster: &cluster,
            cluster_dir: dir.path(),
            default_base: dir.path().join(".runs"),
            remote_home: None,
        };
        let p = plan(&s, id(), &ctx).unwrap();
        assert_eq!(p.argv[0], "python3");
        assert!(p.argv[1].ends_with("/runs/default/a/2-1/payload-t.py"));
        assert_eq!(p.payload_file.as_ref().unwrap().1, b"print(1)");
        assert_eq!(p.dagster_run_id, "u1-2");
    }
}
