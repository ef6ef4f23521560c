//! Pure Slurm knowledge: job states, `sacct`/`squeue` parsable output, seff-correct metrics.
//! No I/O here; `executor::slurm` feeds it the text that came back over SSH.

use crate::api::Metrics;
use crate::core::JobState;
use crate::executor::efficiency;

/// Fields requested from `sacct -P`, in this order.
pub const SACCT_FORMAT: &str = "JobID,State,ExitCode,ElapsedRaw,TotalCPU,AllocCPUS,AllocNodes,AllocTRES,MaxRSS,NodeList,Start,End";
/// Fields requested from `squeue -h -o`, in this order.
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%N|%S";

/// Maps a Slurm state (as `sacct`/`squeue` print it) and an `ExitCode` (`code:signal`) to the
/// core's job state.
pub fn map_state(state: &str, exit_code: Option<&str>) -> JobState {
    let mut words = state.split_whitespace();
    let head = words
        .next()
        .unwrap_or("")
        .trim_end_matches('+')
        .to_ascii_uppercase();
    let code = exit_code.and_then(parse_exit_code);
    match head.as_str() {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD" => JobState::Queued,
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "RESIZING" | "STAGE_OUT" | "SIGNALING"
        | "STOPPED" => JobState::Running,
        "COMPLETED" => JobState::Exited {
            exit_code: code.unwrap_or(0),
        },
        "FAILED" => match code {
            Some(c) if c != 0 => JobState::Exited { exit_code: c },
            _ => JobState::Killed {
                reason: "FAILED".into(),
                exit_code: code,
            },
        },
        "TIMEOUT" | "OUT_OF_MEMORY" | "DEADLINE" | "SPECIAL_EXIT" | "REVOKED" => JobState::Killed {
            reason: head.clone(),
            exit_code: code,
        },
        "NODE_FAIL" | "BOOT_FAIL" | "PREEMPTED" => JobState::Infrastructure {
            reason: head.clone(),
        },
        "CANCELLED" => {
            // "CANCELLED by 1001"
            let by = match (words.next(), words.next()) {
                (Some("by"), Some(uid)) => Some(format!("uid {uid}")),
                _ => None,
            };
            JobState::Cancelled { by }
        }
        // An unknown state is not assumed finished: keep observing.
        _ => JobState::Running,
    }
}

/// Whether a state is final (the job will not change any more).
pub fn is_final(state: &JobState) -> bool {
    !matches!(
        state,
        JobState::Queued | JobState::Running | JobState::Unknown
    )
}

/// `3:0` → 3; `0:9` (killed by signal 9) → 137, as a shell would report it.
pub fn parse_exit_code(s: &str) -> Option<i32> {
    let (code, sig) = s.split_once(':').unwrap_or((s, "0"));
    let code: i32 = code.trim().parse().ok()?;
    let sig: i32 = sig.trim().parse().unwrap_or(0);
    Some(if code == 0 && sig != 0 {
        128 + sig
    } else {
        code
    })
}

/// `[D-]HH:MM:SS[.mmm]`, `MM:SS[.mmm]` → seconds.
pub fn parse_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<f64>().ok()?, r),
        None => (0.0, s),
    };
    let parts: Vec<f64> = rest
        .split(':')
        .map(|p| p.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    let secs = match parts.as_slice() {
        [s] => *s,
        [m, s] => m * 60.0 + s,
        [h, m, s] => h * 3600.0 + m * 60.0 + s,
        _ => return None,
    };
    Some(days * 86400.0 + secs)
}

/// `1234K`, `2.5M`, `1G`, `0` → bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult as f64) as u64)
}

/// GPUs in an `AllocTRES` string such as `billing=2,cpu=2,gres/gpu=1,mem=1G,node=1`.
pub fn gpus_in_tres(tres: &str) -> u32 {
    tres.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "gres/gpu")
        .filter_map(|(_, v)| v.parse::<u32>().ok())
        .sum()
}

/// Expands a Slurm host list: `n[1-3,5],login` → `n1 n2 n3 n5 login`.
pub fn expand_nodelist(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0;
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut items = vec![];
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'[' => depth += 1,
            b']' => depth -= 1,
            b',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    for item in items
        .into_iter()
        .filter(|i| !i.is_empty() && *i != "None assigned" && *i != "(null)")
    {
        match (item.find('['), item.rfind(']')) {
            (Some(open), Some(close)) if close > open => {
                let prefix = &item[..open];
                let suffix = &item[close + 1..];
                for range in item[open + 1..close].split(',') {
                    match range.split_once('-') {
                        Some((a, b)) => {
                            let width = a.len();
                            if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                                for n in a..=b {
                                    out.push(format!("{prefix}{n:0width$}{suffix}"));
                                }
                            }
                        }
                        None => out.push(format!("{prefix}{range}{suffix}")),
                    }
                }
            }
            _ => out.push(item.to_string()),
        }
    }
    out
}

/// One `sacct -P` row in [`SACCT_FORMAT`] order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SacctRow {
    pub job_id: String,
    pub state: String,
    pub exit_code: String,
    pub elapsed_raw: Option<f64>,
    pub total_cpu: Option<f64>,
    pub alloc_cpus: Option<u32>,
    pub alloc_nodes: Option<u32>,
    pub alloc_tres: String,
    pub max_rss: Option<u64>,
    pub node_list: String,
    pub start: String,
    pub end: String,
}

impl SacctRow {
    /// The job this row belongs to (`123` for `123`, `123.batch`, `123.0`).
    /// The job's ID, without a step (`.batch`) or a heterogeneous component (`+1`).
    pub fn base_id(&self) -> &str {
        let job = self.job_id.split('.').next().unwrap_or(&self.job_id);
        job.split('+').next().unwrap_or(job)
    }
    /// The heterogeneous component this row belongs to (`123+1.0` → 1).
    pub fn component(&self) -> Option<u32> {
        let job = self.job_id.split('.').next()?;
        job.split_once('+')?.1.parse().ok()
    }
    pub fn is_step(&self) -> bool {
        self.job_id.contains('.')
    }
}

pub fn parse_sacct(text: &str) -> Vec<SacctRow> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            if f.len() < 12 || f[0].is_empty() {
                return None;
            }
            Some(SacctRow {
                job_id: f[0].to_string(),
                state: f[1].to_string(),
                exit_code: f[2].to_string(),
                elapsed_raw: f[3].parse().ok(),
                total_cpu: parse_duration(f[4]),
                alloc_cpus: f[5].parse().ok(),
                alloc_nodes: f[6].parse().ok(),
                alloc_tres: f[7].to_string(),
                max_rss: parse_bytes(f[8]),
                node_list: f[9].to_string(),
                start: f[10].to_string(),
                end: f[11].to_string(),
            })
        })
        .collect()
}

/// seff-correct figures for one job from all its `sacct` rows: CPU time summed over every
/// step, memory the maximum over steps, node-hours from the allocation's node count.
pub fn job_metrics(rows: &[&SacctRow], requested_mem: Option<u64>) -> Option<Metrics> {
    let alloc = rows.iter().find(|r| !r.is_step())?;
    // A heterogeneous job has one allocation row per component: its CPUs, nodes and GPUs
    // add up (they share the job's elapsed time).
    let allocs: Vec<&&SacctRow> = rows.iter().filter(|r| !r.is_step()).collect();
    let sum = |f: &dyn Fn(&SacctRow) -> u32| allocs.iter().map(|r| f(r)).sum::<u32>();
    let steps: Vec<&&SacctRow> = rows.iter().filter(|r| r.is_step()).collect();
    let cpu: f64 = if steps.is_empty() {
        alloc.total_cpu.unwrap_or(0.0)
    } else {
        steps.iter().filter_map(|r| r.total_cpu).sum()
    };
    let max_rss = steps.iter().filter_map(|r| r.max_rss).max();
    let elapsed = allocs
        .iter()
        .filter_map(|r| r.elapsed_raw)
        .fold(alloc.elapsed_raw.unwrap_or(0.0), f64::max);
    Some(efficiency(
        elapsed,
        Some(cpu),
        max_rss,
        sum(&|r| r.alloc_cpus.unwrap_or(0)),
        sum(&|r| r.alloc_nodes.unwrap_or(0)),
        sum(&|r| gpus_in_tres(&r.alloc_tres)),
        requested_mem,
    ))
}

/// Metrics of one step of a shared allocation (a session's): the step's own row.
pub fn step_metrics(row: &SacctRow, requested_mem: Option<u64>) -> Metrics {
    efficiency(
        row.elapsed_raw.unwrap_or(0.0),
        row.total_cpu,
        row.max_rss,
        row.alloc_cpus.unwrap_or(0),
        row.alloc_nodes.unwrap_or(0),
        gpus_in_tres(&row.alloc_tres),
        requested_mem,
    )
}

/// A start/end time as `sacct` prints it (local time of the cluster, no zone).
pub fn parse_time(s: &str) -> Option<jiff::Timestamp> {
    let dt: jiff::civil::DateTime = s.trim().parse().ok()?;
    dt.to_zoned(jiff::tz::TimeZone::system())
        .ok()
        .map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slurm_state_maps() {
        use JobState::*;
        let k = |r: &str| Killed {
            reason: r.into(),
            exit_code: Some(0),
        };
        let cases: Vec<(&str, &str, JobState)> = vec![
            ("PENDING", "0:0", Queued),
            ("CONFIGURING", "0:0", Queued),
            ("REQUEUED", "0:0", Queued),
            ("RUNNING", "0:0", Running),
            ("COMPLETING", "0:0", Running),
            ("SUSPENDED", "0:0", Running),
            ("RESIZING", "0:0", Running),
            ("COMPLETED", "0:0", Exited { exit_code: 0 }),
            ("FAILED", "3:0", Exited { exit_code: 3 }),
            ("FAILED", "0:0", k("FAILED")),
            ("TIMEOUT", "0:0", k("TIMEOUT")),
            (
                "OUT_OF_MEMORY",
                "0:125",
                Killed {
                    reason: "OUT_OF_MEMORY".into(),
                    exit_code: Some(253),
                },
            ),
            ("DEADLINE", "0:0", k("DEADLINE")),
            ("SPECIAL_EXIT", "0:0", k("SPECIAL_EXIT")),
            ("REVOKED", "0:0", k("REVOKED")),
            (
                "NODE_FAIL",
                "0:0",
                Infrastructure {
                    reason: "NODE_FAIL".into(),
                },
            ),
            (
                "BOOT_FAIL",
                "0:0",
                Infrastructure {
                    reason: "BOOT_FAIL".into(),
                },
            ),
            (
                "PREEMPTED",
                "0:0",
                Infrastructure {
                    reason: "PREEMPTED".into(),
                },
            ),
            ("CANCELLED", "0:15", Cancelled { by: None }),
            (
                "CANCELLED by 1001",
                "0:15",
                Cancelled {
                    by: Some("uid 1001".into()),
                },
            ),
            ("CANCELLED+", "0:0", Cancelled { by: None }),
        ];
        for (state, code, want) in cases {
            assert_eq!(map_state(state, Some(code)), want, "{state} {code}");
        }
        assert!(!is_final(&map_state("WHATEVER_NEW", None)));
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_exit_code("3:0"), Some(3));
        assert_eq!(parse_exit_code("0:9"), Some(137));
        assert_eq!(parse_duration("01:02.500"), Some(62.5));
        assert_eq!(parse_duration("1-00:00:01"), Some(86401.0));
        assert_eq!(parse_duration("00:00:10"), Some(10.0));
        assert_eq!(parse_bytes("1024K"), Some(1 << 20));
        assert_eq!(parse_bytes("1.5M"), Some(3 << 19));
        assert_eq!(parse_bytes(""), None);
        assert_eq!(gpus_in_tres("billing=2,cpu=2,gres/gpu=2,mem=1G,node=1"), 2);
        assert_eq!(
            expand_nodelist("n[1-3,5],login"),
            vec!["n1", "n2", "n3", "n5", "login"]
        );
        assert_eq!(expand_nodelist("node[01-02]"), vec!["node01", "node02"]);
        assert_eq!(expand_nodelist("None assigned"), Vec::<String>::new());
    }

    /// A 2-node job whose `srun` step did most of the work: CPU time includes the step,
    /// memory is the maximum over steps, node-hours use both nodes.
    #[test]
    fn seff_correct_metrics() {
        let text = "\
7|COMPLETED|0:0|100|02:40.000|4|2|billing=4,cpu=4,mem=2G,node=2||n[1-2]|2026-01-01T00:00:00|2026-01-01T00:01:40
7.batch|COMPLETED|0:0|100|00:10.000|2|1|cpu=2,mem=1G,node=1|5000K|n1|2026-01-01T00:00:00|2026-01-01T00:01:40
7.extern|COMPLETED|0:0|100|00:00.000|4|2|cpu=4,mem=2G,node=2|1000K|n[1-2]|2026-01-01T00:00:00|2026-01-01T00:01:40
7.0|COMPLETED|0:0|90|02:30.000|4|2|cpu=4,mem=2G,node=2|20000K|n[1-2]|2026-01-01T00:00:05|2026-01-01T00:01:35
";
        let rows = parse_sacct(text);
        assert_eq!(rows.len(), 4);
        let refs: Vec<&SacctRow> = rows.iter().collect();
        let m = job_metrics(&refs, Some(1 << 30)).unwrap();
        assert_eq!(m.total_cpu_seconds, Some(160.0));
        assert_eq!(m.alloc_nodes, Some(2));
        assert_eq!(m.max_rss_bytes, Some(20000 * 1024));
        assert_eq!(m.cpu_efficiency, Some(160.0 / 400.0));
        assert!((m.node_hours.unwrap() - 200.0 / 3600.0).abs() < 1e-6);
        assert!((m.cpu_hours.unwrap() - 400.0 / 3600.0).abs() < 1e-6);
    }
}
