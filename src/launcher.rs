//! Launchers that start a cluster inside the allocation before the payload: Ray (a head on the
//! job's first node, one worker per other node). The fragment is part of the job script, so it
//! runs the same in local mode (one node, the operator's host) and in Slurm mode.
//!
//! The script reports what it started in the run dir's [`LAUNCHER_FILE`] (`key=value` lines),
//! which the poll reads back into `status.launcher`.

use crate::api::{LauncherStatus, RaySettings};
use crate::shell::{join, quote};

/// Facts the launcher writes into the run dir while it starts the cluster.
pub const LAUNCHER_FILE: &str = "launcher";
/// Bytes of [`LAUNCHER_FILE`] read back: it holds a handful of short lines.
pub const LAUNCHER_FILE_MAX: usize = 4096;

/// `ray start` options the launcher sets itself; `extraStartArgs` may not repeat them.
pub const RAY_OWNED_OPTIONS: &[&str] = &[
    "--head",
    "--address",
    "--block",
    "--port",
    "--node-ip-address",
    "--temp-dir",
    "--num-cpus",
    "--num-gpus",
    "--object-store-memory",
    "--include-dashboard",
    "--dashboard-host",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--ray-client-server-port",
    "--disable-usage-stats",
];

/// Whether an `extraStartArgs` entry sets an option the launcher owns.
pub fn ray_option_owned(arg: &str) -> bool {
    let name = arg.split('=').next().unwrap_or(arg);
    RAY_OWNED_OPTIONS.contains(&name)
}

/// The shell functions `__sao_ray_up` (start the cluster; non-zero when it could not, with
/// the reason in the launcher file) and `__sao_ray_down` (always safe to call, idempotent).
/// `gpus_default` is the job's `gpusPerNode`.
pub fn ray_functions(ray: &RaySettings, gpus_default: Option<u32>) -> String {
    let mut common: Vec<String> = vec![];
    if let Some(m) = &ray.object_store_memory {
        common.push(format!("--object-store-memory={}", m.bytes()));
    }
    if let Some(g) = ray.gpus_per_node.or(gpus_default) {
        common.push(format!("--num-gpus={g}"));
    }
    common.extend(ray.extra_start_args.iter().cloned());
    let common = join(&common);
    let cpus = ray.cpus_per_node.map_or_else(
        || "${SLURM_CPUS_ON_NODE:-$(nproc)}".to_string(),
        |c| c.to_string(),
    );
    let head_ip = ray
        .head_address
        .as_deref()
        .map_or_else(String::new, |a| format!("--node-ip-address={}", quote(a)));
    let dashboard = if ray.dashboard {
        "--include-dashboard=true --dashboard-host=0.0.0.0 --dashboard-port=\"$dash\""
    } else {
        "--include-dashboard=false"
    };
    let head_override = ray.head_address.as_deref().map(quote).unwrap_or_default();
    let timeout = ray.start_timeout_secs();
    format!(
        r#"# Ray: a head here, a worker on every other node; torn down before the exit file.
export RAY_USAGE_STATS_ENABLED=0
# Per job and short: Ray's socket paths live under it and must stay under 108 bytes.
__sao_ray_tmp=/tmp/sao-ray-${{SLURM_JOB_ID:-local-$$}}
__sao_ray_group=''
__sao_ray_workers=''
__sao_ray_down_done=''
__sao_fact() {{ printf '%s=%s\n' "$1" "$2" >> {LAUNCHER_FILE}; }}
__sao_fail() {{ __sao_fact error "$1"; echo "slurm-asset-operator: $1" >&2; return 1; }}
# Free TCP ports, as many as asked: two Ray clusters on one node must not collide.
__sao_ports() {{ python3 -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"; }}
# Waits until LOG says the Ray runtime started, PID died, or the deadline passed.
__sao_ray_wait() {{
  while ! grep -q 'Ray runtime started' "$1" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || return 2
    [ "$(date +%s)" -lt "$__sao_ray_deadline" ] || return 3
    sleep 0.2
  done
}}
__sao_ray_show() {{ sed "s/^/[ray $2] /" "$1" >&2 2>/dev/null; }}
__sao_ray_up() {{
  local nodes dash gcs dal dag met rea addr i n pid rc joined=1 missing=''
  if [ -n "${{SLURM_JOB_NODELIST:-}}" ]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    nodes=("$(hostname -s)")
  fi
  printf 'type=ray\nnodes_expected=%s\n' "${{#nodes[@]}}" > {LAUNCHER_FILE}
  command -v ray >/dev/null || {{ __sao_fail "ray is not installed in the job's environment (no ray command)"; return; }}
  __sao_ray_deadline=$(( $(date +%s) + {timeout} ))
  read -r gcs dash dal dag met rea <<< "$(__sao_ports 6)"
  [ -n "$rea" ] || {{ __sao_fail "could not choose free ports for the Ray head"; return; }}
  mkdir -p "$__sao_ray_tmp"
  setsid ray start --head --block --disable-usage-stats --port="$gcs" {head_ip} {dashboard} \
    --dashboard-agent-listen-port="$dal" --dashboard-agent-grpc-port="$dag" \
    --metrics-export-port="$met" --runtime-env-agent-port="$rea" \
    --num-cpus={cpus} --temp-dir="$__sao_ray_tmp/0" {common} > ray-head.log 2>&1 < /dev/null &
  __sao_ray_group=$!
  __sao_ray_wait ray-head.log "$__sao_ray_group"; rc=$?
  __sao_ray_show ray-head.log "${{nodes[0]}} head"
  case $rc in
    0) ;;
    2) __sao_fail "the Ray head on ${{nodes[0]}} exited while starting (see its lines in the log)"; return ;;
    *) __sao_fail "the Ray head on ${{nodes[0]}} did not start within {timeout}s"; return ;;
  esac
  addr={head_override}
  if [ -z "$addr" ]; then
    addr=$(grep -o "ray start --address='[^']*'" ray-head.log | head -n1 | sed "s/.*='\(.*\):[0-9]*'/\1/")
  fi
  [ -n "$addr" ] || addr=$(hostname -I | awk '{{print $1}}')
  export RAY_ADDRESS="$addr:$gcs"
  __sao_fact head_address "$RAY_ADDRESS"
  {dash_fact}
  for i in $(seq 1 $(( ${{#nodes[@]}} - 1 ))); do
    n=${{nodes[$i]}}
    read -r dal dag met rea <<< "$(__sao_ports 4)"
    srun --overlap --nodes=1 --ntasks=1 -w "$n" ray start --block --disable-usage-stats \
      --address="$RAY_ADDRESS" --dashboard-agent-listen-port="$dal" --dashboard-agent-grpc-port="$dag" \
      --metrics-export-port="$met" --runtime-env-agent-port="$rea" \
      --num-cpus={cpus} --temp-dir="$__sao_ray_tmp/$i" {common} > "ray-$i.log" 2>&1 < /dev/null &
    __sao_ray_workers="$__sao_ray_workers $!"
  done
  i=0
  for pid in $__sao_ray_workers; do
    i=$(( i + 1 )); n=${{nodes[$i]}}
    __sao_ray_wait "ray-$i.log" "$pid"; rc=$?
    __sao_ray_show "ray-$i.log" "$n"
    case $rc in
      0) joined=$(( joined + 1 )) ;;
      2) missing="$missing $n (its ray start exited)" ;;
      *) missing="$missing $n (not joined within {timeout}s)" ;;
    esac
  done
  __sao_fact nodes_joined "$joined"
  [ -z "$missing" ] || {{ __sao_fail "Ray nodes did not join:$missing"; return; }}
}}
__sao_ray_down() {{
  [ -z "$__sao_ray_down_done" ] || return 0
  __sao_ray_down_done=1
  local pid _
  for pid in $__sao_ray_workers; do kill -TERM "$pid" 2>/dev/null; done
  [ -z "$__sao_ray_group" ] || kill -TERM -- "-$__sao_ray_group" 2>/dev/null
  for _ in $(seq 1 50); do
    [ -n "$__sao_ray_group" ] && kill -0 -- "-$__sao_ray_group" 2>/dev/null && {{ sleep 0.1; continue; }}
    break
  done
  [ -z "$__sao_ray_group" ] || kill -KILL -- "-$__sao_ray_group" 2>/dev/null
  for pid in $__sao_ray_workers; do kill -KILL "$pid" 2>/dev/null; done
  wait $__sao_ray_workers $__sao_ray_group 2>/dev/null
  if [ -n "$__sao_ray_workers" ]; then
    srun --overlap --nodes="${{SLURM_JOB_NUM_NODES:-1}}" --ntasks-per-node=1 rm -rf "$__sao_ray_tmp" 2>/dev/null
  fi
  rm -rf "$__sao_ray_tmp"
  return 0
}}
"#,
        dash_fact = if ray.dashboard {
            "__sao_fact dashboard_port \"$dash\""
        } else {
            ""
        },
    )
}

/// Reads the launcher file's `key=value` lines into the status; unknown keys are skipped and
/// every value is bounded (the file is written by a job: hostile).
pub fn parse_facts(bytes: &[u8]) -> Option<LauncherStatus> {
    let bytes = &bytes[..bytes.len().min(LAUNCHER_FILE_MAX)];
    let text = String::from_utf8_lossy(bytes);
    let mut st = LauncherStatus::default();
    let clean = |v: &str| {
        let v: String = v.chars().filter(|c| !c.is_control()).collect();
        crate::limits::truncate(v.trim(), 512).to_string()
    };
    let mut any = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        any = true;
        match k {
            "type" => st.type_ = Some(clean(v)),
            "head_address" => st.head_address = Some(clean(v)),
            "dashboard_port" => st.dashboard_port = v.trim().parse().ok(),
            "nodes_joined" => st.nodes_joined = v.trim().parse().ok(),
            "nodes_expected" => st.nodes_expected = v.trim().parse().ok(),
            "error" => st.error = Some(clean(v)),
            "reason" if v.bytes().all(|b| b.is_ascii_alphanumeric()) && v.len() <= 64 => {
                st.reason = Some(v.to_string())
            }
            _ => {}
        }
    }
    any.then_some(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_own_options_are_recognised_with_or_without_a_value() {
        assert!(ray_option_owned("--port=1"));
        assert!(ray_option_owned("--head"));
        assert!(ray_option_owned("--temp-dir"));
        assert!(!ray_option_owned("--resources={\"a\": 1}"));
        assert!(!ray_option_owned("--portal"));
    }

    #[test]
    fn facts_are_bounded_and_unknown_keys_skipped() {
        let long = "x".repeat(10_000);
        let text = format!(
            "type=ray\nhead_address=10.0.0.1:6379\ndashboard_port=8265\nnodes_joined=2\nbogus=1\nerror={long}\n"
        );
        let st = parse_facts(text.as_bytes()).unwrap();
        assert_eq!(st.type_.as_deref(), Some("ray"));
        assert_eq!(st.head_address.as_deref(), Some("10.0.0.1:6379"));
        assert_eq!(st.dashboard_port, Some(8265));
        assert_eq!(st.nodes_joined, Some(2));
        // The file is read up to its bound: the long error is cut with it.
        assert!(st.error.unwrap().len() <= 512 + 3);
        assert_eq!(parse_facts(b"no facts here"), None);
        assert_eq!(
            parse_facts(b"error=a\x1b[31mb\n").unwrap().error.as_deref(),
            Some("a[31mb")
        );
    }

    #[test]
    fn settings_are_quoted_and_the_dashboard_is_off_unless_asked() {
        let ray = RaySettings {
            extra_start_args: vec!["--resources={\"x\": 1}; rm -rf /".into()],
            head_address: Some("head$(id)".into()),
            ..Default::default()
        };
        let f = ray_functions(&ray, Some(2));
        assert!(f.contains("'--resources={\"x\": 1}; rm -rf /'"));
        assert!(f.contains("--node-ip-address='head$(id)'"));
        assert!(f.contains("addr='head$(id)'"));
        assert!(f.contains("--num-gpus=2"));
        assert!(f.contains("--include-dashboard=false"));
        assert!(!f.contains("dashboard_port"));
    }
}
