//! Launchers that start a cluster inside the allocation before the payload: Ray (a head on the
//! job's first node, one worker per other node) and Spark (a standalone master on the first
//! node, a worker on every node). The fragment is part of the job script, so it
//! runs the same in local mode (one node, the operator's host) and in Slurm mode.
//!
//! The script reports what it started in the run dir's [`LAUNCHER_FILE`] (`key=value` lines),
//! which the poll reads back into `status.launcher`.

use crate::api::{LauncherStatus, RaySettings, SparkSettings};
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

/// Helpers of every launcher: facts into the launcher file, a failure with its reason, free
/// ports, a wait for a log line, a log shown with a prefix.
const COMMON_FUNCTIONS: &str = r#"__sao_fact() { printf '%s=%s\n' "$1" "$2" >> launcher; }
__sao_fail() { __sao_fact error "$1"; echo "slurm-asset-operator: $1" >&2; return 1; }
# Free TCP ports, as many as asked: two clusters on one node must not collide.
__sao_ports() { python3 -c 'import socket, sys
ss = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in ss: s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))' "$1"; }
# Waits until LOG ($1) has a line matching $3, PID $2 died (2), or deadline $4 passed (3).
__sao_wait() {
  while ! grep -q "$3" "$1" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || return 2
    [ "$(date +%s)" -lt "$4" ] || return 3
    sleep 0.2
  done
}
# Shows LOG ($1) on stderr, each line prefixed [$2]; only the lines matching $3 if given.
__sao_show() { grep -E "${3:-.}" "$1" 2>/dev/null | sed "s/^/[$2] /" >&2; }
"#;

/// The shell functions `__sao_ray_up` (start the cluster; non-zero when it could not, with
/// the reason in the launcher file) and `__sao_ray_down` (always safe to call, idempotent).
/// `gpus_default` is the job's `gpusPerNode`.
/// `components` names a heterogeneous job's components by het group (empty otherwise): the
/// cluster spans them, each node carrying a Ray resource named after its component. A
/// component's own launcher passes its group alone.
pub fn ray_functions(
    ray: &RaySettings,
    gpus_default: Option<u32>,
    components: &[(usize, String)],
) -> String {
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
    // In a heterogeneous job a node's CPUs are its component's (`$k`).
    let cpus_het = ray
        .cpus_per_node
        .map_or_else(|| "\"$k\"".to_string(), |c| c.to_string());
    // Sparse by group: `([1]=wide)` is component 1 alone.
    let tmp_suffix = match components {
        [(g, _)] => format!("-c{g}"),
        _ => String::new(),
    };
    let components = components
        .iter()
        .map(|(g, n)| format!("[{g}]={}", quote(n)))
        .collect::<Vec<_>>()
        .join(" ");
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
    let raylet_wait = timeout.max(30);
    format!(
        r#"# Ray: a head here, a worker on every other node; torn down before the exit file.
export RAY_USAGE_STATS_ENABLED=0
# A busy node's raylet can take longer than Ray's own 30 s to register with the head: let
# `ray start` wait as long as the launcher does, never less than Ray's own default (unless the
# payload's env says otherwise).
export RAY_raylet_start_wait_time_s=${{RAY_raylet_start_wait_time_s:-{raylet_wait}}}
# Per job and short: Ray's socket paths live under it and must stay under 108 bytes.
__sao_ray_tmp=/tmp/sao-ray-${{SLURM_JOB_ID:-local-$$}}{tmp_suffix}
__sao_ray_group=''
__sao_ray_workers=''
__sao_ray_down_done=''
__sao_ray_components=({components})
{helpers}
__sao_ray_wait() {{ __sao_wait "$1" "$2" 'Ray runtime started' "$__sao_ray_deadline"; }}
__sao_ray_show() {{ __sao_show "$1" "ray $2"; }}
__sao_ray_up() {{
  local nodes dash gcs dal dag met rea addr i n pid rc joined=1 missing='' g v c k
  local -a grp=() cpu=() res=()
  if [ -n "${{SLURM_JOB_NODELIST:-}}" ]; then
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  else
    nodes=("$(hostname -s)")
  fi
  for i in "${{!nodes[@]}}"; do grp[$i]=''; cpu[$i]={cpus}; res[$i]=''; done
  # A heterogeneous job: one cluster over every component's nodes, each node carrying a
  # custom resource named after its component (as many as its CPUs).
  if [ ${{#__sao_ray_components[@]}} -gt 0 ] && [ -n "${{SLURM_HET_SIZE:-}}" ]; then
    nodes=(); grp=(); cpu=(); res=()
    for g in "${{!__sao_ray_components[@]}}"; do
      v=SLURM_JOB_NODELIST_HET_GROUP_$g; c=SLURM_JOB_CPUS_PER_NODE_HET_GROUP_$g
      k=${{!c:-1}}; k=${{k%%[(,]*}}
      while read -r n; do
        [ -n "$n" ] || continue
        nodes+=("$n"); grp+=("$g"); cpu+=({cpus_het}); res+=("{{\"${{__sao_ray_components[$g]}}\": $k}}")
      done < <(scontrol show hostnames "${{!v:-}}")
    done
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
    --num-cpus="${{cpu[0]}}" ${{res[0]:+"--resources=${{res[0]}}"}} --temp-dir="$__sao_ray_tmp/0" {common} > ray-head.log 2>&1 < /dev/null &
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
    srun --overlap ${{grp[$i]:+--het-group=${{grp[$i]}}}} --nodes=1 --ntasks=1 -w "$n" ray start --block --disable-usage-stats \
      --address="$RAY_ADDRESS" --dashboard-agent-listen-port="$dal" --dashboard-agent-grpc-port="$dag" \
      --metrics-export-port="$met" --runtime-env-agent-port="$rea" \
      --num-cpus="${{cpu[$i]}}" ${{res[$i]:+"--resources=${{res[$i]}}"}} --temp-dir="$__sao_ray_tmp/$i" {common} > "ray-$i.log" 2>&1 < /dev/null &
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
  local pid _ g v
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
    if [ ${{#__sao_ray_components[@]}} -gt 0 ] && [ -n "${{SLURM_HET_SIZE:-}}" ]; then
      for g in "${{!__sao_ray_components[@]}}"; do
        v=SLURM_JOB_NUM_NODES_HET_GROUP_$g
        srun --overlap --het-group="$g" --nodes="${{!v:-1}}" --ntasks-per-node=1 rm -rf "$__sao_ray_tmp" 2>/dev/null
      done
    else
      srun --overlap --nodes="${{SLURM_JOB_NUM_NODES:-1}}" --ntasks-per-node=1 rm -rf "$__sao_ray_tmp" 2>/dev/null
    fi
  fi
  rm -rf "$__sao_ray_tmp"
  return 0
}}
"#,
        helpers = COMMON_FUNCTIONS,
        dash_fact = if ray.dashboard {
            "__sao_fact dashboard_port \"$dash\""
        } else {
            ""
        },
    )
}

/// `spark-class`'s size for the master's and the workers' own JVMs (the default, 1G, would
/// take a small node's memory before any executor runs).
const SPARK_DAEMON_MEMORY: &str = "256m";

/// A Spark memory setting: whole mebibytes (`512m`).
fn spark_mem(m: &crate::quantity::Memory) -> String {
    format!("{}m", (m.bytes() / (1024 * 1024)).max(1))
}

/// The shell functions `__sao_spark_up` (a standalone master on the first node, a worker on
/// every node, registered with it; `spark-defaults.conf` in the run dir) and
/// `__sao_spark_down` (always safe to call, idempotent). Without Slurm (local mode) the
/// payload gets `local[*]`; with `masterUrl` it gets that master and nothing is started.
/// `het_group`: a heterogeneous job's component with a launcher of its own: the cluster
/// spans that group's nodes, sized by its allocation.
pub fn spark_functions(spark: &SparkSettings, het_group: Option<usize>) -> String {
    let timeout = spark.start_timeout_secs();
    // Where the nodes, CPUs and memory are: the job's, or the group's (a step's own
    // `SLURM_JOB_NODELIST` is the step's one node).
    let (suffix, srun_group, tmp_suffix) = match het_group {
        Some(g) => (
            format!("_HET_GROUP_{g}"),
            format!(" --het-group={g}"),
            format!("-c{g}"),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let cores = match het_group {
        // `2(x2)` or `2,1`: the first node's, as in the cluster's homogeneous groups.
        Some(g) => {
            format!("cores=${{SLURM_JOB_CPUS_PER_NODE_HET_GROUP_{g}:-1}}; cores=${{cores%%[(,]*}}")
        }
        None => "cores=${SLURM_CPUS_ON_NODE:-$(nproc)}".to_string(),
    };
    let driver_mem = spark
        .driver_memory
        .as_ref()
        .map_or_else(|| "512m".to_string(), spark_mem);
    let exec_mem = spark
        .executor_memory
        .as_ref()
        .map(spark_mem)
        .unwrap_or_default();
    let exec_cores = spark
        .executor_cores
        .map(|c| c.to_string())
        .unwrap_or_default();
    let num_executors = spark
        .num_executors
        .map(|c| c.to_string())
        .unwrap_or_default();
    let external = quote(spark.master_url.as_deref().unwrap_or_default());
    let home = spark
        .spark_home
        .as_deref()
        .map_or_else(|| "\"${SPARK_HOME:-}\"".to_string(), quote);
    let host = quote(spark.master_host.as_deref().unwrap_or_default());
    format!(
        r#"# Spark: a standalone master here, a worker on every node; torn down before the exit file.
__sao_spark_tmp=/tmp/sao-spark-${{SLURM_JOB_ID:-local-$$}}{tmp_suffix}
__sao_spark_group=''
__sao_spark_workers=''
__sao_spark_down_done=''
# Spark is verbose: the log tail gets its start-up milestones and errors; the whole logs
# stay in the run dir.
__sao_spark_lines='ERROR|Exception|Starting Spark|elected leader|Successfully registered|Running Spark version'
{helpers}
# The payload's view of the cluster: SPARK_MASTER_URL, and spark-defaults.conf with the
# settings (SparkSession.builder.getOrCreate() and spark-submit read it).
__sao_spark_conf() {{
  mkdir -p spark-conf "$__sao_spark_tmp/local"
  {{
    echo "spark.master $1"
    echo "spark.driver.memory {driver_mem}"
    [ -z "$__sao_spark_exec_mem" ] || echo "spark.executor.memory $__sao_spark_exec_mem"
    [ -z "$__sao_spark_exec_cores" ] || echo "spark.executor.cores $__sao_spark_exec_cores"
    [ -z "$__sao_spark_cores_max" ] || echo "spark.cores.max $__sao_spark_cores_max"
    echo "spark.ui.port $(__sao_ports 1)"
    echo "spark.local.dir $__sao_spark_tmp/local"
  }} > spark-conf/spark-defaults.conf
  export SPARK_CONF_DIR="$PWD/spark-conf" SPARK_MASTER_URL="$1"
  export PYSPARK_PYTHON="${{PYSPARK_PYTHON:-$(command -v python3)}}"
  __sao_fact head_address "$1"
}}
__sao_spark_up() {{
  local nodes host port ui wui i n pid rc joined=0 missing='' cores mem per
  __sao_spark_exec_mem={exec_mem_q}
  __sao_spark_exec_cores={exec_cores}
  __sao_spark_cores_max=''
  if [ -n {external} ]; then
    printf 'type=spark\n' > {LAUNCHER_FILE}
    __sao_spark_conf {external}
    return 0
  fi
  if [ -z "${{SLURM_JOB_ID:-}}" ]; then
    printf 'type=spark\n' > {LAUNCHER_FILE}
    __sao_spark_conf 'local[*]'
    return 0
  fi
  mapfile -t nodes < <(scontrol show hostnames "${{SLURM_JOB_NODELIST{suffix}:-}}")
  printf 'type=spark\nnodes_expected=%s\n' "${{#nodes[@]}}" > {LAUNCHER_FILE}
  SPARK_HOME={home_q}
  [ -n "$SPARK_HOME" ] || SPARK_HOME=$(python3 -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null)
  [ -x "$SPARK_HOME/bin/spark-class" ] || {{ __sao_fail "no Spark in the job's environment: no bin/spark-class under SPARK_HOME (set launcher.spark.sparkHome or SPARK_HOME, or install pyspark)"; return; }}
  export SPARK_HOME SPARK_DAEMON_MEMORY=${{SPARK_DAEMON_MEMORY:-{daemon_mem}}} SPARK_LOG_DIR="$PWD"
  command -v java >/dev/null || [ -n "${{JAVA_HOME:-}}" ] || {{ __sao_fail "no java in the job's environment (PATH or JAVA_HOME)"; return; }}
  __sao_spark_deadline=$(( $(date +%s) + {timeout} ))
  read -r port ui <<< "$(__sao_ports 2)"
  host={host_q}
  [ -n "$host" ] || host=$(hostname -I 2>/dev/null | awk '{{print $1}}')
  [ -n "$host" ] || host=$(hostname)
  mkdir -p "$__sao_spark_tmp"
  setsid "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master --host "$host" \
    --port "$port" --webui-port "$ui" > spark-master.log 2>&1 < /dev/null &
  __sao_spark_group=$!
  __sao_wait spark-master.log "$__sao_spark_group" 'elected leader' "$__sao_spark_deadline"; rc=$?
  __sao_show spark-master.log "spark ${{nodes[0]}} master" "$__sao_spark_lines"
  case $rc in
    0) ;;
    2) __sao_fail "the Spark master on ${{nodes[0]}} exited while starting (see its lines in the log)"; return ;;
    *) __sao_fail "the Spark master on ${{nodes[0]}} did not start within {timeout}s"; return ;;
  esac
  __sao_fact dashboard_port "$ui"
  {cores}
  # Three quarters of the node's allocation for executors: the worker's own JVM, the master's
  # and the driver's need the rest.
  mem=${{SLURM_MEM_PER_NODE{suffix}:-$(( ${{SLURM_MEM_PER_CPU{suffix}:-1024}} * cores ))}}
  mem=$(( mem * 3 / 4 )); [ "$mem" -ge 256 ] || mem=256
  for i in $(seq 0 $(( ${{#nodes[@]}} - 1 ))); do
    n=${{nodes[$i]}}
    read -r wui <<< "$(__sao_ports 1)"
    srun --overlap{srun_group} --nodes=1 --ntasks=1 -w "$n" "$SPARK_HOME/bin/spark-class" \
      org.apache.spark.deploy.worker.Worker --cores "$cores" --memory "${{mem}}m" \
      --webui-port "$wui" --work-dir "$PWD/spark-work/$i" "spark://$host:$port" \
      > "spark-worker-$i.log" 2>&1 < /dev/null &
    __sao_spark_workers="$__sao_spark_workers $!"
  done
  i=0
  for pid in $__sao_spark_workers; do
    n=${{nodes[$i]}}
    __sao_wait "spark-worker-$i.log" "$pid" 'Successfully registered with master' "$__sao_spark_deadline"; rc=$?
    __sao_show "spark-worker-$i.log" "spark $n" "$__sao_spark_lines"
    case $rc in
      0) joined=$(( joined + 1 )) ;;
      2) missing="$missing $n (its worker exited)" ;;
      *) missing="$missing $n (not registered within {timeout}s)" ;;
    esac
    i=$(( i + 1 ))
  done
  __sao_fact nodes_joined "$joined"
  [ -z "$missing" ] || {{ __sao_fail "Spark workers did not register:$missing"; return; }}
  # Executors: one per worker with all its cores unless executorCores says otherwise; their
  # memory shares the worker's (a tenth left for the JVM's own).
  per=$(( cores / ${{__sao_spark_exec_cores:-$cores}} )); [ "$per" -ge 1 ] || per=1
  if [ -z "$__sao_spark_exec_mem" ]; then
    # Spark refuses an executor heap under 450 MiB.
    __sao_spark_exec_mem=$(( mem * 9 / 10 / per )); [ "$__sao_spark_exec_mem" -ge 512 ] || __sao_spark_exec_mem=512
    __sao_spark_exec_mem="${{__sao_spark_exec_mem}}m"
  fi
  if [ -n {num_executors_q} ]; then
    __sao_spark_cores_max=$(( {num_executors_q} * ${{__sao_spark_exec_cores:-$cores}} ))
  fi
  __sao_spark_conf "spark://$host:$port"
}}
__sao_spark_down() {{
  [ -z "$__sao_spark_down_done" ] || return 0
  __sao_spark_down_done=1
  local pid _
  for pid in $__sao_spark_workers; do kill -TERM "$pid" 2>/dev/null; done
  [ -z "$__sao_spark_group" ] || kill -TERM -- "-$__sao_spark_group" 2>/dev/null
  for _ in $(seq 1 50); do
    [ -n "$__sao_spark_group" ] && kill -0 -- "-$__sao_spark_group" 2>/dev/null && {{ sleep 0.1; continue; }}
    break
  done
  [ -z "$__sao_spark_group" ] || kill -KILL -- "-$__sao_spark_group" 2>/dev/null
  for pid in $__sao_spark_workers; do kill -KILL "$pid" 2>/dev/null; done
  wait $__sao_spark_workers $__sao_spark_group 2>/dev/null
  if [ -n "$__sao_spark_workers" ]; then
    srun --overlap{srun_group} --nodes="${{SLURM_JOB_NUM_NODES{suffix}:-1}}" --ntasks-per-node=1 rm -rf "$__sao_spark_tmp" 2>/dev/null
  fi
  rm -rf "$__sao_spark_tmp"
  return 0
}}
"#,
        helpers = COMMON_FUNCTIONS,
        exec_mem_q = quote(&exec_mem),
        exec_cores = quote(&exec_cores),
        home_q = home,
        host_q = host,
        num_executors_q = quote(&num_executors),
        daemon_mem = SPARK_DAEMON_MEMORY,
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
        let f = ray_functions(&ray, Some(2), &[]);
        assert!(f.contains("'--resources={\"x\": 1}; rm -rf /'"));
        assert!(f.contains("--node-ip-address='head$(id)'"));
        assert!(f.contains("addr='head$(id)'"));
        assert!(f.contains("--num-gpus=2"));
        assert!(f.contains("--include-dashboard=false"));
        assert!(!f.contains("dashboard_port"));
        assert!(
            f.contains("RAY_raylet_start_wait_time_s:-120}"),
            "a busy node's raylet waits as long as the launcher (120 s by default)"
        );
    }

    #[test]
    fn spark_settings_are_quoted_and_sized() {
        let mem = |m: &str| Some(crate::quantity::Memory::parse(m).unwrap());
        let spark = SparkSettings {
            master_host: Some("h$(id)".into()),
            spark_home: Some("/opt/spark dir".into()),
            executor_memory: mem("1G"),
            driver_memory: mem("2G"),
            executor_cores: Some(2),
            num_executors: Some(3),
            ..Default::default()
        };
        let f = spark_functions(&spark, None);
        assert!(f.contains("host='h$(id)'"), "{f}");
        assert!(f.contains("SPARK_HOME='/opt/spark dir'"));
        assert!(f.contains("__sao_spark_exec_mem=1024m"));
        assert!(f.contains("echo \"spark.driver.memory 2048m\""));
        assert!(f.contains("__sao_spark_exec_cores=2"));
        assert!(f.contains("$(( 3 * ${__sao_spark_exec_cores:-$cores} ))"));
        // Defaults: the job's SPARK_HOME (else pyspark's), the first node's address.
        let f = spark_functions(&SparkSettings::default(), None);
        assert!(f.contains("SPARK_HOME=\"${SPARK_HOME:-}\""));
        assert!(f.contains("host=''"));
        assert!(f.contains("if [ -n '' ]; then"), "no external master");
        let f = spark_functions(
            &SparkSettings {
                master_url: Some("spark://m:7077".into()),
                ..Default::default()
            },
            None,
        );
        assert!(f.contains("__sao_spark_conf spark://m:7077"));
    }

    #[test]
    fn a_components_own_cluster_spans_its_het_group_only() {
        let f = spark_functions(&SparkSettings::default(), Some(1));
        assert!(f.contains("scontrol show hostnames \"${SLURM_JOB_NODELIST_HET_GROUP_1:-}\""));
        assert!(f.contains("srun --overlap --het-group=1 --nodes=1 --ntasks=1 -w \"$n\""));
        assert!(f.contains("${SLURM_JOB_CPUS_PER_NODE_HET_GROUP_1:-1}"));
        assert!(f.contains("${SLURM_MEM_PER_NODE_HET_GROUP_1:-"));
        assert!(f.contains("--het-group=1 --nodes=\"${SLURM_JOB_NUM_NODES_HET_GROUP_1:-1}\""));
        // Two components' clusters on one node keep apart.
        assert!(f.contains("sao-spark-${SLURM_JOB_ID:-local-$$}-c1"));
        let f = ray_functions(&RaySettings::default(), None, &[(2, "gpu's".into())]);
        assert!(f.contains("__sao_ray_components=([2]='gpu'\\''s')"), "{f}");
        assert!(f.contains("sao-ray-${SLURM_JOB_ID:-local-$$}-c2"));
    }

    #[test]
    fn every_launcher_writes_its_facts_to_the_launcher_file() {
        assert!(COMMON_FUNCTIONS.contains(&format!(">> {LAUNCHER_FILE};")));
    }
}
