//! Dagster Pipes bridge: the bootstrap a payload needs (context in) and the reading of the
//! messages it writes (messages out), in the wire format of the `dagster-pipes` package:
//! params are `base64(zlib(json))`, the file message channel is one JSON object per line.

use crate::api::{PipesCheckResult, PipesMaterialization, PipesStatus};
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

/// Encodes a bootstrap parameter the way `dagster_pipes.encode_param` does.
pub fn encode_param(value: &Value) -> String {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(value.to_string().as_bytes())
        .expect("writing to memory");
    base64::engine::general_purpose::STANDARD.encode(z.finish().expect("writing to memory"))
}

/// The context data (`PipesContextData`) for one run of one asset.
pub fn context_data(
    asset_key: &str,
    run_id: &str,
    retry_number: u32,
    extras: Option<&Value>,
) -> Value {
    json!({
        "asset_keys": [asset_key],
        "code_version_by_asset_key": null,
        "provenance_by_asset_key": null,
        "partition_key": null,
        "partition_key_range": null,
        "partition_time_window": null,
        "run_id": run_id,
        "job_name": null,
        "retry_number": retry_number,
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

/// Incremental reader of the message file: feed it the bytes that follow `offset`.
#[derive(Clone, Debug, Default)]
pub struct MessageReader {
    /// Bytes of the file consumed so far (always at a line boundary).
    pub offset: u64,
    pub status: PipesStatus,
}

impl MessageReader {
    /// Consumes complete lines of `chunk` (the file's bytes from `self.offset`); a trailing
    /// partial line is left for the next call, since the payload may still be writing it.
    pub fn feed(&mut self, chunk: &[u8]) {
        let Some(end) = chunk.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        for line in chunk[..=end].split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Ok(msg) = serde_json::from_slice::<Value>(line) {
                self.apply(&msg);
            }
        }
        self.offset += (end + 1) as u64;
    }

    fn apply(&mut self, msg: &Value) {
        let s = &mut self.status;
        s.message_count += 1;
        let params = msg.get("params").cloned().unwrap_or(Value::Null);
        let string = |k: &str| params.get(k).and_then(Value::as_str).map(str::to_string);
        let metadata = || {
            params
                .get("metadata")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default()
        };
        match msg.get("method").and_then(Value::as_str) {
            Some("opened") => s.opened = true,
            Some("closed") => s.closed = true,
            Some("report_asset_materialization") => {
                s.materializations.push(PipesMaterialization {
                    asset_key: string("asset_key"),
                    data_version: string("data_version"),
                    metadata: metadata(),
                });
                trim_front(&mut s.materializations, MAX_MATERIALIZATIONS);
            }
            Some("report_asset_check") => {
                s.check_results.push(PipesCheckResult {
                    asset_key: string("asset_key"),
                    check_name: string("check_name").unwrap_or_default(),
                    passed: params
                        .get("passed")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    severity: string("severity"),
                    metadata: metadata(),
                });
                trim_front(&mut s.check_results, MAX_CHECKS);
            }
            Some("report_custom_message") => {
                s.custom_messages
                    .push(params.get("payload").cloned().unwrap_or(Value::Null));
                trim_front(&mut s.custom_messages, MAX_CUSTOM);
            }
            _ => {}
        }
    }
}

fn trim_front<T>(v: &mut Vec<T>, max: usize) {
    if v.len() > max {
        v.drain(..v.len() - max);
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
}
