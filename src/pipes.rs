//! Dagster Pipes bridge: the bootstrap a payload needs (context in) and the reading of the
//! messages it writes (messages out), in the wire format of the `dagster-pipes` package:
//! params are `base64(zlib(json))`, the file message channel is one JSON object per line.

use crate::api::{PipesCheckResult, PipesContext, PipesLog, PipesMaterialization, PipesStatus};
use crate::limits::{MAX_PIPES_LINE, MAX_PIPES_METADATA, MAX_PIPES_STATUS};
use base64::Engine;
use flate2::Compression;
use flate2::write::ZlibEncoder;
use serde_json::{Value, json};
use std::io::Write;

pub const CONTEXT_FILE: &str = "pipes_context.json";
pub const MESSAGES_FILE: &str = "pipes_messages.jsonl";
const MAX_MATERIALIZATIONS: usize = 100;
const MAX_CHECKS: usize = 100;
const MAX_CUSTOM: usize = 20;
/// Log messages kept in status, and the length each is cut to.
const MAX_LOGS: usize = 50;
const MAX_LOG_MESSAGE: usize = 1024;

/// Encodes a bootstrap parameter the way `dagster_pipes.encode_param` does.
pub fn encode_param(value: &Value) -> String {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(value.to_string().as_bytes())
        .expect("writing to memory");
    base64::engine::general_purpose::STANDARD.encode(z.finish().expect("writing to memory"))
}

/// The context data of one planned attempt (its retry number is the attempt's, from 0).
pub fn plan_context_data(plan: &crate::jobscript::RunPlan) -> Value {
    context_data(
        &plan.asset_key,
        &plan.dagster_run_id,
        plan.id.attempt.saturating_sub(1),
        plan.extras.as_ref(),
        plan.pipes_context.as_ref(),
    )
}

/// The context data (`PipesContextData`) for one run of one asset: what the spec's
/// `pipesContext` gives (the Dagster step's own context), completed with this asset's key, run ID
/// and attempt.
pub fn context_data(
    asset_key: &str,
    run_id: &str,
    retry_number: u32,
    extras: Option<&Value>,
    given: Option<&PipesContext>,
) -> Value {
    let given = given.cloned().unwrap_or_default();
    let range = |r: Option<crate::api::PartitionRange>| {
        r.map_or(Value::Null, |r| json!({"start": r.start, "end": r.end}))
    };
    let asset_keys = if given.asset_keys.is_empty() {
        vec![asset_key.to_string()]
    } else {
        given.asset_keys
    };
    json!({
        "asset_keys": asset_keys,
        "code_version_by_asset_key": given.code_version_by_asset_key,
        "provenance_by_asset_key": given.provenance_by_asset_key,
        "partition_key": given.partition_key,
        "partition_key_range": range(given.partition_key_range),
        "partition_time_window": range(given.partition_time_window),
        "run_id": given.run_id.unwrap_or_else(|| run_id.to_string()),
        "job_name": given.job_name,
        "retry_number": given.retry_number.unwrap_or(retry_number),
        "extras": extras.cloned().unwrap_or_else(|| json!({})),
    })
}

/// The two bootstrap environment variables, pointing at files in `run_dir`.
pub fn bootstrap_env(run_dir: &str) -> [(&'static str, String); 2] {
    [
        (
            "DAGSTER_PIPES_CONTEXT",
            encode_param(&json!({ "path": format!("{run_dir}/{CONTEXT_FILE}") })),
        ),
        (
            "DAGSTER_PIPES_MESSAGES",
            encode_param(&json!({ "path": format!("{run_dir}/{MESSAGES_FILE}") })),
        ),
    ]
}

/// Incremental reader of the message file: feed it the bytes that follow `offset`. Bounded:
/// a line longer than [`MAX_PIPES_LINE`] is skipped (and counted) without being held in
/// memory, oversized metadata is replaced by a note, and the results kept in status stay under
/// [`MAX_PIPES_STATUS`] bytes, the oldest going first.
#[derive(Clone, Debug, Default)]
pub struct MessageReader {
    /// Bytes of the file consumed so far.
    pub offset: u64,
    pub status: PipesStatus,
    /// In the middle of an oversized line: drop bytes up to the next newline.
    skipping: bool,
    /// Serialised sizes of the kept results, oldest first (materializations, checks, custom).
    sizes: [std::collections::VecDeque<usize>; 3],
}

impl MessageReader {
    /// Consumes complete lines of `chunk` (the file's bytes from `self.offset`); a trailing
    /// partial line is left for the next call, since the payload may still be writing it,
    /// unless it is already over the line limit.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if self.skipping {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.offset += (i + 1) as u64;
                    rest = &rest[i + 1..];
                    self.skipping = false;
                }
                None => {
                    self.offset += rest.len() as u64;
                    return;
                }
            }
        }
        let end = rest.iter().rposition(|&b| b == b'\n').map_or(0, |e| e + 1);
        for line in rest[..end].split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if line.len() > MAX_PIPES_LINE {
                self.status.dropped_messages += 1;
                continue;
            }
            if let Ok(msg) = serde_json::from_slice::<Value>(line) {
                self.apply(&msg);
            }
        }
        self.offset += end as u64;
        let partial = &rest[end..];
        if partial.len() > MAX_PIPES_LINE {
            self.status.dropped_messages += 1;
            self.offset += partial.len() as u64;
            self.skipping = true;
        }
    }

    fn apply(&mut self, msg: &Value) {
        let s = &mut self.status;
        s.message_count += 1;
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let string = |k: &str| {
            params
                .get(k)
                .and_then(Value::as_str)
                .map(|v| crate::limits::truncate(v, 1024))
        };
        let mut cut = false;
        let metadata = |cut: &mut bool| -> std::collections::BTreeMap<String, Value> {
            let Some(m) = params.get("metadata").and_then(Value::as_object) else {
                return Default::default();
            };
            let size = Value::Object(m.clone()).to_string().len();
            if size > MAX_PIPES_METADATA {
                *cut = true;
                let note = json!({
                    "raw_value": format!("metadata of {size} bytes dropped: over the operator's limit of {MAX_PIPES_METADATA}"),
                    "type": "text",
                });
                return [("dagster_slurm/metadata_dropped".to_string(), note)].into();
            }
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let (list, size) = match msg.get("method").and_then(Value::as_str) {
            Some("opened") => {
                s.opened = true;
                return;
            }
            Some("closed") => {
                s.closed = true;
                return;
            }
            Some("log") => {
                let index = s.message_count;
                s.logs.push(PipesLog {
                    index,
                    level: params
                        .get("level")
                        .and_then(Value::as_str)
                        .map_or_else(|| "INFO".into(), |l| crate::limits::truncate(l, 16)),
                    message: crate::limits::truncate(
                        params.get("message").and_then(Value::as_str).unwrap_or(""),
                        MAX_LOG_MESSAGE,
                    ),
                });
                if s.logs.len() > MAX_LOGS {
                    s.logs.remove(0);
                }
                return;
            }
            Some("report_asset_materialization") => {
                let m = PipesMaterialization {
                    asset_key: string("asset_key"),
                    data_version: string("data_version"),
                    metadata: metadata(&mut cut),
                };
                let size = serde_json::to_string(&m).map_or(0, |t| t.len());
                s.materializations.push(m);
                (0, size)
            }
            Some("report_asset_check") => {
                let c = PipesCheckResult {
                    asset_key: string("asset_key"),
                    check_name: string("check_name").unwrap_or_default(),
                    passed: params
                        .get("passed")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    severity: string("severity"),
                    metadata: metadata(&mut cut),
                };
                let size = serde_json::to_string(&c).map_or(0, |t| t.len());
                s.check_results.push(c);
                (1, size)
            }
            Some("report_custom_message") => {
                let mut payload = params.get("payload").cloned().unwrap_or(Value::Null);
                let size = payload.to_string().len();
                if size > MAX_PIPES_METADATA {
                    cut = true;
                    payload = json!(format!("custom message of {size} bytes dropped"));
                }
                let size = payload.to_string().len();
                s.custom_messages.push(payload);
                (2, size)
            }
            _ => return,
        };
        if cut {
            s.dropped_messages += 1;
        }
        self.sizes[list].push_back(size);
        let caps = [MAX_MATERIALIZATIONS, MAX_CHECKS, MAX_CUSTOM];
        for (i, cap) in caps.into_iter().enumerate() {
            while self.sizes[i].len() > cap {
                self.drop_oldest(i);
            }
        }
        // Keep the whole under the status budget: drop from the list holding the most bytes.
        while self.sizes.iter().flatten().sum::<usize>() > MAX_PIPES_STATUS {
            let biggest = (0..3)
                .max_by_key(|&i| self.sizes[i].iter().sum::<usize>())
                .expect("three lists");
            self.drop_oldest(biggest);
            self.status.dropped_messages += 1;
        }
    }

    fn drop_oldest(&mut self, list: usize) {
        self.sizes[list].pop_front();
        let s = &mut self.status;
        fn pop_front<T>(v: &mut Vec<T>) {
            if !v.is_empty() {
                v.remove(0);
            }
        }
        match list {
            0 => pop_front(&mut s.materializations),
            1 => pop_front(&mut s.check_results),
            _ => pop_front(&mut s.custom_messages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::ZlibDecoder;
    use std::io::Read;

    #[test]
    fn encode_matches_dagster_pipes_decoding() {
        let v = json!({"path": "/tmp/x/pipes_context.json"});
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encode_param(&v))
            .unwrap();
        let mut s = String::new();
        ZlibDecoder::new(&raw[..]).read_to_string(&mut s).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&s).unwrap(), v);
    }

    #[test]
    fn context_data_takes_the_dagster_context_and_completes_it() {
        let own = context_data("a/b", "run-1", 2, None, None);
        assert_eq!(own["asset_keys"], json!(["a/b"]));
        assert_eq!(own["run_id"], "run-1");
        assert_eq!(own["retry_number"], 2);
        assert_eq!(own["extras"], json!({}));
        let given = PipesContext {
            asset_keys: vec!["x".into(), "y/z".into()],
            partition_key: Some("2026-11-01".into()),
            partition_time_window: Some(crate::api::PartitionRange {
                start: "2026-11-01T00:00:00+00:00".into(),
                end: "2026-11-02T00:00:00+00:00".into(),
            }),
            run_id: Some("dagster-run".into()),
            retry_number: Some(0),
            code_version_by_asset_key: Some([("x".to_string(), Some("v1".to_string()))].into()),
            ..Default::default()
        };
        let ctx = context_data("a/b", "run-1", 2, Some(&json!({"k": 1})), Some(&given));
        assert_eq!(ctx["asset_keys"], json!(["x", "y/z"]));
        assert_eq!(ctx["partition_key"], "2026-11-01");
        assert_eq!(
            ctx["partition_time_window"]["start"],
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(ctx["partition_key_range"], Value::Null);
        assert_eq!(ctx["run_id"], "dagster-run");
        assert_eq!(ctx["retry_number"], 0);
        assert_eq!(ctx["code_version_by_asset_key"]["x"], "v1");
        assert_eq!(ctx["extras"], json!({"k": 1}));
    }

    #[test]
    fn log_messages_are_kept_in_order_and_bounded() {
        let mut r = MessageReader::default();
        let mut text = String::new();
        for i in 0..120 {
            let long = if i == 119 {
                "z".repeat(5000)
            } else {
                format!("line {i}")
            };
            text.push_str(
                &json!({"method": "log", "params": {"message": long, "level": "WARNING"}})
                    .to_string(),
            );
            text.push('\n');
        }
        r.feed(text.as_bytes());
        let logs = &r.status.logs;
        assert_eq!(logs.len(), MAX_LOGS);
        assert_eq!(logs[0].index, 120 - MAX_LOGS as u64 + 1);
        assert_eq!(logs[0].message, format!("line {}", 120 - MAX_LOGS));
        assert_eq!(logs[0].level, "WARNING");
        assert_eq!(logs.last().unwrap().index, 120);
        assert!(logs.last().unwrap().message.len() <= MAX_LOG_MESSAGE);
    }

    #[test]
    fn reader_is_incremental_and_skips_partial_lines() {
        let mut r = MessageReader::default();
        let m1 = r#"{"__dagster_pipes_version":"0.1","method":"opened","params":{"extras":{}}}"#;
        let m2 = r#"{"__dagster_pipes_version":"0.1","method":"report_asset_materialization","params":{"asset_key":"a","data_version":null,"metadata":{"rows":{"raw_value":42,"type":"int"}}}}"#;
        let text = format!("{m1}\n{m2}\n{{\"method\":\"clo");
        r.feed(text.as_bytes());
        assert_eq!(r.status.message_count, 2);
        assert!(r.status.opened && !r.status.closed);
        assert_eq!(r.offset as usize, m1.len() + m2.len() + 2);
        assert_eq!(
            r.status.materializations[0].metadata["rows"],
            json!({"raw_value": 42, "type": "int"})
        );
        r.feed(b"{\"method\":\"closed\",\"params\":{}}\n");
        assert!(r.status.closed);
        assert_eq!(r.status.message_count, 3);
    }

    fn materialization(i: usize, meta_bytes: usize) -> String {
        json!({"method": "report_asset_materialization", "params": {"asset_key": "a",
            "metadata": {"i": {"raw_value": i, "type": "int"}, "blob": {"raw_value": "x".repeat(meta_bytes), "type": "text"}}}})
        .to_string()
    }

    #[test]
    fn oversized_lines_are_skipped_and_reading_goes_on() {
        let mut r = MessageReader::default();
        // A line without a newline, longer than the limit, arriving in chunks.
        let huge = vec![b'x'; MAX_PIPES_LINE + 10];
        r.feed(&huge[..MAX_PIPES_LINE / 2]);
        assert_eq!(r.offset, 0, "a short partial line waits");
        r.feed(&huge);
        assert_eq!(
            r.offset as usize,
            huge.len(),
            "an oversized partial line is skipped"
        );
        let tail = format!(
            "yyy\n{}\n{{\"method\":\"closed\"}}\n",
            materialization(1, 10)
        );
        r.feed(tail.as_bytes());
        assert_eq!(r.status.dropped_messages, 1);
        assert_eq!(r.status.materializations.len(), 1);
        assert!(
            r.status.closed,
            "messages after the oversized line are read"
        );
        assert_eq!(r.offset as usize, huge.len() + tail.len());
    }

    #[test]
    fn status_stays_bounded() {
        let mut r = MessageReader::default();
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&materialization(i, 1 << 20));
            text.push('\n');
        }
        // Lines over the line limit are dropped outright.
        r.feed(text.as_bytes());
        assert_eq!(r.status.dropped_messages, 100);
        let mut r = MessageReader::default();
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&materialization(i, MAX_PIPES_METADATA / 2));
            text.push('\n');
        }
        r.feed(text.as_bytes());
        let size = serde_json::to_string(&r.status).unwrap().len();
        assert!(size <= MAX_PIPES_STATUS + 1024, "{size}");
        let last = r.status.materializations.last().unwrap();
        assert_eq!(last.metadata["i"]["raw_value"], 299, "the newest are kept");
        assert!(r.status.dropped_messages > 0);
        let mut r = MessageReader::default();
        r.feed(format!("{}\n", materialization(0, MAX_PIPES_METADATA * 2)).as_bytes());
        assert!(
            r.status.materializations[0]
                .metadata
                .contains_key("dagster_slurm/metadata_dropped")
        );
    }
}
