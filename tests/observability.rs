//! The chart's Grafana dashboard and PrometheusRule use only metrics the operator exports
//! (issue 15): the real Helm engine renders both, Prometheus' grammar (promql-parser) parses
//! every expression (`tests/helm/chart_promql.py`), and each metric name — with the labels it
//! is matched on — is looked up on the `/metrics` of the real operator binary, run against the
//! real API server until every family the expressions use has samples.

mod common;
use common::k8s::{Namespace, kubeconfig, kubectl_ok};
use common::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Series in the expressions that Prometheus itself makes, not the operator: `up` (one per
/// scrape target: the operator-down alert).
const PROMETHEUS_OWN: &[&str] = &["up"];

/// Labels that Prometheus adds when it scrapes (the ServiceMonitor's target labels).
const TARGET_LABELS: &[&str] = &[
    "job",
    "namespace",
    "pod",
    "instance",
    "service",
    "endpoint",
    "container",
];

/// A metric name and the labels it is matched on.
type Selector = (String, Vec<String>);
/// Where an expression is (alert or dashboard panel), the expression, its selectors.
type Expression = (String, String, Vec<Selector>);

/// Every PromQL expression of the chart.
fn chart_expressions() -> Vec<Expression> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-tools/bin/python3");
    assert!(
        std::path::Path::new(python).exists(),
        "run scripts/test-chart first: it prepares the Helm engine and promql-parser"
    );
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/helm/chart_promql.py"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chart_promql.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.iter()
        .map(|e| {
            let selectors = e["selectors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels = s["labels"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| l.as_str().unwrap().to_string())
                        .collect();
                    (s["name"].as_str().unwrap().to_string(), labels)
                })
                .collect();
            (
                e["source"].as_str().unwrap().to_string(),
                e["expr"].as_str().unwrap().to_string(),
                selectors,
            )
        })
        .collect()
}

/// What `/metrics` exposes: every series name with the label names its samples carry, and
/// the families by their `# TYPE`.
#[derive(Default, Debug)]
struct Exposition {
    series: BTreeMap<String, BTreeSet<String>>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    e.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let labels = e.series.entry(name.to_string()).or_default();
            if line[end..].starts_with('{') {
                let close = line.rfind('}').expect("a closed label set");
                for pair in split_labels(&line[end + 1..close]) {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
        e
    }

    /// The family of a series name: `x_total` of counter `x`, `x_bucket`/`_sum`/`_count` of
    /// histogram `x`, else the name itself.
    fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_total", "_bucket", "_sum", "_count", "_created"] {
            if let Some(base) = name.strip_suffix(suffix)
                && self.types.contains_key(base)
            {
                return base;
            }
        }
        name
    }
}

/// Label pairs of `a="x",b="y, z"` (commas inside quoted values kept).
fn split_labels(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut escaped) = (vec![], String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

struct Operator(Child, u16);

impl Operator {
    fn scrape(&self) -> Option<String> {
        scrape_metrics(self.1)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which names the expressions use that /metrics lacks (a name, or a label it is matched on).
fn missing(exprs: &[Expression], exposed: &Exposition) -> Vec<String> {
    let mut out = vec![];
    for (source, _, selectors) in exprs {
        for (name, labels) in selectors {
            if PROMETHEUS_OWN.contains(&name.as_str()) {
                continue;
            }
            let Some(carried) = exposed.series.get(name) else {
                out.push(format!("{source}: metric {name}"));
                continue;
            };
            for l in labels {
                if !TARGET_LABELS.contains(&l.as_str()) && !carried.contains(l) {
                    out.push(format!("{source}: label {l} of {name}"));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_operator_exports() {
    let exprs = chart_expressions();
    assert!(exprs.iter().any(|e| e.0.starts_with("PrometheusRule")));
    assert!(exprs.iter().any(|e| e.0.starts_with("dashboard")));
    for (source, expr, selectors) in &exprs {
        for (name, _) in selectors {
            assert!(
                name.starts_with("slurm_asset_operator_")
                    || (PROMETHEUS_OWN.contains(&name.as_str()) && source.contains("OperatorDown")),
                "{source} uses {name}, which the operator does not make: {expr}"
            );
        }
    }

    // The operator, and objects that make every family have samples: an asset that reaches
    // Submitting on a cluster nobody answers for (phase gauges and transitions), whose deletion
    // then waits for a cancel the cluster cannot confirm (a reconcile error of its kind).
    let ns = Namespace::new("observability");
    let work = tempfile::tempdir().unwrap();
    ns.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssh"},
                    "data": {"key": b64("not a key")}}),
    );
    ns.apply(
        json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmCluster",
        "metadata": {"name": "nowhere"},
        "spec": {"mode": "slurm", "ssh": {"host": "127.0.0.1", "port": 1, "user": "u",
                 "keySecretRef": {"name": "ssh", "key": "key"}, "connectTimeout": "1s"}}}),
    );
    let port = free_port();
    let op = Operator(
        Command::new(BIN)
            .args(["run", &format!("--namespace={}", ns.0)])
            .arg(format!("--metrics-port={port}"))
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .arg("--work-dir")
            .arg(work.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    );
    ns.apply(
        json!({"apiVersion": "dagster-slurm.io/v1alpha1", "kind": "SlurmAsset",
        "metadata": {"name": "stuck"},
        "spec": {"assetKey": "t/stuck", "clusterRef": "nowhere", "payload": {"inline": "true"}}}),
    );
    ns.wait(
        "slurmasset",
        "stuck",
        "Submitting with the finalizer",
        |o| {
            o["status"]["phase"] == "Submitting"
                && o["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
        },
    )
    .await;
    ns.delete("slurmasset", "stuck");

    let deadline = Instant::now() + Duration::from_secs(90);
    let (exposed, text) = loop {
        let text = op.scrape().unwrap_or_default();
        let exposed = Exposition::parse(&text);
        if missing(&exprs, &exposed).is_empty() || Instant::now() > deadline {
            break (exposed, text);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lacking = missing(&exprs, &exposed);
    assert!(
        lacking.is_empty(),
        "the chart's PromQL uses what /metrics does not have:\n  {}\n/metrics:\n{text}",
        lacking.join("\n  ")
    );
    // The cluster that never answers is reported so, under its own name and namespace.
    let unreachable = format!(
        "slurm_asset_operator_cluster_reachable{{cluster_namespace=\"{}\",cluster=\"nowhere\"}} 0",
        ns.0
    );
    assert!(text.contains(&unreachable), "{unreachable} not in:\n{text}");
    // Histogram series are used as the histogram's own (_bucket, _sum, _count).
    assert_eq!(
        exposed.family("slurm_asset_operator_submit_latency_seconds_bucket"),
        "slurm_asset_operator_submit_latency_seconds"
    );
    assert_eq!(
        exposed.types["slurm_asset_operator_submit_latency_seconds"],
        "histogram"
    );

    // And the dashboard shows every family the operator exports.
    let dashboard: BTreeSet<&str> = exprs
        .iter()
        .filter(|e| e.0.starts_with("dashboard"))
        .flat_map(|e| e.2.iter().map(|(n, _)| exposed.family(n)))
        .collect();
    let unshown: Vec<&String> = exposed
        .types
        .keys()
        .filter(|f| !dashboard.contains(f.as_str()))
        .collect();
    assert!(
        unshown.is_empty(),
        "metrics missing from charts/slurm-asset-operator/dashboards/slurm-asset-operator.json: {unshown:?}"
    );

    // Release the held asset (its cluster never answers).
    kubectl_ok(
        &[
            "annotate",
            "-n",
            &ns.0,
            "slurmasset",
            "stuck",
            "dagster-slurm.io/force-release=true",
        ],
        None,
    );
    ns.wait("slurmasset", "stuck", "released", |o| o.is_null())
        .await;
}

#[test]
fn the_exposition_parser_reads_names_labels_and_families() {
    let e = Exposition::parse(
        "# HELP a_x Xs.\n# TYPE a_x counter\na_x_total{kind=\"k, with comma\",phase=\"P\"} 1\n\
         # TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\nh_sum 0.0\nh_count 0\nplain 3\n# EOF\n",
    );
    assert_eq!(
        e.series["a_x_total"],
        BTreeSet::from(["kind".to_string(), "phase".to_string()])
    );
    assert_eq!(e.family("a_x_total"), "a_x");
    assert_eq!(e.family("h_count"), "h");
    assert_eq!(e.family("plain"), "plain");
    assert!(e.series["h_sum"].is_empty());
}

#[test]
fn a_name_or_label_the_operator_lacks_is_reported() {
    let exposed = Exposition::parse(
        "# TYPE m_assets gauge\nm_assets{phase=\"Running\"} 1\n# TYPE m_r counter\nm_r_total 0\n",
    );
    let sel = |n: &str, l: &[&str]| (n.to_string(), l.iter().map(|s| s.to_string()).collect());
    let exprs = vec![
        (
            "good".to_string(),
            String::new(),
            vec![
                sel("m_assets", &["phase", "namespace"]),
                sel("up", &["job"]),
            ],
        ),
        (
            "bad".to_string(),
            String::new(),
            vec![
                sel("m_r", &[]),
                sel("m_assets", &["cluster"]),
                sel("m_r_total", &[]),
            ],
        ),
    ];
    assert_eq!(
        missing(&exprs, &exposed),
        ["bad: metric m_r", "bad: label cluster of m_assets"]
    );
}
