//! `basalt replica`: serve one replica store over the data-path protocol.
//!
//! Opens the store in `--dir` (creating it if the directory holds none),
//! serves data and control on `--listen`, metrics on `--metrics`, and on
//! SIGTERM or Ctrl-C stops accepting, finishes what it accepted, flushes and
//! exits 0. Once listening it prints `listening <addr>` on stdout (and
//! `metrics <addr>` if enabled), so that scripts and tests can use port 0.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use basalt_proto::VolumeId;
use basalt_replica::server::{bind_metrics, serve_metrics, Metrics, Server};
use basalt_replica::store::Store;

/// Arguments of `basalt replica`.
#[derive(clap::Args)]
pub struct Args {
    /// Host directory of the replica store (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Volume size: bytes, or with a binary suffix K, M, G, T (`10G`, `512M`);
    /// a multiple of 4096. Must match the size of an existing store.
    #[arg(long, value_parser = super::args::parse_volume_size)]
    size: u64,
    /// Address for the data-path protocol (data and control), e.g. `0.0.0.0:7100`.
    #[arg(long)]
    listen: SocketAddr,
    /// Address for Prometheus metrics (`GET /metrics`); off if not given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Volume UUID: required to match an existing store; a new store gets a
    /// random one if not given.
    #[arg(long)]
    volume_id: Option<uuid::Uuid>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("basalt-replica")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let (dir, size, volume) = (args.dir.clone(), args.size, args.volume_id.map(VolumeId));
    let store = tokio::task::spawn_blocking(move || Store::open_or_create(&dir, size, volume))
        .await
        .context("opening the store")?
        .with_context(|| format!("cannot open the replica store in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let metrics = Metrics::new();
    let shutdown = super::shutdown_signal();

    let server = Server::bind(args.listen, store.clone(), metrics.clone()).await?;
    let mut announce = format!("listening {}\n", server.local_addr());
    if let Some(addr) = args.metrics {
        let listener = bind_metrics(addr).await.with_context(|| {
            format!("cannot listen for metrics on {addr}; pick another --metrics address")
        })?;
        announce.push_str(&format!("metrics {}\n", listener.local_addr()?));
        tokio::spawn(serve_metrics(listener, metrics, store.clone(), shutdown.clone()));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(announce.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    drop(stdout);

    let result = server.run(shutdown.clone()).await;
    shutdown.cancel();
    result.context("the replica server failed")
}
