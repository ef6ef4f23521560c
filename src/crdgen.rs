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
