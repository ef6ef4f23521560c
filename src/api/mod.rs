//! The custom resources of API group `dagster-slurm.io/v1alpha1` (DESIGN section 2).

pub mod asset;
pub mod cluster;
pub mod common;
pub mod session;
pub mod time;

pub use asset::*;
pub use cluster::*;
pub use common::*;
pub use session::*;

pub const GROUP: &str = "dagster-slurm.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "dagster-slurm.io/v1alpha1";
