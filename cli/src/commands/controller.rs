//! `basalt controller`: serve one replicated volume over iSCSI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use basalt_target::iscsi::portal::{Portal, PortalConfig, Target, TargetConfig};
use basalt_target::scsi::{LuConfig, ScsiLogicalUnit};
use tokio_util::sync::CancellationToken;

use super::args::{parse_duration, parse_volume_size};
use basalt_engine::api_auth::RequireToken;
use basalt_engine::controller::{assemble, reconcile, ControllerConfig};
use basalt_engine::name::VolumeName;
use basalt_engine::volume::qos::QosChange;
use basalt_engine::volume::rebuild::Rebuilder;
use tonic::service::interceptor::InterceptedService;

/// Longest wait at start for up-to-date replicas to be reconciled before the
/// volume serves (they carry the same flushed history, so normally only a
/// few unflushed blocks differ and this takes milliseconds).
const RECONCILE_LIMIT: Duration = Duration::from_secs(120);

/// Arguments of `basalt controller`.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Volume name; the target is served as iqn.2026-11.io.basalt:NAME
    /// (1 to 63 characters from a-z, 0-9, '-' and '.', starting and ending
    /// with a letter or a digit).
    #[arg(long)]
    pub name: VolumeName,
    /// Volume size (e.g. 10G); must match every replica's.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    /// A replica's address (host:port); repeat for each replica.
    #[arg(long = "replica", required = true)]
    pub replicas: Vec<String>,
    /// iSCSI portal address.
    #[arg(long, default_value = "0.0.0.0:3260")]
    pub iscsi: SocketAddr,
    /// Management API (gRPC ControllerService) address.
    #[arg(long, default_value = "127.0.0.1:9600")]
    pub api: SocketAddr,
    /// Prometheus metrics address (serves /metrics).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The volume's UUID; by default the one most replicas report.
    #[arg(long)]
    pub volume_id: Option<uuid::Uuid>,
    /// Fewest read-write replicas with which the volume accepts I/O
    /// (default: a majority of the replicas).
    #[arg(long)]
    pub min_healthy: Option<usize>,
    /// Drop a replica that has not answered a request for this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub replica_timeout: Duration,
    #[command(flatten)]
    pub access: super::access::Access,
    #[command(flatten)]
    pub secret: super::secrets::SecretArgs,
    #[command(flatten)]
    pub api_token: super::secrets::ApiTokenArgs,
    /// Serve the management API over TLS with this certificate (PEM, the server's first, then any
    /// intermediates); needs --api-tls-key. Clients then pass the CA that signed it (--api-ca).
    /// Without it the API is plaintext: fine on a loopback or a private network, as the token then
    /// crosses the network in clear text.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-tls-cert; read like a secret (keep it `chmod 600`).
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
    /// Threads that run the volume's I/O (iSCSI sessions, the volume's owner
    /// task, replica links). One keeps every hop of an I/O on one thread:
    /// tasks hand work to each other without cross-thread wake-ups, and a
    /// burst of commands coalesces into one vectored write per replica. Raise
    /// it only for a volume that needs more than one core of controller CPU.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    #[command(flatten)]
    pub busy_poll: super::args::BusyPoll,
    /// At start, wait this long for every replica to answer.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub startup_wait: Duration,
    /// QoS limits at start (change them later with `basalt volume qos`).
    #[command(flatten)]
    pub qos: super::qos::QosFlags<true>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime =
        basalt_poll::runtime(args.io_threads, "basalt-controller").context("starting the runtime")?;
    // shutdown_signal() spawns its watcher task, so it must run inside the runtime.
    runtime.block_on(async {
        args.busy_poll.start();
        serve(args, super::shutdown_signal()).await
    })
}

/// Run a controller until `shutdown` is cancelled.
pub async fn serve(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.min_healthy == Some(0) {
        anyhow::bail!("--min-healthy must be at least 1 (and at most the number of replicas)");
    }
    // Before anything else: without the secret no replica would talk to us, and without a token the
    // API would obey anyone.
    let secret = args.secret.load()?;
    let token = args.api_token.load()?;
    // The API's server, TLS files checked (and the key matched to the certificate) before any
    // replica's epoch is raised.
    let mut api_server = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.api_tls_cert, &args.api_tls_key) {
        api_server = api_server.tls_config(server_tls(cert, key)?).map_err(|e| {
            anyhow::anyhow!(
                "cannot serve the API over TLS with --api-tls-cert {} and --api-tls-key {}: {} (is the key \
                     the certificate's?)",
                cert.display(),
                key.display(),
                basalt_engine::api_tls::error_chain_text(&e)
            )
        })?;
    }
    let config = ControllerConfig {
        name: args.name.clone(),
        size_bytes: args.size,
        replicas: args.replicas.clone(),
        volume_id: args.volume_id.map(basalt_proto::VolumeId),
        // A majority of the volume's members, which may differ from the list (see `controller`).
        min_healthy: args.min_healthy,
        replica_timeout: args.replica_timeout,
        startup_wait: args.startup_wait,
        secret,
    };
    // Check the login policy and the limits and bind every listener before
    // assembling, so a bad flag fails before any replica's epoch is raised.
    let auth = args.access.auth()?;
    let qos = args.qos.limits()?;
    let iscsi = tokio::net::TcpListener::bind(args.iscsi)
        .await
        .with_context(|| format!("cannot listen for iSCSI on {}", args.iscsi))?;
    let api_listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen for the management API on {}", args.api))?;
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?,
        ),
        None => None,
    };

    let assembled = assemble(&config).await?;
    // Failed replicas that answer again are rebuilt and re-added; first, the
    // up-to-date ones are reconciled with the reference replica.
    let rebuilder = Rebuilder::new();
    reconcile(&assembled, &rebuilder, RECONCILE_LIMIT).await;
    let volume = assembled.volume;
    if !qos.is_empty() {
        // Before the portal opens: no initiator I/O runs unlimited.
        volume
            .set_qos(QosChange {
                clear: true,
                set: qos,
            })
            .await
            .context("setting the QoS limits")?;
    }
    tokio::spawn(rebuilder.clone().watch(volume.clone(), shutdown.clone()));
    let iqn = args.name.iqn();
    let lu = ScsiLogicalUnit::new(
        Arc::new(volume.clone()),
        LuConfig::new(volume.spec().volume.0.simple().to_string()),
    );
    let target = Target::new(TargetConfig {
        alias: Some(args.name.to_string()),
        auth,
        allow: args.access.allow_list(),
        ..TargetConfig::new(iqn.clone(), Arc::new(lu))
    })
    .map_err(|e| anyhow::anyhow!("volume {}: {e}", args.name))?;
    let access_target = target.clone();
    let portal = Portal::new(PortalConfig::default(), [target]);

    let sessions_portal = portal.clone();
    let api = basalt_engine::api::Api::serving_target(
        volume.clone(),
        iqn.clone(),
        Arc::new(move || sessions_portal.session_count()),
        rebuilder,
        Some(access_target as Arc<dyn basalt_engine::api::InitiatorAccess>),
    );
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        api_server
            .add_service(InterceptedService::new(api, RequireToken(token)))
            .serve_with_incoming_shutdown(tokio_stream_listener(api_listener), async move {
                api_shutdown.cancelled().await
            })
            .await
    });
    if let Some(listener) = metrics_listener {
        let metrics = volume.metrics.clone();
        tokio::spawn(basalt_engine::http::serve_metrics(
            listener,
            Arc::new(move || metrics.render()),
            shutdown.clone(),
        ));
    }

    tracing::info!(
        url = %format!("iscsi://{}/{iqn}/0", args.iscsi), api = %args.api, api_tls = args.api_tls_cert.is_some(),
        "serving volume {}", args.name
    );
    portal
        .serve(iscsi, shutdown.clone())
        .await
        .context("iSCSI portal failed")?;
    // Make everything acknowledged durable before exiting.
    if let Err(e) = basalt_target::device::BlockDevice::flush(&volume).await {
        tracing::warn!(error = %e, "final flush failed");
    }
    let _ = api_task.await;
    tracing::info!("controller stopped");
    Ok(())
}

/// The API's TLS configuration from the PEM files `cert` and `key`; a message naming the file that is
/// wrong otherwise.
fn server_tls(cert: &Path, key: &Path) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use basalt_engine::api_tls::ServerPemError;
    let cert_pem = std::fs::read(cert).with_context(|| {
        format!(
            "cannot read the API certificate --api-tls-cert {}",
            cert.display()
        )
    })?;
    let key_pem = super::secrets::read_private(key, "API TLS key (--api-tls-key)")?;
    basalt_engine::api_tls::server_config(&cert_pem, &key_pem).map_err(|e| match e {
        ServerPemError::Cert(why) => {
            anyhow::anyhow!("--api-tls-cert {} is not usable: {why}", cert.display())
        }
        ServerPemError::Key(why) => anyhow::anyhow!("--api-tls-key {} is not usable: {why}", key.display()),
        ServerPemError::Mismatch(why) => anyhow::anyhow!(
            "--api-tls-key {} and --api-tls-cert {} are not a pair: {why}",
            key.display(),
            cert.display()
        ),
    })
}

/// A tonic incoming-connection stream over a bound listener.
fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(s, _)| s);
        Some((next, listener))
    })
}
