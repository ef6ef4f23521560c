//! Prometheus metrics (`/metrics`) and health endpoints (`/healthz`, `/readyz`).

use crate::api::Phase;
use crate::executor::slurm::Counters;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Not `namespace`: Prometheus' own target label of that name would displace it.
    pub cluster_namespace: String,
    pub cluster: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub phases: Family<PhaseLabels, Counter>,
    /// Assets currently in each phase (Kubernetes mode), from the last reconcile of each.
    pub assets: Family<PhaseLabels, Gauge>,
    /// 1 while a SlurmCluster's last connection attempt succeeded, 0 while it fails.
    pub cluster_reachable: Family<ClusterLabels, Gauge>,
    current: std::sync::Mutex<std::collections::HashMap<String, Phase>>,
    /// Transport and scheduler counters shared with the executors.
    pub counters: Arc<Counters>,
    pub ready: AtomicBool,
    /// Whether this replica holds the leader Lease (always true without leader election).
    pub leader: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("slurm_asset_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let phases = Family::<PhaseLabels, Counter>::default();
        let assets = Family::<PhaseLabels, Gauge>::default();
        let counters = Arc::new(Counters::default());
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile errors by kind",
            errors.clone(),
        );
        registry.register(
            "phase_transitions",
            "Assets entering each phase",
            phases.clone(),
        );
        registry.register("assets", "Assets currently in each phase", assets.clone());
        let cluster_reachable = Family::<ClusterLabels, Gauge>::default();
        registry.register(
            "cluster_reachable",
            "Whether each SlurmCluster answers over SSH (1) or not (0)",
            cluster_reachable.clone(),
        );
        registry.register(
            "submit_latency_seconds",
            "Time from the start of a Slurm submission to its job ID",
            counters.submit_latency.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            phases,
            assets,
            cluster_reachable,
            current: Default::default(),
            counters,
            ready: AtomicBool::new(false),
            leader: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn reconcile_error(&self, err: &crate::ReconcileError) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: err.kind().into(),
            })
            .inc();
    }

    pub fn phase_change(&self, phase: Phase) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().into(),
            })
            .inc();
    }

    /// Records the phase an asset (by UID) is in now; `None` once it is gone.
    pub fn asset_phase(&self, uid: &str, phase: Option<Phase>) {
        let mut current = self.current.lock().expect("metrics lock");
        let before = match phase {
            Some(p) => current.insert(uid.to_string(), p),
            None => current.remove(uid),
        };
        if before == phase {
            return;
        }
        let gauge = |p: Phase| {
            self.assets.get_or_create(&PhaseLabels {
                phase: p.as_str().into(),
            })
        };
        if let Some(p) = before {
            gauge(p).dec();
        }
        if let Some(p) = phase {
            gauge(p).inc();
        }
    }

    /// Records whether SlurmCluster `namespace/cluster` answers.
    pub fn cluster_reachable(&self, namespace: &str, cluster: &str, reachable: bool) {
        self.cluster_reachable
            .get_or_create(&ClusterLabels {
                cluster_namespace: namespace.into(),
                cluster: cluster.into(),
            })
            .set(i64::from(reachable));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .expect("writing to a String");
        let c = &self.counters;
        for (name, help, v) in [
            (
                "ssh_connects",
                "SSH master connections established",
                &c.ssh_connects,
            ),
            (
                "ssh_reconnects",
                "SSH masters lost and re-established",
                &c.ssh_reconnects,
            ),
            (
                "scheduler_polls",
                "Batched polls that queried the scheduler",
                &c.scheduler_polls,
            ),
            (
                "scheduler_queries",
                "squeue and sacct commands run by polls",
                &c.scheduler_queries,
            ),
            (
                "exit_notices",
                "Job ends learnt from exit files without asking the scheduler",
                &c.exit_notices,
            ),
            (
                "remote_commands",
                "Remote commands run over SSH",
                &c.remote_commands,
            ),
            (
                "scheduler_poll_failures",
                "Polls whose connection, squeue or sacct failed",
                &c.scheduler_poll_failures,
            ),
        ] {
            out.push_str(&format!(
                "# HELP slurm_asset_operator_{name} {help}.\n# TYPE slurm_asset_operator_{name} counter\nslurm_asset_operator_{name}_total {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP slurm_asset_operator_leader Whether this replica leads (holds the Lease).\n# TYPE slurm_asset_operator_leader gauge\nslurm_asset_operator_leader {}\n",
            u8::from(self.leader.load(Ordering::Relaxed))
        ));
        out.push_str("# EOF\n");
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `port` until the process ends.
pub async fn serve(metrics: Arc<Metrics>, port: u16) -> std::io::Result<()> {
    use axum::{Router, http::StatusCode, routing::get};
    let m = metrics.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                // The body is OpenMetrics (`# EOF`, counters' TYPE without `_total`).
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let m = metrics.clone();
                async move {
                    if m.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_families() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.phase_change(Phase::Running);
        m.counters.ssh_connects.fetch_add(2, Ordering::Relaxed);
        m.counters.submit_latency.observe(0.3);
        m.asset_phase("a", Some(Phase::Queued));
        m.asset_phase("b", Some(Phase::Queued));
        m.asset_phase("a", Some(Phase::Running));
        m.asset_phase("b", None);
        let text = m.render();
        assert!(
            text.contains("slurm_asset_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_phase_transitions_total{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_ssh_connects_total 2"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_ssh_reconnects_total 0"),
            "{text}"
        );
        assert!(text.contains("slurm_asset_operator_leader 0\n"), "{text}");
        assert!(
            text.contains("slurm_asset_operator_submit_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_submit_latency_seconds_bucket{le=\"0.4\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_assets{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slurm_asset_operator_assets{phase=\"Queued\"} 0"),
            "{text}"
        );
    }
}
