//! slurm-asset-operator: runs Dagster assets on Slurm clusters.
//!
//! The crate is split like `kube-rs/controller-rs`: the pure domain core ([`core`]) decides,
//! thin adapters ([`executor`], [`standalone`]) perform I/O.

pub mod api;
pub mod backend;
pub mod conditions;
pub mod controller;
pub mod core;
pub mod crdgen;
pub mod credentials;
pub mod environment;
pub mod executor;
pub mod files;
pub mod jobscript;
pub mod launcher;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod pipes;
pub mod quantity;
pub mod sbatch_options;
pub mod session;
pub mod shell;
pub mod slurm;
pub mod standalone;
pub mod status_table;
pub mod transport;
pub mod worker;

/// Errors of the operator's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message, not a `source` too: a chain printed with
    /// `{:#}` would say it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0}")]
    Manifest(#[from] manifest::ManifestError),
    #[error("serializing {what}: {reason}")]
    Serialize { what: String, reason: String },
    #[error("executor: {0}")]
    Executor(String),
    #[error("ssh: {0}")]
    Transport(String),
    /// A newer leader has submitted for this asset: this replica must not.
    #[error(
        "fenced: leadership epoch {epoch} is older than epoch {fence}, which already submitted for this asset; this replica no longer submits"
    )]
    Fenced { epoch: u64, fence: u64 },
    #[error("file watcher: {0}")]
    Watch(#[from] notify::Error),
    /// A command given something it cannot work with (a directory without manifests or
    /// status, say): the message says what and where.
    #[error("{0}")]
    Usage(String),
}

/// Errors of one reconcile in Kubernetes mode (counted by kind on `/metrics`).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("cancel not confirmed yet: {0}")]
    CancelPending(String),
    #[error("{0}")]
    Io(String),
}

impl ReconcileError {
    /// The metric label of the error.
    pub fn kind(&self) -> &'static str {
        match self {
            ReconcileError::Kube(_) => "kube",
            ReconcileError::Finalizer(_) => "finalizer",
            ReconcileError::CancelPending(_) => "cancel_pending",
            ReconcileError::Io(_) => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns, so every message names its file.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            error: source,
        }
    }
}
