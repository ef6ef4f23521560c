//! Status timestamps in one precision, whole seconds, as Kubernetes writes its own
//! (`metav1.Time`): an end taken from the job's exit file and a transition taken from the
//! operator's clock then read alike. Any precision is read back.

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serializer};

fn seconds(t: &Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(*t)
}

pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&seconds(t))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
    Timestamp::deserialize(d)
}

/// The same for an optional timestamp.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&seconds(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        Option::<Timestamp>::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use crate::api::Condition;

    #[test]
    fn timestamps_are_written_in_whole_seconds_and_read_in_any() {
        let c = Condition {
            type_: "Running".into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: "2026-12-02T19:26:41.733113039Z".parse().unwrap(),
            observed_generation: None,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["lastTransitionTime"], "2026-12-02T19:26:41Z");
        let back: Condition = serde_json::from_value(serde_json::json!({
            "type": "Running", "status": "True", "reason": "R",
            "lastTransitionTime": "2026-12-02T19:26:41.5Z",
        }))
        .unwrap();
        assert_eq!(back.last_transition_time.as_second(), 1796239601);
    }
}
