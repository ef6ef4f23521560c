//! Bounds on everything the operator reads from users and payloads. The README's "Limits"
//! section lists these values; change both together.

use serde_json::Value;

/// A manifest file, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Manifest files read per scan, and folder depth below the watched directory.
pub const MAX_MANIFEST_FILES: usize = 100_000;
pub const MAX_DIR_DEPTH: usize = 16;
/// A payload file (`payload.path`), in bytes.
pub const MAX_PAYLOAD_BYTES: u64 = 8 << 20;
/// Any string of a spec, unless a field below says otherwise.
pub const MAX_STRING: usize = 4096;
/// `payload.inline`.
pub const MAX_INLINE: usize = 512 << 10;
/// One environment value or one argument (Linux refuses single strings over 128 KiB at exec).
pub const MAX_ARG: usize = 64 << 10;
/// All environment values and arguments together.
pub const MAX_ARGS_TOTAL: usize = 512 << 10;
/// `spec.extras`, and `spec.pipesContext`, each serialised.
pub const MAX_EXTRAS: usize = 256 << 10;
/// `spec.assetKey`.
pub const MAX_ASSET_KEY: usize = 512;
/// `spec.runKey`.
pub const MAX_RUN_KEY: usize = 256;
/// Items of any list in a spec.
pub const MAX_LIST: usize = 1024;
/// One Pipes message line; longer lines are skipped and counted.
pub const MAX_PIPES_LINE: usize = 256 << 10;
/// Pipes bytes read per job per poll.
pub const PIPES_CHUNK: u64 = 1 << 20;
/// One materialization's or check's metadata, serialised; larger metadata is replaced by a note.
pub const MAX_PIPES_METADATA: usize = 16 << 10;
/// All Pipes results kept in status together, serialised; the oldest go first.
pub const MAX_PIPES_STATUS: usize = 128 << 10;
/// `status.message` and condition messages.
pub const MAX_MESSAGE: usize = 2048;

/// Fields whose strings may be longer than [`MAX_STRING`], with their own bound.
fn string_limit(path: &str) -> usize {
    if path == "spec.payload.inline" {
        MAX_INLINE
    } else if path.starts_with("spec.env[") || path.starts_with("spec.payload.args[") {
        MAX_ARG
    } else if path == "spec.assetKey" {
        MAX_ASSET_KEY
    } else if path == "spec.runKey" {
        MAX_RUN_KEY
    } else {
        MAX_STRING
    }
}

/// Checks every string and list of a spec (as JSON) against its bound. `extras` is free JSON
/// checked by its total size. Returns (field path, reason) pairs.
pub fn check_sizes(spec: &Value) -> Vec<(String, String)> {
    let mut out = vec![];
    walk(spec, "spec".to_string(), &mut out);
    for field in ["extras", "pipesContext"] {
        if let Some(v) = spec.get(field) {
            let n = v.to_string().len();
            if n > MAX_EXTRAS {
                out.push((
                    format!("spec.{field}"),
                    format!("is {n} bytes serialised, over the limit of {MAX_EXTRAS}"),
                ));
            }
        }
    }
    let args_total: usize = ["env", "payload"]
        .iter()
        .map(|k| match (k, spec.get(k)) {
            (&"env", Some(Value::Array(env))) => env
                .iter()
                .map(|e| e.get("value").and_then(Value::as_str).map_or(0, str::len))
                .sum(),
            (&"payload", Some(p)) => p.get("args").and_then(Value::as_array).map_or(0, |a| {
                a.iter().filter_map(Value::as_str).map(str::len).sum()
            }),
            _ => 0,
        })
        .sum();
    if args_total > MAX_ARGS_TOTAL {
        out.push((
            "spec.env".into(),
            format!(
                "environment values and arguments total {args_total} bytes, over the limit of {MAX_ARGS_TOTAL}"
            ),
        ));
    }
    out
}

fn walk(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    if path == "spec.extras" {
        return;
    }
    match v {
        Value::String(s) => {
            let max = string_limit(&path);
            if s.len() > max {
                out.push((
                    path,
                    format!("is {} bytes long, over the limit of {max}", s.len()),
                ));
            }
        }
        Value::Array(items) => {
            if items.len() > MAX_LIST {
                out.push((
                    path.clone(),
                    format!("has {} items, over the limit of {MAX_LIST}", items.len()),
                ));
                return;
            }
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            if map.len() > MAX_LIST {
                out.push((
                    path.clone(),
                    format!("has {} keys, over the limit of {MAX_LIST}", map.len()),
                ));
                return;
            }
            for (k, item) in map {
                if k.len() > MAX_STRING {
                    out.push((path.clone(), "has a key over the length limit".into()));
                    continue;
                }
                walk(item, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_name_the_field() {
        let big = "x".repeat(MAX_ARG + 1);
        let spec = json!({
            "assetKey": "a".repeat(MAX_ASSET_KEY + 1),
            "payload": {"inline": "ok", "args": [big]},
            "env": [{"name": "A", "value": "v"}],
            "resources": {"partition": "p".repeat(MAX_STRING + 1)},
            "extras": {"blob": "y".repeat(MAX_EXTRAS)},
        });
        let fields: Vec<String> = check_sizes(&spec).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "spec.assetKey",
                "spec.payload.args[0]",
                "spec.resources.partition",
                "spec.extras"
            ]
        );
        assert!(check_sizes(&json!({"payload": {"inline": "x".repeat(MAX_INLINE)}})).is_empty());
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("ééééé", 7), "éé...");
    }
}
