//! CustomResourceDefinitions generated from the Rust types; `crds/` holds this output.

use crate::api::{SlurmAsset, SlurmCluster, SlurmSession};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

/// The CRDs as installed: generated from the types, then tidied for the API server.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [
        (SlurmAsset::crd(), "A Dagster asset's compute on a Slurm cluster, and the status a Dagster sensor reads."),
        (SlurmCluster::crd(), "How to reach one Slurm cluster (or the operator's host, in local mode), and its defaults."),
        (SlurmSession::crd(), "One allocation shared by many assets as job steps, with a concurrency limit, an idle timeout and an optional warm Ray cluster."),
    ]
    .into_iter()
    .map(|(crd, about)| {
        let mut v = serde_json::to_value(&crd).expect("CRDs serialize");
        for version in v["spec"]["versions"].as_array_mut().expect("versions") {
            let schema = &mut version["schema"]["openAPIV3Schema"];
            schema["description"] = about.into();
            tidy(schema, "");
        }
        serde_json::from_value(v).expect("a tidied CRD is still a CRD")
    })
    .collect()
}

/// Fields whose generated descriptions are replaced (a doc comment cannot say it well).
const NOT_YET: &[(&str, &str)] = &[(
    ".spec.launcher.type",
    "`bash` (default) runs the payload in the job script; `ray` starts a Ray cluster over the allocation first, `spark` a Spark standalone cluster (local mode: `local[*]`).",
)];

/// Makes a generated schema what the API server expects: integer formats it knows (`int32`,
/// `int64`; `uint32` and friends draw warnings) with their bounds spelled out, a description
/// on the generated wrapper types, and honest descriptions of fields not available yet.
fn tidy(schema: &mut Value, path: &str) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(format)) = obj.get("format").cloned() {
        // (format, the type's own maximum; none for 64 bits, which a float cannot state exactly)
        let bounds = match format.as_str() {
            "uint8" => Some(("int32", Some(u8::MAX as f64))),
            "uint16" => Some(("int32", Some(u16::MAX as f64))),
            "uint32" => Some(("int64", Some(u32::MAX as f64))),
            "uint64" => Some(("int64", None)),
            _ => None,
        };
        if let Some((to, max)) = bounds {
            obj.insert("format".into(), to.into());
            let lower = obj
                .get("minimum")
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
                .max(0.0);
            obj.insert("minimum".into(), (lower as i64).into());
            if let Some(max) = max {
                let upper = obj
                    .get("maximum")
                    .and_then(Value::as_f64)
                    .unwrap_or(max)
                    .min(max);
                obj.insert("maximum".into(), (upper as i64).into());
            }
        }
    }
    if let Some(Value::String(d)) = obj.get("description")
        && d.starts_with("Auto-generated derived type")
    {
        let about = if path == ".spec" {
            "The desired state: what to run and where."
        } else {
            "The observed state, written by the operator."
        };
        obj.insert("description".into(), about.into());
    }
    if let Some((_, note)) = NOT_YET.iter().find(|(p, _)| *p == path) {
        obj.insert("description".into(), (*note).into());
    }
    // An absent payload (every component has its own) is not an empty one: its rule (exactly
    // one source) would refuse the default the API server checks it against.
    if path == ".spec.payload" {
        obj.remove("default");
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        for (k, v) in props.iter_mut() {
            tidy(v, &format!("{path}.{k}"));
        }
    }
    if let Some(items) = obj.get_mut("items") {
        tidy(items, &format!("{path}[]"));
    }
    if let Some(extra) = obj.get_mut("additionalProperties") {
        tidy(extra, &format!("{path}.*"));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(list)) = obj.get_mut(key) {
            for v in list {
                tidy(v, path);
            }
        }
    }
}

/// All CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    let docs = crds();
    docs.iter()
        .map(|c| serde_saphyr::to_string(c).expect("CRDs serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description").is_none() {
                    out.push(p.clone());
                }
                undocumented(v, &p, out);
                if let Some(items) = v.get("items") {
                    undocumented(items, &format!("{p}[]"), out);
                }
            }
        }
    }

    /// Every field shows text in `kubectl explain`.
    #[test]
    fn every_field_has_a_description() {
        for crd in crds() {
            let v = serde_json::to_value(&crd).unwrap();
            let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let mut missing = vec![];
            undocumented(&schema["properties"]["spec"], "spec", &mut missing);
            undocumented(&schema["properties"]["status"], "status", &mut missing);
            assert!(
                missing.is_empty(),
                "{}: undocumented {missing:?}",
                crd.spec.names.kind
            );
            assert!(
                schema["properties"]["spec"]["properties"]
                    .as_object()
                    .unwrap()
                    .len()
                    > 5
            );
        }
    }
}

#[cfg(test)]
mod cel_tests {
    use crate::api::{Payload, Resources, SshSettings};
    use serde_json::json;

    /// The admission rules, evaluated by kube's CEL engine exactly as written into the CRDs.
    #[test]
    fn admission_rules_accept_and_reject() {
        assert!(Payload::validate_cel(&json!({"inline": "echo"}), None).is_ok());
        let two = Payload::validate_cel(&json!({"inline": "echo", "command": ["ls"]}), None);
        assert!(format!("{:?}", two.unwrap_err()).contains("exactly one of path, inline"));
        assert!(Payload::validate_cel(&json!({"args": ["x"]}), None).is_err());

        let ssh = json!({"host": "h", "user": "u", "port": 22, "keySecretRef": {"name": "s", "key": "k"}});
        assert!(SshSettings::validate_cel(&ssh, None).is_ok());
        let mut both = ssh.clone();
        both["passwordEnv"] = json!("PW");
        assert!(SshSettings::validate_cel(&both, None).is_err());
        let mut otp = ssh.clone();
        otp["totpSecretRef"] = json!({"name": "s", "key": "totp"});
        assert!(SshSettings::validate_cel(&otp, None).is_ok());
        otp["totpEnv"] = json!("SEED");
        let two_seeds = SshSettings::validate_cel(&otp, None);
        assert!(format!("{:?}", two_seeds.unwrap_err()).contains("at most one of totpSecretRef"));

        assert!(Resources::validate_cel(&json!({"mem": "1G"}), None).is_ok());
        assert!(Resources::validate_cel(&json!({"mem": "1G", "memPerCpu": "1G"}), None).is_err());
    }

    #[test]
    fn crds_carry_rules_and_selectable_phase() {
        let yaml = super::crds_yaml();
        assert!(yaml.contains("x-kubernetes-validations"));
        assert!(yaml.contains(
            "exactly one of keySecretRef, keyPath, passwordSecretRef, passwordEnv must be set"
        ));
        assert!(yaml.contains("jsonPath: .status.phase"));
        assert!(yaml.contains("selectableFields"));
    }
}
