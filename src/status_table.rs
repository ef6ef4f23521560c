//! The `status` command: one line per asset, read from the status files.

use crate::manifest::Kind;
use crate::standalone::store::{ANN_ASSET_KEY, ERRORS_FILE, STATUS_DIR, list_status_files};
use serde_json::Value;
use std::path::Path;

/// Renders the table of every asset's status under `dir`, then the manifest errors of
/// `errors.yaml` and what each failed asset's status says went wrong. A directory the
/// operator has not written status into is an error (a mistyped `--dir`, say).
pub fn render(dir: &Path) -> crate::Result<String> {
    let meta = std::fs::metadata(dir).map_err(|e| crate::Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(crate::Error::Usage(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    if !dir.join(STATUS_DIR).is_dir() {
        return Err(crate::Error::Usage(format!(
            "{}: no status here ({STATUS_DIR}/ is missing): run `slurm-asset-operator standalone --dir {}` first",
            dir.display(),
            dir.display()
        )));
    }
    let mut out = table(dir);
    let errors = std::fs::read_to_string(dir.join(STATUS_DIR).join(ERRORS_FILE))
        .ok()
        .and_then(|t| serde_saphyr::from_str::<Value>(&t).ok());
    let errors = errors
        .as_ref()
        .and_then(|v| v["errors"].as_array())
        .cloned()
        .unwrap_or_default();
    if !errors.is_empty() {
        out.push_str(&format!("\nmanifest errors ({ERRORS_FILE}):\n"));
        for e in &errors {
            // The message names its file first already.
            let file = e["file"].as_str().unwrap_or("?");
            let message = e["message"].as_str().unwrap_or("");
            let line = if message.starts_with(file) {
                one_line(message)
            } else {
                one_line(&format!("{file}: {message}"))
            };
            out.push_str(&format!("  {line}\n"));
        }
    }
    let failed: Vec<String> = list_status_files(dir, Kind::SlurmAsset)
        .into_iter()
        .filter(|(_, v)| matches!(v["status"]["phase"].as_str(), Some("Failed" | "Cancelled")))
        .map(|(_, v)| {
            format!(
                "  {}/{}: {}: {}\n",
                v["metadata"]["namespace"].as_str().unwrap_or("default"),
                v["metadata"]["name"].as_str().unwrap_or("?"),
                v["status"]["reason"].as_str().unwrap_or("-"),
                one_line(v["status"]["message"].as_str().unwrap_or(""))
            )
        })
        .collect();
    if !failed.is_empty() {
        out.push_str("\nfailed:\n");
        out.extend(failed);
    }
    Ok(out)
}

/// A status message on one line, bounded (it may quote a payload's output).
fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::limits::truncate(flat.trim(), 400)
}

fn table(dir: &Path) -> String {
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "ASSET",
            "PHASE",
            "RUN",
            "JOB",
            "ELAPSED",
            "CPU-EFF",
            "MAX-RSS",
            "REASON",
        ]
        .map(String::from),
    ];
    for (_, v) in list_status_files(dir, Kind::SlurmAsset) {
        let m = &v["metadata"];
        let s = &v["status"];
        let text = |x: &Value| x.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
        let metrics = &s["metrics"];
        let deleted = m.get("deletionTimestamp").is_some();
        rows.push([
            text(&m["namespace"]),
            format!(
                "{}{}",
                text(&m["name"]),
                if deleted { " (deleted)" } else { "" }
            ),
            text(&m["annotations"][ANN_ASSET_KEY]),
            text(&s["phase"]),
            s["run"]
                .as_u64()
                .map(|r| r.to_string())
                .unwrap_or("-".into()),
            text(&s["jobId"]),
            metrics["elapsedSeconds"]
                .as_f64()
                .map(|e| format!("{e:.1}s"))
                .unwrap_or("-".into()),
            metrics["cpuEfficiency"]
                .as_f64()
                .map(|e| format!("{:.1}%", e * 100.0))
                .unwrap_or("-".into()),
            metrics["maxRssBytes"]
                .as_u64()
                .map(human_bytes)
                .unwrap_or("-".into()),
            text(&s["reason"]),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes() {
        assert_eq!(super::human_bytes(512), "512.0B");
        assert_eq!(super::human_bytes(3 << 20), "3.0MiB");
    }
}
