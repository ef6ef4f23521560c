//! Slurm quantities: memory sizes, time limits and operator durations.
//!
//! Each type parses from the exact string forms Slurm accepts, keeps the original text for
//! round-tripping (so `mem: 32G` stays `32G` in status and CRDs), and rejects anything else with a
//! reason; the manifest loader prefixes the field path.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A memory size in Slurm's syntax: an integer with an optional unit `K`, `M` (default), `G`, `T`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Memory {
    text: String,
    bytes: u64,
}

impl Memory {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => t.split_at(i),
            None => (t, ""),
        };
        if digits.is_empty() {
            return Err(format!(
                "invalid memory quantity {s:?}: expected an integer with an optional unit K, M, G or T (e.g. 32G)"
            ));
        }
        let mult: u64 = match unit.to_ascii_uppercase().as_str() {
            "K" | "KB" => 1 << 10,
            "" | "M" | "MB" => 1 << 20,
            "G" | "GB" => 1 << 30,
            "T" | "TB" => 1 << 40,
            _ => {
                return Err(format!(
                    "invalid memory quantity {s:?}: unknown unit {unit:?} (use K, M, G or T)"
                ));
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid memory quantity {s:?}: number too large"))?;
        if n == 0 {
            return Err(format!("invalid memory quantity {s:?}: must be positive"));
        }
        let bytes = n
            .checked_mul(mult)
            .ok_or_else(|| format!("invalid memory quantity {s:?}: too large"))?;
        Ok(Memory {
            text: t.to_string(),
            bytes,
        })
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for Memory {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Memory::parse(&s)
    }
}
impl From<Memory> for String {
    fn from(m: Memory) -> String {
        m.text
    }
}
impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A Slurm time limit: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, or `UNLIMITED`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TimeLimit {
    text: String,
    /// `None` for UNLIMITED.
    seconds: Option<u64>,
}

impl TimeLimit {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = |why: &str| {
            format!(
                "invalid time limit {s:?}: {why} (use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
            )
        };
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
            return Ok(TimeLimit {
                text: t.to_string(),
                seconds: None,
            });
        }
        let num = |p: &str| -> Result<u64, String> {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                return Err(bad(&format!("{p:?} is not a number")));
            }
            Ok(p.parse().expect("digits"))
        };
        let (days, rest) = match t.split_once('-') {
            Some((d, r)) => (Some(num(d)?), r),
            None => (None, t),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let p: Vec<u64> = parts.iter().map(|p| num(p)).collect::<Result<_, _>>()?;
        let secs = match (days, p.as_slice()) {
            (None, [m]) => m * 60,
            (None, [m, s]) => m * 60 + s,
            (None, [h, m, s]) => h * 3600 + m * 60 + s,
            (Some(d), [h]) => d * 86400 + h * 3600,
            (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
            (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
            _ => return Err(bad("too many fields")),
        };
        let minutes_or_seconds_out_of_range = match p.as_slice() {
            [_, m, s] => *m >= 60 || *s >= 60,
            [_, x] => *x >= 60,
            _ => false,
        };
        if minutes_or_seconds_out_of_range {
            return Err(bad("minutes and seconds must be below 60"));
        }
        if secs == 0 {
            return Err(bad("must be positive"));
        }
        Ok(TimeLimit {
            text: t.to_string(),
            seconds: Some(secs),
        })
    }
    pub fn seconds(&self) -> Option<u64> {
        self.seconds
    }
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for TimeLimit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TimeLimit::parse(&s)
    }
}
impl From<TimeLimit> for String {
    fn from(t: TimeLimit) -> String {
        t.text
    }
}

/// An operator-side duration such as a poll interval: `500ms`, `10s`, `5m`, `1h`, `30d`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Interval {
    text: String,
    millis: u64,
}

impl Interval {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("invalid duration {s:?}: missing unit (ms, s, m, h or d)"))?;
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().map_err(|_| {
            format!("invalid duration {s:?}: expected a number then ms, s, m, h or d")
        })?;
        let mult = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        let millis = n
            .checked_mul(mult)
            .filter(|m| *m > 0)
            .ok_or_else(|| format!("invalid duration {s:?}: must be positive and finite"))?;
        Ok(Interval {
            text: t.to_string(),
            millis,
        })
    }
    pub fn duration(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }
}

impl TryFrom<String> for Interval {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Interval::parse(&s)
    }
}
impl From<Interval> for String {
    fn from(t: Interval) -> String {
        t.text
    }
}

/// The schema of each quantity: a string with a pattern, so that the API server validates the
/// format at admission as well.
macro_rules! string_schema {
    ($ty:ty, $name:literal, $pattern:literal, $desc:literal) => {
        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $desc,
                })
            }
            fn inline_schema() -> bool {
                true
            }
        }
    };
}
string_schema!(
    Memory,
    "Memory",
    "^[0-9]+([KMGTkmgt][Bb]?)?$",
    "Memory in Slurm's syntax: an integer with an optional unit K, M (default), G or T, e.g. 32G."
);
string_schema!(
    TimeLimit,
    "TimeLimit",
    "^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$|^(?i:unlimited|infinite)$",
    "A Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED."
);
string_schema!(
    Interval,
    "Interval",
    "^[0-9]+(ms|s|m|h|d)$",
    "A duration: a number followed by ms, s, m, h or d, e.g. 10s."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(Memory::parse("32G").unwrap().bytes(), 32 << 30);
        assert_eq!(Memory::parse("512").unwrap().bytes(), 512 << 20);
        assert_eq!(Memory::parse("100K").unwrap().bytes(), 100 << 10);
        assert_eq!(Memory::parse("2T").unwrap().bytes(), 2u64 << 40);
        for bad in [
            "",
            "G",
            "32X",
            "-1G",
            "1.5G",
            "0",
            "32 G B",
            "99999999999999999999T",
        ] {
            assert!(Memory::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(Memory::parse("lots").unwrap_err().contains("\"lots\""));
    }

    #[test]
    fn time_limits() {
        let s = |t: &str| TimeLimit::parse(t).unwrap().seconds();
        assert_eq!(s("30"), Some(1800));
        assert_eq!(s("30:15"), Some(1815));
        assert_eq!(s("02:00:00"), Some(7200));
        assert_eq!(s("1-00:00:00"), Some(86400));
        assert_eq!(s("1-2"), Some(93600));
        assert_eq!(s("1-2:30"), Some(95400));
        assert_eq!(s("UNLIMITED"), None);
        for bad in ["", "abc", "1:2:3:4", "00:61:00", "1-", "-5", "0", "1h"] {
            assert!(TimeLimit::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(
            Interval::parse("500ms").unwrap().duration().as_millis(),
            500
        );
        assert_eq!(Interval::parse("10s").unwrap().duration().as_secs(), 10);
        assert_eq!(Interval::parse("2m").unwrap().duration().as_secs(), 120);
        assert_eq!(
            Interval::parse("30d").unwrap().duration().as_secs(),
            30 * 86_400
        );
        for bad in ["10", "s", "0s", "1w", "1.5s"] {
            assert!(Interval::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn round_trip_keeps_text() {
        let m: Memory = serde_json::from_value(serde_json::json!("32G")).unwrap();
        assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::json!("32G"));
    }
}
