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

/// Arguments of `basalt replica`: serve a replica, or (with a subcommand)
/// manage one.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<ReplicaCommand>,
    /// Host directory of the replica store (created if missing).
    #[arg(long, required = true)]
    dir: Option<PathBuf>,
    /// Volume size: bytes, or with a binary suffix K, M, G, T (`10G`, `512M`);
    /// a multiple of 4096. Must match the size of an existing store.
    #[arg(long, value_parser = super::args::parse_volume_size, required = true)]
    size: Option<u64>,
    /// Address for the data-path protocol (data and control), e.g. `0.0.0.0:7100`.
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// Address for Prometheus metrics (`GET /metrics`); off if not given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Volume UUID: required to match an existing store; a new store gets a
    /// random one if not given.
    #[arg(long)]
    volume_id: Option<uuid::Uuid>,
}

#[derive(clap::Subcommand)]
enum ReplicaCommand {
    /// Add a replica (empty or stale) to a running volume; it is rebuilt
    /// online and becomes RW when it holds everything.
    Add {
        /// The controller's management API address.
        #[arg(long, default_value = "127.0.0.1:9600")]
        api: String,
        /// The replica's address (its --listen).
        address: String,
    },
    /// Remove a replica from a running volume for good.
    Rm {
        #[arg(long, default_value = "127.0.0.1:9600")]
        api: String,
        address: String,
    },
    /// Write a stopped replica's volume image (or one snapshot's) to a raw
    /// file: for debugging, offline copies, and comparing replicas.
    Export {
        /// The replica's store directory (the replica must be stopped).
        #[arg(long)]
        dir: PathBuf,
        /// Export the volume as it was at this snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Output file (created; sparse where the volume was never written).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(ReplicaCommand::Add { api, address }) => return membership(&api, address, true),
        Some(ReplicaCommand::Rm { api, address }) => return membership(&api, address, false),
        Some(ReplicaCommand::Export { dir, snapshot, out }) => {
            return export(&dir, snapshot.as_deref(), &out)
        }
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("basalt-replica")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // clap requires these when no subcommand is given.
    let (Some(dir), Some(size), Some(listen)) = (args.dir.clone(), args.size, args.listen) else {
        anyhow::bail!("`basalt replica` needs --dir, --size and --listen (or a subcommand: add, rm, export)");
    };
    let volume = args.volume_id.map(VolumeId);
    let shown = dir.display().to_string();
    let store = tokio::task::spawn_blocking(move || Store::open_or_create(&dir, size, volume))
        .await
        .context("opening the store")?
        .with_context(|| format!("cannot open the replica store in {shown}"))?;
    let store = Arc::new(store);
    let metrics = Metrics::new();
    let shutdown = super::shutdown_signal();

    let server = Server::bind(listen, store.clone(), metrics.clone()).await?;
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

/// `basalt replica add|rm`: ask the controller.
fn membership(api: &str, address: String, add: bool) -> anyhow::Result<()> {
    use basalt_proto::pb::controller::ReplicaRequest;
    super::client::block_on(async move {
        let mut client = super::client::connect(api).await?;
        let request = ReplicaRequest { address };
        let reply = if add {
            client.replica_add(request).await
        } else {
            client.replica_remove(request).await
        };
        println!(
            "{}",
            reply.map_err(super::client::status_message)?.into_inner().message
        );
        Ok(())
    })
}

/// `basalt replica export`: the volume (or a snapshot of it) as a raw file.
fn export(dir: &std::path::Path, snapshot: Option<&str>, out: &std::path::Path) -> anyhow::Result<()> {
    // A snapshot's view is what the volume reads after a revert to it; a
    // revert changes the store, so it is done on a throw-away copy.
    let scratch;
    let source = match snapshot {
        None => dir.to_path_buf(),
        Some(name) => {
            scratch = tempfile::tempdir().context("creating a scratch directory")?;
            let copy = scratch.path().join("store");
            let status = std::process::Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(dir)
                .arg(&copy)
                .status()
                .context("running cp to copy the store")?;
            anyhow::ensure!(status.success(), "copying {} failed ({status})", dir.display());
            let store = Store::open(&copy).with_context(|| format!("opening a copy of {}", dir.display()))?;
            store
                .snapshot_revert(name)
                .with_context(|| format!("no snapshot {name:?} in {}", dir.display()))?;
            drop(store);
            copy
        }
    };
    let store = Store::open(&source)
        .with_context(|| format!("cannot open the replica store in {}", dir.display()))?;
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    file.set_len(store.size_bytes())
        .with_context(|| format!("sizing {}", out.display()))?;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    for range in store.allocated_ranges() {
        let mut offset = range.start;
        while offset < range.end {
            let n = ((range.end - offset) as usize).min(buf.len());
            store
                .read(offset, &mut buf[..n])
                .with_context(|| format!("reading offset {offset}"))?;
            file.write_all_at(&buf[..n], offset)
                .with_context(|| format!("writing {}", out.display()))?;
            offset += n as u64;
        }
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    eprintln!("exported {} bytes to {}", store.size_bytes(), out.display());
    Ok(())
}
