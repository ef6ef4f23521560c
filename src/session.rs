//! Sessions: one allocation shared by many assets as job steps. Pure: no I/O.
//!
//! The allocation is tracked as an internal asset (its submission, adoption after a restart,
//! polling, cancellation and clean-up are the assets' own), whose payload is the session's
//! agent: a loop inside the allocation that starts the steps the operator queues as files
//! in its run dir (`queue/<tag>` → `started/<tag>`, a rename, so a step never starts twice),
//! keeps the concurrency limit, refuses steps near the end and ends the allocation when idle.

use crate::api::{
    Launcher, LauncherType, Payload, Phase, Resources, SessionPhase, SlurmAssetSpec,
    SlurmAssetStatus, SlurmSessionSpec, SlurmSessionStatus,
};
use jiff::Timestamp;

/// Where the agent finds queued steps, relative to the session's run dir.
pub const QUEUE_DIR: &str = "queue";
/// Where a claimed step's request moves before it starts.
pub const STARTED_DIR: &str = "started";
/// The file a step writes at its start: `<job id>.<step id>`, then its node list.
pub const STEP_FILE: &str = "step";
/// In a step's run dir: the session dir it was queued in.
pub const SESSION_FILE: &str = ".session";
/// In a step's run dir: the step was cancelled; if it starts anyway, it ends at once.
pub const CANCELLED_FILE: &str = "cancelled";

/// The agent: bash, generated, settings from its environment. It never evaluates a request:
/// line 1 is the step's run dir, the others are `srun` options, each one argument.
pub const AGENT_SCRIPT: &str = r#"# slurm-asset-operator session agent: starts the steps queued in ./queue inside this
# allocation, at most SAO_SESSION_MAX_STEPS at once; ends after SAO_SESSION_IDLE_SECS idle.
set -u
max=${SAO_SESSION_MAX_STEPS:-4}
idle=${SAO_SESSION_IDLE_SECS:-300}
life=${SAO_SESSION_LIFETIME_SECS:-0}
margin=${SAO_SESSION_DRAIN_SECS:-60}
limit=${SAO_SESSION_TIME_LIMIT_SECS:-0}
mkdir -p queue started
start=$(date +%s)
last_busy=$start
deadline=0
[ "$limit" -gt 0 ] && deadline=$(( start + limit ))
if [ "$life" -gt 0 ] && { [ "$deadline" -eq 0 ] || [ $(( start + life )) -lt "$deadline" ]; }; then
  deadline=$(( start + life ))
fi
mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null)
mem_default=''
if [ -n "${SLURM_MEM_PER_NODE:-}" ] && [ "$SLURM_MEM_PER_NODE" -gt 0 ] 2>/dev/null; then
  mem_default="--mem=$(( SLURM_MEM_PER_NODE / max ))M"
fi
declare -A pids=()
# A refused step learns why through its own run dir: the launcher file and an exit file.
refuse() {
  printf 'type=session\nreason=SessionEnding\nerror=%s\n' "$2" > "$1/launcher"
  printf 'exit_code=125\nstart=%s\nend=%s\n' "$now" "$now" > "$1/exit.tmp" && mv -f "$1/exit.tmp" "$1/exit"
  echo "session agent: refused $1: $2"
}
echo "session agent: job $SLURM_JOB_ID on ${nodes[*]}; up to $max steps at once; idle timeout ${idle}s"
while :; do
  now=$(date +%s)
  for t in "${!pids[@]}"; do
    if ! kill -0 "${pids[$t]}" 2>/dev/null; then
      wait "${pids[$t]}"
      echo "session agent: step $t ended (srun exit $?)"
      unset "pids[$t]"
      last_busy=$now
    fi
  done
  draining=0
  if [ "$deadline" -gt 0 ] && [ $(( deadline - now )) -lt "$margin" ]; then draining=1; fi
  for t in $(ls -1tr queue 2>/dev/null); do
    [ "$draining" -eq 1 ] || [ "${#pids[@]}" -lt "$max" ] || break
    mapfile -t req < "queue/$t" || continue
    # The rename is the claim: a request is started once, whatever happens after.
    mv "queue/$t" "started/$t" 2>/dev/null || continue
    d=${req[0]:-}
    [ -d "$d" ] || { echo "session agent: $t: no run dir"; continue; }
    if [ "$draining" -eq 1 ]; then
      refuse "$d" "the session's allocation ends in $(( deadline - now ))s: no new steps"
      continue
    fi
    args=("${req[@]:1}")
    case " ${args[*]} " in *" --mem="*|*" --overlap "*) ;; *) [ -z "$mem_default" ] || args+=("$mem_default") ;; esac
    for i in "${!args[@]}"; do [ "${args[$i]}" = "@HEAD" ] && args[$i]=${nodes[0]}; done
    srun "${args[@]}" bash "$d/job.sh" < /dev/null &
    pids[$t]=$!
    last_busy=$now
    echo "session agent: step $t started"
  done
  if [ "${#pids[@]}" -eq 0 ] && [ -z "$(ls -A queue 2>/dev/null)" ]; then
    if [ $(( now - last_busy )) -ge "$idle" ]; then
      echo "session agent: idle for ${idle}s; ending the allocation"
      exit 0
    fi
    if [ "$life" -gt 0 ] && [ "$now" -ge $(( start + life )) ]; then
      echo "session agent: maximum lifetime reached; ending the allocation"
      exit 0
    fi
  fi
  sleep 1
done
"#;

/// The internal asset that holds the session's allocation: the agent as its payload, the
/// session's resources, and (with `ray`) the Ray launcher, so that the warm cluster starts
/// before the agent and is torn down after it.
pub fn allocation_spec(name: &str, s: &SlurmSessionSpec) -> SlurmAssetSpec {
    let env = |k: &str, v: String| crate::api::EnvVar {
        name: k.into(),
        value: Some(v),
        value_from: None,
    };
    let mut vars = vec![
        env("SAO_SESSION_MAX_STEPS", s.max_steps().to_string()),
        env("SAO_SESSION_IDLE_SECS", s.idle_secs().to_string()),
        env("SAO_SESSION_DRAIN_SECS", s.drain_secs().to_string()),
    ];
    if let Some(l) = &s.max_lifetime {
        vars.push(env(
            "SAO_SESSION_LIFETIME_SECS",
            l.duration().as_secs().to_string(),
        ));
    }
    SlurmAssetSpec {
        asset_key: format!("session/{name}"),
        cluster_ref: Some(s.cluster_ref.clone()),
        run_key: None,
        payload: Payload {
            inline: Some(AGENT_SCRIPT.to_string()),
            interpreter: Some(vec!["bash".into()]),
            ..Default::default()
        },
        launcher: Launcher {
            type_: if s.ray.is_some() {
                LauncherType::Ray
            } else {
                LauncherType::Bash
            },
            ray: s.ray.clone(),
            spark: None,
        },
        resources: s.resources.clone(),
        env: vars,
        extras: None,
        pipes_context: None,
        environment: crate::api::EnvironmentSettings {
            pre_deployed_env_path: s.pre_deployed_env_path.clone(),
            ..Default::default()
        },
        session_ref: None,
        retry: Default::default(),
        cleanup_on_failure: false,
        debug: false,
        suspend: false,
        components: vec![],
    }
}

/// Tells the agent the allocation's time limit (the session's, else the cluster's queue
/// default), so that it refuses steps near the end whatever set the limit.
pub fn keep_to_time_limit(allocation: &mut SlurmAssetSpec, queue: &Resources) {
    if let Some(t) = allocation
        .resources
        .merged_over(queue)
        .time_limit
        .and_then(|t| t.seconds())
    {
        allocation.env.push(crate::api::EnvVar {
            name: "SAO_SESSION_TIME_LIMIT_SECS".into(),
            value: Some(t.to_string()),
            value_from: None,
        });
    }
}

/// Where a step goes: the session's run dir and allocation, and the step's `srun` options.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub session_dir: String,
    pub job_id: String,
    pub srun: Vec<String>,
}

/// The `srun` options of an asset's step: its own resources (not the cluster's queue
/// defaults, which shaped the allocation), its tag as the step's name (sacct finds it), and
/// its run dir's log files. A Ray asset's driver runs beside the warm cluster on its head.
pub fn step_options(r: &Resources, tag: &str, run_dir: &str, ray_driver: bool) -> Vec<String> {
    let mut a = vec![];
    if ray_driver {
        a.extend([
            "--overlap".to_string(),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            "-w".into(),
            "@HEAD".into(),
        ]);
    } else {
        a.push("--exact".into());
        a.push(format!("--ntasks={}", r.ntasks.unwrap_or(1)));
        a.push(format!("--cpus-per-task={}", r.cpus_per_task.unwrap_or(1)));
        if let Some(n) = r.nodes {
            a.push(format!("--nodes={n}"));
        }
        if let Some(m) = &r.mem {
            a.push(format!("--mem={}", m.as_str()));
        } else if let Some(m) = &r.mem_per_cpu {
            a.push(format!("--mem-per-cpu={}", m.as_str()));
        }
        if let Some(g) = r.gpus_per_node {
            a.push(format!("--gpus-per-node={g}"));
        }
    }
    if let Some(t) = &r.time_limit {
        a.push(format!("--time={}", t.as_str()));
    }
    a.extend([
        format!("--job-name={tag}"),
        format!("--chdir={run_dir}"),
        format!("--output={run_dir}/{}", crate::jobscript::STDOUT_FILE),
        format!("--error={run_dir}/{}", crate::jobscript::STDERR_FILE),
        "--input=none".into(),
    ]);
    a
}

/// The session's deadline: its allocation's start plus the time limit (or the maximum
/// lifetime, if sooner).
pub fn deadline(
    s: &SlurmSessionSpec,
    alloc: &SlurmAssetStatus,
    limit_secs: Option<u64>,
) -> Option<Timestamp> {
    let start = alloc.start_time?;
    let secs = match (
        limit_secs,
        s.max_lifetime.as_ref().map(|l| l.duration().as_secs()),
    ) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    start
        .checked_add(jiff::SignedDuration::from_secs(secs as i64))
        .ok()
}

/// Where an asset's step goes in its session's allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct StepTarget {
    /// The session's run dir (the agent's queue is in it).
    pub dir: String,
    pub job_id: String,
    /// A Ray asset: its driver runs on the session's warm Ray cluster.
    pub ray_driver: bool,
}

/// Where `asset`'s step goes in session `name` (its spec and its status as last written):
/// `Err` says why not now, and whether to wait (`true`: not up yet) or fail (`false`).
pub fn place(
    asset: &SlurmAssetSpec,
    name: &str,
    session: &SlurmSessionSpec,
    status: &SlurmSessionStatus,
) -> Result<StepTarget, (String, bool)> {
    if asset.cluster_ref.as_deref() != Some(session.cluster_ref.as_str()) {
        return Err((
            format!(
                "spec.clusterRef: must be {:?}, the cluster of SlurmSession {name:?}",
                session.cluster_ref
            ),
            false,
        ));
    }
    let ray_driver = asset.launcher.type_ == LauncherType::Ray;
    if ray_driver && session.ray.is_none() {
        return Err((
            format!(
                "spec.launcher: a Ray asset in a session runs on the session's Ray cluster, and SlurmSession {name:?} has no ray"
            ),
            false,
        ));
    }
    accepts(
        status,
        asset
            .resources
            .time_limit
            .as_ref()
            .and_then(|t| t.seconds()),
        session.drain_secs(),
    )
    .map_err(|(m, wait)| (format!("SlurmSession {name:?}: {m}"), wait))?;
    Ok(StepTarget {
        dir: status.allocation.remote_run_dir.clone().unwrap_or_default(),
        job_id: status.allocation.job_id.clone().unwrap_or_default(),
        ray_driver,
    })
}

/// Whether a step may go to the session now; `Err` says why not, and whether to wait
/// (`true`: the session is not up yet) or fail (`false`: it has ended, or ends too soon).
pub fn accepts(
    status: &SlurmSessionStatus,
    step_limit_secs: Option<u64>,
    drain_secs: u64,
) -> Result<(), (String, bool)> {
    match status.phase {
        SessionPhase::Running => {}
        SessionPhase::Pending | SessionPhase::Queued => {
            return Err((
                format!(
                    "waiting for the session's allocation ({})",
                    status.phase.as_str()
                ),
                true,
            ));
        }
        SessionPhase::Draining => {
            return Err((
                "the session is draining: it takes no new steps".into(),
                false,
            ));
        }
        SessionPhase::Ended | SessionPhase::Failed => {
            return Err((
                format!(
                    "the session has {}{}",
                    if status.phase == SessionPhase::Ended {
                        "ended"
                    } else {
                        "failed"
                    },
                    status
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                false,
            ));
        }
    }
    if status.allocation.remote_run_dir.is_none() || status.allocation.job_id.is_none() {
        return Err((
            "waiting for the session's allocation to report its run dir".into(),
            true,
        ));
    }
    if let Some(left) = status.remaining_seconds {
        let need = drain_secs.max(step_limit_secs.unwrap_or(0)) as i64;
        if left < need {
            return Err((
                format!("the session's allocation ends in {left}s; this step needs {need}s"),
                false,
            ));
        }
    }
    Ok(())
}

/// The session's status from its allocation's and its assets' (`(name, phase)` of each asset
/// naming it). `limit_secs` is the allocation's time limit; `previous` the conditions written
/// last (their transition times stay).
pub fn status(
    s: &SlurmSessionSpec,
    previous: &[crate::api::Condition],
    alloc: &SlurmAssetStatus,
    members: &[(String, Phase)],
    limit_secs: Option<u64>,
    now: Timestamp,
) -> SlurmSessionStatus {
    let deadline = deadline(s, alloc, limit_secs);
    let remaining = deadline.map(|d| d.duration_since(now).as_secs().max(0));
    let ray_up = s.ray.is_none()
        || alloc.launcher.as_ref().is_some_and(|l| {
            l.head_address.is_some() && l.error.is_none() && l.nodes_joined == l.nodes_expected
        });
    let (phase, reason, message) = match alloc.phase {
        Phase::Pending | Phase::Packing | Phase::Uploading | Phase::Submitting => (
            SessionPhase::Pending,
            alloc.reason.clone(),
            alloc.message.clone(),
        ),
        Phase::Queued => (
            SessionPhase::Queued,
            alloc.reason.clone(),
            alloc.message.clone(),
        ),
        Phase::Running if !ray_up => (
            SessionPhase::Queued,
            Some("StartingRay".into()),
            Some("the allocation runs; its Ray cluster is starting".into()),
        ),
        Phase::Running if remaining.is_some_and(|r| r < s.drain_secs() as i64) => (
            SessionPhase::Draining,
            Some("NearTimeLimit".into()),
            Some(format!(
                "{}s left: running steps go on, new ones are refused",
                remaining.unwrap_or(0)
            )),
        ),
        Phase::Running => (SessionPhase::Running, None, None),
        Phase::Succeeded => (
            SessionPhase::Ended,
            Some("Ended".into()),
            Some("the agent ended the allocation (idle timeout or maximum lifetime)".into()),
        ),
        Phase::Cancelled => (
            SessionPhase::Ended,
            alloc.reason.clone(),
            alloc.message.clone(),
        ),
        Phase::Failed => (
            SessionPhase::Failed,
            alloc.reason.clone(),
            alloc.message.clone(),
        ),
    };
    let mut running = vec![];
    let mut queued = vec![];
    for (name, p) in members {
        match p {
            Phase::Running => running.push(name.clone()),
            Phase::Pending
            | Phase::Packing
            | Phase::Uploading
            | Phase::Submitting
            | Phase::Queued => queued.push(name.clone()),
            _ => {}
        }
    }
    let mut conditions = previous.to_vec();
    crate::conditions::set(
        &mut conditions,
        "Ready",
        phase == SessionPhase::Running,
        phase.as_str(),
        message.as_deref().unwrap_or(""),
        None,
        now,
    );
    SlurmSessionStatus {
        phase,
        reason,
        message,
        job_id: alloc.job_id.clone(),
        nodes: alloc.nodes.clone(),
        start_time: alloc.start_time,
        deadline: if alloc.phase.is_terminal() {
            None
        } else {
            deadline
        },
        remaining_seconds: if alloc.phase.is_terminal() {
            None
        } else {
            remaining
        },
        running_count: running.len() as u32,
        queued_count: queued.len() as u32,
        running_assets: running,
        queued_assets: queued,
        ray: s.ray.as_ref().and(alloc.launcher.clone()),
        conditions,
        allocation: alloc.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(y: &str) -> SlurmSessionSpec {
        serde_saphyr::from_str(y).unwrap()
    }

    #[test]
    fn the_allocation_runs_the_agent_with_the_sessions_settings() {
        let s = spec(
            "clusterRef: hpc\nmaxConcurrentSteps: 2\nidleTimeout: 30s\nmaxLifetime: 1h\nresources: {nodes: 2}\n",
        );
        let a = allocation_spec("s1", &s);
        assert_eq!(a.cluster_ref.as_deref(), Some("hpc"));
        assert_eq!(a.resources.nodes, Some(2));
        assert_eq!(a.launcher.type_, LauncherType::Bash);
        let env: Vec<(String, String)> = a
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap()))
            .collect();
        assert!(env.contains(&("SAO_SESSION_MAX_STEPS".into(), "2".into())));
        assert!(env.contains(&("SAO_SESSION_IDLE_SECS".into(), "30".into())));
        assert!(env.contains(&("SAO_SESSION_LIFETIME_SECS".into(), "3600".into())));
        let ray = allocation_spec("s1", &spec("clusterRef: hpc\nray: {}\n"));
        assert_eq!(ray.launcher.type_, LauncherType::Ray);
    }

    #[test]
    fn step_options_carry_the_assets_own_resources_and_its_tag() {
        let r: Resources =
            serde_saphyr::from_str("cpusPerTask: 2\nmem: 300M\ntimeLimit: '00:05:00'\n").unwrap();
        let o = step_options(&r, "sao.u.1.1", "/r/d", false);
        for want in [
            "--exact",
            "--ntasks=1",
            "--cpus-per-task=2",
            "--mem=300M",
            "--time=00:05:00",
            "--job-name=sao.u.1.1",
            "--output=/r/d/stdout.log",
        ] {
            assert!(o.contains(&want.to_string()), "{want} in {o:?}");
        }
        let o = step_options(&Resources::default(), "t", "/r", true);
        assert!(o.contains(&"--overlap".to_string()) && o.contains(&"@HEAD".to_string()));
    }

    #[test]
    fn a_session_takes_steps_only_while_running_with_time_to_spare() {
        let s = spec("clusterRef: hpc\ndrainBefore: 60s\n");
        let now = Timestamp::from_second(10_000).unwrap();
        let mut alloc = SlurmAssetStatus {
            phase: Phase::Queued,
            ..Default::default()
        };
        let st = status(&s, &[], &alloc, &[], Some(600), now);
        assert_eq!(st.phase, SessionPhase::Queued);
        assert!(accepts(&st, None, 60).unwrap_err().1, "queued: wait");
        alloc.phase = Phase::Running;
        alloc.job_id = Some("7".into());
        alloc.remote_run_dir = Some("/r".into());
        alloc.start_time = Some(Timestamp::from_second(10_000 - 500).unwrap());
        // 100 s left of 600: running, but a step of 5 minutes does not fit.
        let st = status(
            &s,
            &[],
            &alloc,
            &[
                ("a".into(), Phase::Running),
                ("b".into(), Phase::Submitting),
            ],
            Some(600),
            now,
        );
        assert_eq!(st.phase, SessionPhase::Running);
        assert_eq!(st.remaining_seconds, Some(100));
        assert_eq!(
            (st.running_assets.clone(), st.queued_assets.clone()),
            (vec!["a".to_string()], vec!["b".to_string()])
        );
        assert!(accepts(&st, None, 60).is_ok());
        let (why, wait) = accepts(&st, Some(300), 60).unwrap_err();
        assert!(!wait && why.contains("ends in 100s"), "{why}");
        // 30 s left: draining.
        let st = status(&s, &[], &alloc, &[], Some(530), now);
        assert_eq!(st.phase, SessionPhase::Draining);
        assert!(!accepts(&st, None, 60).unwrap_err().1);
        alloc.phase = Phase::Succeeded;
        let st = status(&s, &[], &alloc, &[], Some(600), now);
        assert_eq!(st.phase, SessionPhase::Ended);
        assert_eq!(st.remaining_seconds, None);
        assert!(!accepts(&st, None, 60).unwrap_err().1);
    }

    #[test]
    fn a_ray_session_is_ready_once_every_node_joined() {
        let s = spec("clusterRef: hpc\nray: {}\n");
        let mut alloc = SlurmAssetStatus {
            phase: Phase::Running,
            ..Default::default()
        };
        let now = Timestamp::from_second(1).unwrap();
        assert_eq!(
            status(&s, &[], &alloc, &[], None, now).phase,
            SessionPhase::Queued
        );
        alloc.launcher = Some(crate::api::LauncherStatus {
            head_address: Some("10.0.0.1:1".into()),
            nodes_joined: Some(2),
            nodes_expected: Some(2),
            ..Default::default()
        });
        let st = status(&s, &[], &alloc, &[], None, now);
        assert_eq!(st.phase, SessionPhase::Running);
        assert_eq!(st.ray.unwrap().head_address.as_deref(), Some("10.0.0.1:1"));
    }
}
