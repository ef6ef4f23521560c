//! The `slurm-asset-operator` binary: the edge where `anyhow` and the CLI live.

use anyhow::Context;
use clap::{Parser, Subcommand};
use slurm_asset_operator::api::ClusterMode;
use slurm_asset_operator::jobscript::{PlanContext, RunId, plan, render_script, submit_argv};
use slurm_asset_operator::manifest::{Kind, StoreKind, describe, parse_file};
use slurm_asset_operator::{crdgen, executor, shell, standalone, status_table};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "Runs Dagster assets on Slurm: reconciles SlurmAsset manifests"
)]
struct Cli {
    /// Log as JSON lines instead of text (RUST_LOG filters, e.g. RUST_LOG=debug).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile the manifests in a directory; status files go to DIR/.status.
    Standalone {
        /// Directory of manifests (*.yaml, *.yml, also in subdirectories); status goes to
        /// DIR/.status.
        #[arg(long)]
        dir: PathBuf,
        /// Exit when every asset is terminal: 0 if all succeeded, 1 if any failed or a manifest
        /// is invalid.
        #[arg(long)]
        once: bool,
    },
    /// Print the job script and the exact submit command a manifest would produce. No side effects.
    Render {
        /// A manifest file holding the asset (its cluster may be in the same directory).
        file: PathBuf,
        /// Which asset of the file (default: the only one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the CustomResourceDefinitions of all kinds.
    Crds,
    /// Kubernetes mode: reconcile SlurmAsset resources (--kubeconfig, KUBECONFIG, ~/.kube/config,
    /// else the pod's in-cluster configuration).
    Run {
        /// Kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Kubeconfig context to use instead of the current one.
        #[arg(long)]
        context: Option<String>,
        /// Let assets run on the operator's own host (local mode). Off by default: a payload
        /// there runs beside the operator's credentials, so only enable it for development.
        #[arg(long)]
        allow_local_execution: bool,
        /// Read Secrets with `get` only, never list or watch them (for a namespaced RBAC): an
        /// asset waiting for a Secret looks again every minute instead of at once.
        #[arg(long)]
        no_secret_watch: bool,
        /// How long deleting an asset waits for a cancel its cluster cannot confirm before the
        /// object is released anyway (with a Warning Event), e.g. `10m`.
        #[arg(long, default_value = "10m")]
        #[arg(value_parser = |s: &str| slurm_asset_operator::quantity::Interval::parse(s))]
        release_grace: slurm_asset_operator::quantity::Interval,
        /// Watch only this namespace (default: all namespaces).
        #[arg(long)]
        namespace: Option<String>,
        /// Port of /metrics, /healthz and /readyz.
        #[arg(long, default_value_t = 8080)]
        metrics_port: u16,
        /// Take a Lease before reconciling, so that several replicas can run.
        #[arg(long)]
        leader_election: bool,
        /// Name of the Lease that elects the leader.
        #[arg(long, default_value = "slurm-asset-operator")]
        lease_name: String,
        /// Namespace of the Lease (default: the namespace of the service account).
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Private working directory (SSH key files, local run directories).
        #[arg(long, default_value = "/tmp/slurm-asset-operator")]
        work_dir: PathBuf,
    },
    /// Print a table of every asset's status under DIR.
    Status {
        /// The directory `standalone --dir` reconciles.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Internal: supervise one local attempt (started by the operator).
    #[command(hide = true)]
    LocalSupervise {
        #[arg(long)]
        run_dir: PathBuf,
        /// Paths the job must not see (repeatable).
        #[arg(long)]
        hide: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    // Invoked by ssh as the ProxyCommand of a login behind jump hosts (`jump-proxy HOST PORT`,
    // the hops in the environment): run the ssh to the next hop. Before askpass, whose
    // secrets may be in the same environment: the tunnel is this process's stdout.
    {
        use slurm_asset_operator::transport::{JUMP_CHAIN_ENV, run_jump_proxy};
        // args_os: an ssh prompt (askpass's argument) need not be UTF-8.
        let args: Vec<String> = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let ([_, mode, host, port], Ok(chain)) = (&args[..], std::env::var(JUMP_CHAIN_ENV))
            && mode == "jump-proxy"
        {
            return match run_jump_proxy(&chain, host, port) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(255)
                }
            };
        }
    }
    // Invoked by ssh as SSH_ASKPASS (with the prompt as the only argument): answer with the
    // password or a one-time code from the secrets the operator put into this one ssh
    // process's environment.
    {
        use slurm_asset_operator::transport::{ASKPASS_ENV, ASKPASS_TOTP_ENV, askpass_answer};
        let password = std::env::var(ASKPASS_ENV).ok();
        let totp = std::env::var(ASKPASS_TOTP_ENV).ok();
        if password.is_some() || totp.is_some() {
            let prompt = std::env::args().nth(1).unwrap_or_default();
            let now = jiff::Timestamp::now().as_second().max(0) as u64;
            return match askpass_answer(&prompt, password.as_deref(), totp.as_deref(), now) {
                Some(answer) => {
                    println!("{answer}");
                    ExitCode::SUCCESS
                }
                None => ExitCode::FAILURE,
            };
        }
    }
    let cli = Cli::parse();
    if let Command::LocalSupervise { run_dir, hide } = &cli.command {
        return ExitCode::from(executor::local::supervise(run_dir, hide) as u8);
    }
    init_logging(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        // Colour only for a person at a terminal (and never under NO_COLOR): a log file or CI
        // log would get the escape codes as text.
        use std::io::IsTerminal;
        let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        builder.with_ansi(colour).init();
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Standalone { dir, once } => {
            let exe = std::env::current_exe().context("locating the operator binary")?;
            let rt = tokio::runtime::Runtime::new()?;
            let outcome = rt.block_on(standalone::run(standalone::Options { dir, once, exe }))?;
            if once {
                eprintln!(
                    "{} succeeded, {} failed, {} manifest errors",
                    outcome.succeeded, outcome.failed, outcome.manifest_errors
                );
                if outcome.failed > 0 || outcome.manifest_errors > 0 {
                    return Ok(ExitCode::from(1));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Render { file, name } => {
            print!("{}", render(&file, name.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            kubeconfig,
            context,
            allow_local_execution,
            no_secret_watch,
            release_grace,
            namespace,
            metrics_port,
            leader_election,
            lease_name,
            lease_namespace,
            work_dir,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(run_kubernetes(RunOptions {
                kubeconfig,
                context,
                allow_local_execution,
                no_secret_watch,
                release_grace,
                namespace,
                metrics_port,
                leader_election,
                lease_name,
                lease_namespace,
                work_dir,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds => {
            print!("{}", crdgen::crds_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { dir } => {
            print!("{}", status_table::render(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::LocalSupervise { .. } => unreachable!("handled before logging starts"),
    }
}

struct RunOptions {
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    allow_local_execution: bool,
    no_secret_watch: bool,
    release_grace: slurm_asset_operator::quantity::Interval,
    namespace: Option<String>,
    metrics_port: u16,
    leader_election: bool,
    lease_name: String,
    lease_namespace: Option<String>,
    work_dir: PathBuf,
}

/// Waits until this replica holds the Lease, and returns the manager that holds it. A lease
/// manager alone sleeps until the holder's lease would expire, on its cached view of the
/// Lease; a watch on the Lease starts a fresh manager as soon as the holder releases it (a
/// leader stopping on SIGTERM), so that the standby takes over at once.
async fn campaign(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> anyhow::Result<kube_lease_manager::LeaseManager> {
    use futures::StreamExt;
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), namespace);
    let config = kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut released = kube::runtime::watcher(leases, config)
        .filter_map(|event| async move {
            let lease = match event.ok()? {
                kube::runtime::watcher::Event::Apply(l) => l,
                kube::runtime::watcher::Event::Delete(_) => return Some(()),
                _ => return None,
            };
            let holder = lease.spec.and_then(|s| s.holder_identity);
            holder.is_none_or(|h| h.is_empty()).then_some(())
        })
        .boxed();
    loop {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), name)
            .with_namespace(namespace)
            .with_identity(identity)
            .build()
            .await?;
        tokio::select! {
            won = manager.changed() => {
                if won? {
                    return Ok(manager);
                }
            }
            // Released: campaign again now, on a fresh view of the Lease.
            Some(()) = released.next() => {}
        }
    }
}

/// The API server's configuration. A kubeconfig that was asked for (`--kubeconfig`,
/// `KUBECONFIG`, a `--context`) or that exists must load, and its error is the one reported;
/// the pod's in-cluster account is used only when no kubeconfig is there at all.
async fn client_config(o: &RunOptions) -> anyhow::Result<kube::Config> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: o.context.clone(),
        ..Default::default()
    };
    let env = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
    let home = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".kube/config"))
        .filter(|p| p.exists());
    let (file, origin) = match (&o.kubeconfig, &env, home) {
        (Some(f), _, _) => (Some(f.clone()), "--kubeconfig"),
        (None, Some(_), _) => (None, "KUBECONFIG"),
        (None, None, Some(h)) => (Some(h), "~/.kube/config"),
        (None, None, None) => {
            if let Some(ctx) = &o.context {
                anyhow::bail!(
                    "--context {ctx}: no kubeconfig to take it from (use --kubeconfig or KUBECONFIG)"
                );
            }
            tracing::info!("no kubeconfig: using the in-cluster configuration");
            return kube::Config::incluster()
                .context("loading the in-cluster configuration (no kubeconfig was found)");
        }
    };
    let kubeconfig = match &file {
        Some(f) => Kubeconfig::read_from(f)
            .with_context(|| format!("reading the kubeconfig {} ({origin})", f.display()))?,
        None => Kubeconfig::from_env()
            .context("reading the kubeconfig named by KUBECONFIG")?
            .context("KUBECONFIG names no kubeconfig")?,
    };
    let shown = file
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "KUBECONFIG".into());
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| match &o.context {
            Some(ctx) => format!("using context {ctx:?} of {shown}"),
            None => format!("using the current context of {shown}"),
        })?;
    tracing::info!("API server {} (kubeconfig {shown})", config.cluster_url);
    Ok(config)
}

/// Kubernetes mode: metrics server, optional leader election, then the controller. Losing the
/// lease stops the controller and the process, so that a restarted pod campaigns again.
async fn run_kubernetes(o: RunOptions) -> anyhow::Result<()> {
    use slurm_asset_operator::{controller, metrics};
    use std::os::unix::fs::PermissionsExt;
    let config = client_config(&o).await?;
    let default_ns = config.default_namespace.clone();
    let client = kube::Client::try_from(config)?;
    std::fs::create_dir_all(&o.work_dir)?;
    std::fs::set_permissions(&o.work_dir, std::fs::Permissions::from_mode(0o700))?;
    let metrics = std::sync::Arc::new(metrics::Metrics::default());
    let server = tokio::spawn(metrics::serve(metrics.clone(), o.metrics_port));
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(true);
    // Ready once serving: a standby replica is healthy too (a readiness tied to leadership
    // would stall every rolling update). Leadership shows as the `leader` gauge.
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut epoch = 0;
    let lease = if o.leader_election {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| uuid::Uuid::new_v4().to_string());
        let lease_ns = o.lease_namespace.clone().unwrap_or(default_ns);
        tracing::info!("waiting for the lease {}", o.lease_name);
        let manager = campaign(&client, &lease_ns, &o.lease_name, &identity).await?;
        // Leading: from here the manager's own loop renews the Lease.
        let (mut rx, task) = manager.watch().await;
        epoch = leadership_epoch(&client, &lease_ns, &o.lease_name, &identity).await?;
        tracing::info!(epoch, "leading");
        metrics
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let tx = leader_tx.clone();
        let monitor = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                if !*rx.borrow() {
                    let _ = tx.send(false);
                    break;
                }
            }
        });
        Some((monitor, task))
    } else {
        metrics
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
        None
    };
    let exe = std::env::current_exe()?;
    let ctx = std::sync::Arc::new(
        controller::Context::new(client, exe, o.work_dir.clone(), metrics)
            .with_epoch(epoch)
            .with_local_execution(o.allow_local_execution)
            .with_secret_watch(!o.no_secret_watch)
            .with_release_grace(o.release_grace.duration()),
    );
    let mut rx = leader_rx;
    let shutdown = async move {
        let stop = async {
            loop {
                if !*rx.borrow_and_update() || rx.changed().await.is_err() {
                    break;
                }
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = stop => tracing::warn!("lost the lease; stopping"),
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    tracing::info!(
        namespace = o.namespace.as_deref().unwrap_or("(all)"),
        epoch,
        "reconciling SlurmAssets"
    );
    controller::run(ctx.clone(), o.namespace, shutdown).await;
    // The SSH masters would otherwise linger for their ControlPersist time.
    ctx.close_connections().await;
    tracing::info!("stopped");
    if let Some((monitor, task)) = lease {
        // Dropping the last receiver makes the manager release the Lease, so that a standby
        // takes over at once instead of after the lease duration.
        monitor.abort();
        let _ = monitor.await;
        match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the lease"),
            Ok(Ok(Err(e))) => tracing::warn!("releasing the lease: {e}"),
            Ok(Err(e)) => tracing::warn!("lease task: {e}"),
            Err(_) => tracing::warn!("releasing the lease timed out"),
        }
    }
    server.abort();
    Ok(())
}

/// The leadership epoch, the fencing token of every submission (see `executor::slurm`). It must
/// rise with every new leader, also across a re-created Lease (a reinstalled release, an
/// administrator's cleanup), whose `leaseTransitions` start again at 0. So it combines the
/// Lease's creation time, set by the API server's clock, with its transitions:
/// `creation seconds × 1,000,000 + leaseTransitions + 1`.
async fn leadership_epoch(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
) -> anyhow::Result<u64> {
    use k8s_openapi::api::coordination::v1::Lease;
    let lease = kube::Api::<Lease>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading the Lease {namespace}/{name}"))?;
    let created = lease
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second().max(0) as u64)
        .unwrap_or(0);
    let spec = lease.spec.unwrap_or_default();
    anyhow::ensure!(
        spec.holder_identity.as_deref() == Some(identity),
        "the Lease {namespace}/{name} is held by {:?}, not by this replica",
        spec.holder_identity
    );
    Ok(lease_epoch(created, spec.lease_transitions.unwrap_or(0)))
}

/// See [`leadership_epoch`]; +1 because epoch 0 means "not fenced".
fn lease_epoch(created_seconds: u64, transitions: i32) -> u64 {
    created_seconds * 1_000_000 + transitions.max(0) as u64 + 1
}

/// Renders the job script and submit command of one asset in `file`; its cluster is looked up
/// in the same file, then in the other manifests of the file's directory.
fn render(file: &std::path::Path, name: Option<&str>) -> anyhow::Result<String> {
    if file.is_dir() {
        anyhow::bail!(
            "{} is a directory: render takes one manifest file (status --dir shows a directory's assets)",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut objects = vec![];
    for doc in parse_file(file, &text, StoreKind::Standalone) {
        objects.push(doc?);
    }
    // A bare file name's parent is "", not ".".
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let assets: Vec<_> = objects
        .iter()
        .filter(|o| o.kind == Kind::SlurmAsset)
        .collect();
    let names = || {
        assets
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let picked: Vec<_> = assets
        .iter()
        .filter(|o| name.is_none_or(|n| o.name == n))
        .collect();
    let asset = match (picked.as_slice(), name) {
        ([one], _) => **one,
        ([], _) if assets.is_empty() => anyhow::bail!(
            "{}: no SlurmAsset in this file (it has {})",
            file.display(),
            if objects.is_empty() {
                "no objects".to_string()
            } else {
                objects
                    .iter()
                    .map(|o| format!("{} {}", o.kind.as_str(), o.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        ([], Some(n)) => anyhow::bail!(
            "{}: no SlurmAsset named {n:?} (the file has: {})",
            file.display(),
            names()
        ),
        _ => anyhow::bail!(
            "{}: {} SlurmAssets ({}): pick one with --name",
            file.display(),
            assets.len(),
            names()
        ),
    };
    let spec = match &asset.spec {
        Ok(_) => asset.asset().context("not a SlurmAsset")?,
        Err(e) => anyhow::bail!("{}: {}", file.display(), describe(e)),
    };
    let mut cluster = (
        slurm_asset_operator::api::SlurmClusterSpec::default(),
        dir.clone(),
    );
    if let Some(cref) = &spec.cluster_ref {
        let snap = standalone::store::scan(&dir);
        let found = objects
            .iter()
            .chain(snap.objects.values())
            .find(|o| {
                o.kind == Kind::SlurmCluster && &o.name == cref && o.namespace == asset.namespace
            })
            .with_context(|| {
                format!(
                    "spec.clusterRef: SlurmCluster {cref:?} not found beside {}",
                    file.display()
                )
            })?;
        let c = match &found.spec {
            Ok(_) => found.cluster().context("not a cluster")?.clone(),
            Err(e) => anyhow::bail!("SlurmCluster {cref:?}: {}", describe(e)),
        };
        cluster = (c, found.file.parent().unwrap_or(&dir).to_path_buf());
    }
    let ctx = PlanContext {
        asset_dir: &dir,
        cluster: &cluster.0,
        cluster_dir: &cluster.1,
        default_base: match cluster.0.mode {
            ClusterMode::Local => dir.join(".runs"),
            ClusterMode::Slurm => "$HOME/.slurm-asset-operator".into(),
        },
        remote_home: Some("$HOME"),
    };
    let id = RunId {
        namespace: asset.namespace.clone(),
        name: asset.name.clone(),
        uid: "<uid>".into(),
        run: 1,
        attempt: 1,
        epoch: 0,
        session: false,
    };
    let plan = plan(spec, id, &ctx).map_err(anyhow::Error::msg)?;
    let exe = std::env::current_exe()?.display().to_string();
    let mut out = format!(
        "# submit command ({}):\n",
        match plan.mode {
            ClusterMode::Local => "local mode",
            ClusterMode::Slurm => "slurm mode; the remote home shows as $HOME",
        }
    );
    out.push_str(&shell::join(&submit_argv(&plan, &exe)));
    out.push_str("\n\n# job script (");
    out.push_str(&plan.run_dir);
    out.push_str("/job.sh):\n");
    out.push_str(&render_script(&plan));
    if let Some((name, content)) = &plan.payload_file {
        out.push_str(&format!(
            "\n# payload file {name}: {} bytes\n",
            content.len()
        ));
    }
    Ok(out)
}
