//! The `status` command: one line per asset, read from the status files.

use crate::manifest::Kind;
use crate::standalone::store::{ANN_ASSET_KEY, list_status_files};
use serde_json::Value;
use std::path::Path;

/// Renders the table of every asset's status under `dir`.
pub fn render(dir: &Path) -> String {
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
