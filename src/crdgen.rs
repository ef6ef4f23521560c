//! CustomResourceDefinitions generated from the Rust types; `crds/` holds this output.

use crate::api::{SlurmAsset, SlurmCluster};
use kube::CustomResourceExt;

/// All CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    let docs = [SlurmAsset::crd(), SlurmCluster::crd()];
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
        for crd in [SlurmAsset::crd(), SlurmCluster::crd()] {
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
