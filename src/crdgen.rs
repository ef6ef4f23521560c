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
