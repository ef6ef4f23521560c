//! Executors run attempts somewhere: [`local`] on the operator's host. Slurm over SSH shares
//! this interface. Executors never decide; they report observations back to the core.

pub mod exit_watch;
pub mod local;
pub mod slurm;

use crate::api::{LogTail, Metrics, Resources};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The job the core knows about: what an executor needs to observe or cancel it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRef {
    pub job_id: Option<String>,
    pub run_dir: String,
    /// Resources requested, for efficiency figures.
    pub resources: Resources,
    /// A step of a session's allocation: `job_id` is the allocation's, the step's own ID is
    /// in its run dir, and the allocation's end without the step's exit file is the step's.
    pub in_session: bool,
    /// The step's ID as last observed: its run dir may be gone (cleaned up after the end)
    /// before accounting has its figures.
    pub step_id: Option<String>,
    /// A heterogeneous job's component names, in order (their status is reported by name).
    pub components: Vec<String>,
}

/// What is remembered about one watched job between polls.
#[derive(Clone, Debug, Default)]
pub struct JobTrack {
    /// The Pipes message reader (its offset in the message file).
    pub reader: crate::pipes::MessageReader,
    /// Since when every source that answered has said it does not know the job.
    pub missing_since: Option<jiff::Timestamp>,
    /// The job's exit file was seen: it has ended, and a run dir gone since (cleaned up
    /// after the end) is no reason to ask `squeue` about it.
    pub exit_seen: bool,
    /// Since when `squeue` has listed the job as ended while accounting has not recorded
    /// the end (and with it the exit code): bounded by a wait.
    pub squeue_end_since: Option<jiff::Timestamp>,
    /// The Pipes readers of components with payloads of their own, by component.
    pub components: Vec<crate::pipes::MessageReader>,
}

/// A Slurm job ID as the operator accepts it: digits only (no arrays, no het components,
/// no cluster suffix), so that one bad value can never break a batched scheduler query.
pub fn is_job_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A submission's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    pub job_id: String,
    pub run_dir: String,
    /// A job carrying this attempt's tag already existed and was adopted.
    pub adopted: bool,
}

/// Lines and bytes kept per stream in `status.logTail`.
pub const LOG_TAIL_LINES: usize = 40;
pub const LOG_TAIL_BYTES: u64 = 4096;

/// Reads the bounded end of a log file (never the whole file), and the file's size: the tail
/// ends at that size even when the file grows meanwhile.
pub fn tail_file(path: &Path) -> (Option<u64>, String) {
    let Ok(mut f) = std::fs::File::open(path) else {
        return (None, String::new());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(LOG_TAIL_BYTES);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return (Some(len), String::new());
    }
    let mut buf = Vec::new();
    let _ = f.take(len - from).read_to_end(&mut buf);
    (Some(len), tail_text(&buf, from > 0))
}

/// The last [`LOG_TAIL_LINES`] lines of `bytes`, exactly as they are (a trailing newline and
/// `\r` kept), so that the tail is a byte-exact suffix of the file and a reader who knows the
/// file's size can tell which lines are new; drops a first line that was cut mid-way.
pub fn tail_text(bytes: &[u8], cut: bool) -> String {
    let mut start = 0;
    if cut {
        start = bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
    }
    let body = &bytes[start..];
    // A trailing newline ends the last line; it does not start another.
    let scan = body.strip_suffix(b"\n").unwrap_or(body);
    let mut newlines = 0;
    for (i, &b) in scan.iter().enumerate().rev() {
        if b == b'\n' {
            newlines += 1;
            if newlines == LOG_TAIL_LINES {
                start += i + 1;
                break;
            }
        }
    }
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

pub fn log_tail(stdout: &Path, stderr: &Path) -> LogTail {
    let (stdout_bytes, stdout) = tail_file(stdout);
    let (stderr_bytes, stderr) = tail_file(stderr);
    LogTail {
        stdout,
        stderr,
        stdout_bytes,
        stderr_bytes,
    }
}

/// seff-style figures from totals. `alloc_cpus` and `alloc_nodes` describe the allocation.
pub fn efficiency(
    elapsed: f64,
    cpu_seconds: Option<f64>,
    max_rss: Option<u64>,
    alloc_cpus: u32,
    alloc_nodes: u32,
    alloc_gpus: u32,
    requested_mem: Option<u64>,
) -> Metrics {
    let hours = elapsed / 3600.0;
    // Status holds figures people read (and `kubectl get` prints): no float noise.
    let ratio = |x: f64| round_to(x, 4);
    let precise = |x: f64| round_to(x, 6);
    Metrics {
        elapsed_seconds: Some(precise(elapsed)),
        cpu_efficiency: cpu_seconds
            .filter(|_| elapsed > 0.0 && alloc_cpus > 0)
            .map(|c| ratio(c / (elapsed * f64::from(alloc_cpus)))),
        total_cpu_seconds: cpu_seconds.map(precise),
        alloc_cpus: Some(alloc_cpus),
        alloc_nodes: Some(alloc_nodes),
        max_rss_bytes: max_rss,
        memory_efficiency: max_rss
            .zip(requested_mem)
            .filter(|(_, m)| *m > 0)
            .map(|(r, m)| ratio(r as f64 / m as f64)),
        node_hours: Some(precise(hours * f64::from(alloc_nodes))),
        cpu_hours: Some(precise(hours * f64::from(alloc_cpus))),
        gpu_hours: Some(precise(hours * f64::from(alloc_gpus))),
    }
}

/// `x` rounded to `digits` decimal places.
fn round_to(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines_and_drops_cut_line() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail_text(text.as_bytes(), false);
        assert_eq!(t.lines().count(), LOG_TAIL_LINES);
        assert!(t.starts_with("line 60\n") && t.ends_with("line 99\n"));
        assert_eq!(tail_text(b"ne 1\nline 2\n", true), "line 2\n");
        assert_eq!(
            tail_text(b"a\r\nb", false),
            "a\r\nb",
            "bytes kept as they are"
        );
        assert_eq!(tail_text(b"only part of a line", true), "");
    }

    #[test]
    fn efficiency_figures() {
        let m = efficiency(100.0, Some(150.0), Some(1 << 30), 2, 1, 0, Some(2 << 30));
        assert_eq!(m.cpu_efficiency, Some(0.75));
        assert_eq!(m.memory_efficiency, Some(0.5));
        // No float noise in what status holds.
        let tiny = efficiency(250.0, Some(0.11), None, 1, 1, 0, None);
        assert_eq!(tiny.cpu_efficiency, Some(0.0004));
        assert!((m.node_hours.unwrap() - 100.0 / 3600.0).abs() < 1e-6);
        assert!((m.cpu_hours.unwrap() - 200.0 / 3600.0).abs() < 1e-6);
        assert_eq!(
            efficiency(0.0, Some(0.0), None, 1, 1, 0, None).cpu_efficiency,
            None
        );
    }
}
