//! `basalt replica`: serve one replica store over the data-path protocol.
//!
//! Opens the store in `--dir` (creating it if the directory holds none), or
//! on the raw block device `--device` (formatting it if it is blank, or with
//! `--format` if it holds something else), serves data and control on
//! `--listen`, metrics on `--metrics`, and on
//! SIGTERM or Ctrl-C stops accepting, finishes what it accepted, flushes and
//! exits 0. Once listening it prints `listening <addr>` on stdout (and
//! `metrics <addr>` if enabled), so that scripts and tests can use port 0.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use basalt_proto::VolumeId;
use basalt_replica::server::{bind_metrics, serve_metrics, Metrics, Server};
use basalt_replica::store::backend::block::{BlockBackend, DeviceOptions, Format};
use basalt_replica::store::{Backend, Store, StoreError};

/// Arguments of `basalt replica`: serve a replica, or (with a subcommand)
/// manage one.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(group(clap::ArgGroup::new("storage").required(true).args(["dir", "device"])))]
pub struct Args {
    #[command(subcommand)]
    command: Option<ReplicaCommand>,
    /// Host directory of the replica store (created if missing).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Raw block device (or a fixed-size file) holding the replica store,
    /// used exclusively. A blank device is formatted; a Basalt device is
    /// opened, never reformatted.
    #[arg(long)]
    device: Option<PathBuf>,
    /// With --device: format it even though it holds something that is not
    /// a Basalt store (a filesystem, a partition table...), wiping it.
    #[arg(long, requires = "device")]
    format: bool,
    /// Volume size: bytes, or with a binary suffix K, M, G, T (`10G`, `512M`);
    /// a multiple of 4096. The size of a new store: an existing one keeps its
    /// own (a volume grows only with `basalt volume expand`).
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
    /// Threads that move frames and run page-cache writes (reads, flushes and
    /// snapshot work run on a separate blocking pool). One keeps a write's
    /// receive, store call and reply on one thread, without cross-thread
    /// wake-ups; raise it only for a replica that needs more than one core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    io_threads: u16,
    #[command(flatten)]
    secret: super::secrets::SecretArgs,
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
        #[command(flatten)]
        auth: super::secrets::ClientTokenArgs,
    },
    /// Remove a replica from a running volume for good.
    Rm {
        #[arg(long, default_value = "127.0.0.1:9600")]
        api: String,
        address: String,
        #[command(flatten)]
        auth: super::secrets::ClientTokenArgs,
    },
    /// Write a stopped replica's volume image (or one snapshot's) to a raw
    /// file: for debugging, offline copies, and comparing replicas.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["dir", "device"])))]
    Export {
        /// The replica's store directory (the replica must be stopped).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The replica's block device (the replica must be stopped).
        #[arg(long)]
        device: Option<PathBuf>,
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
        Some(ReplicaCommand::Add { api, address, auth }) => return membership(&api, &auth, address, true),
        Some(ReplicaCommand::Rm { api, address, auth }) => return membership(&api, &auth, address, false),
        Some(ReplicaCommand::Export {
            dir,
            device,
            snapshot,
            out,
        }) => {
            let source = match (dir, device) {
                (Some(dir), _) => StoreSource::Dir(dir),
                (None, Some(device)) => StoreSource::Device(device),
                (None, None) => anyhow::bail!("`basalt replica export` needs --dir or --device"),
            };
            return export(&source, snapshot.as_deref(), &out);
        }
        None => {}
    }
    // Before anything else: a replica that would serve anyone is not started at all.
    let secret = args.secret.load()?;
    let runtime = match args.io_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.into())
            .enable_all()
            .thread_name("basalt-replica")
            .build(),
    }
    .context("starting the async runtime")?;
    runtime.block_on(serve(args, secret))
}

async fn serve(args: Args, secret: basalt_proto::auth::VolumeSecret) -> anyhow::Result<()> {
    // clap requires these when no subcommand is given.
    let (Some(size), Some(listen)) = (args.size, args.listen) else {
        anyhow::bail!("`basalt replica` needs --dir or --device, --size and --listen (or a subcommand: add, rm, export)");
    };
    let source = match (args.dir.clone(), args.device.clone()) {
        (Some(dir), None) => StoreSource::Dir(dir),
        (None, Some(device)) => StoreSource::Device(device),
        _ => anyhow::bail!("`basalt replica` needs exactly one of --dir and --device"),
    };
    let volume = args.volume_id.map(VolumeId);
    let format = if args.format {
        Format::WipeForeign
    } else {
        Format::IfBlank
    };
    let shown = source.to_string();
    let opening = std::time::Instant::now();
    let store = tokio::task::spawn_blocking(move || source.open_or_create(size, volume, format))
        .await
        .context("opening the store")?
        .with_context(|| format!("cannot open the replica store on {shown}"))?;
    // How long the open (with its crash recovery) took: a replica's restart, and so a delta rebuild,
    // waits for it.
    tracing::info!(
        store = %shown, seconds = opening.elapsed().as_secs_f64(), revision = store.revision().0,
        head_bytes = store.head_allocated_bytes(), unflushed_checked = store.recovered_unflushed(),
        "store opened"
    );
    let store = Arc::new(store);
    let metrics = Metrics::new();
    let shutdown = super::shutdown_signal();

    let server = Server::bind(listen, store.clone(), metrics.clone(), secret).await?;
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
fn membership(
    api: &str,
    auth: &super::secrets::ClientTokenArgs,
    address: String,
    add: bool,
) -> anyhow::Result<()> {
    use basalt_proto::pb::controller::ReplicaRequest;
    super::client::block_on(async move {
        let mut client = super::client::connect(api, auth).await?;
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

/// Where a replica's store lives.
enum StoreSource {
    Dir(PathBuf),
    Device(PathBuf),
}

impl std::fmt::Display for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSource::Dir(dir) => write!(f, "{}", dir.display()),
            StoreSource::Device(device) => write!(f, "device {}", device.display()),
        }
    }
}

impl StoreSource {
    /// The store, created of `size` if there is none; an existing one of
    /// another id (when `volume` is given) is refused, and one of another size
    /// opens at its own size (logged: see [`Store::open_or_create`]).
    fn open_or_create(&self, size: u64, volume: Option<VolumeId>, format: Format) -> anyhow::Result<Store> {
        let store = self.open_or_create_any_size(size, volume, format)?;
        log_size_difference(&store, size, self);
        Ok(store)
    }

    fn open_or_create_any_size(
        &self,
        size: u64,
        volume: Option<VolumeId>,
        format: Format,
    ) -> anyhow::Result<Store> {
        let device = match self {
            StoreSource::Dir(dir) => return Ok(Store::open_or_create(dir, size, volume)?),
            StoreSource::Device(device) => device,
        };
        let options = DeviceOptions {
            volume_bytes: Some(size),
            format,
            ..DeviceOptions::default()
        };
        let backend: Arc<dyn Backend> = Arc::new(BlockBackend::open(device, &options)?);
        let store = match Store::open_with_backend(backend.clone()) {
            Err(StoreError::NotAVolume { .. }) => {
                return Ok(Store::create_with_backend(
                    backend,
                    volume.unwrap_or_else(VolumeId::random),
                    size,
                )?)
            }
            opened => opened?,
        };
        let location = device.display().to_string();
        if let Some(requested) = volume.filter(|&v| v != store.volume_id()) {
            return Err(StoreError::VolumeMismatch {
                dir: location,
                on_disk: store.volume_id(),
                requested,
            }
            .into());
        }
        Ok(store)
    }

    /// The existing store, for offline tools: a device is never formatted here.
    fn open_existing(&self) -> anyhow::Result<Store> {
        Ok(match self {
            StoreSource::Dir(dir) => Store::open(dir)?,
            StoreSource::Device(device) => {
                let options = DeviceOptions {
                    format: Format::Never,
                    ..DeviceOptions::default()
                };
                Store::open_with_backend(Arc::new(BlockBackend::open(device, &options)?))?
            }
        })
    }

    /// A throw-away copy in `scratch` (sparse where the original reads zeros).
    fn copy_into(&self, scratch: &Path) -> anyhow::Result<StoreSource> {
        let (from, copy) = match self {
            StoreSource::Dir(dir) => (dir, StoreSource::Dir(scratch.join("store"))),
            StoreSource::Device(device) => (device, StoreSource::Device(scratch.join("device"))),
        };
        let to = match &copy {
            StoreSource::Dir(p) | StoreSource::Device(p) => p,
        };
        let status = std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(from)
            .arg(to)
            .status()
            .context("running cp to copy the store")?;
        anyhow::ensure!(status.success(), "copying {} failed ({status})", from.display());
        Ok(copy)
    }
}

/// Says what an existing store's size means when it is not `--size`: a volume
/// grows only through its controller (`basalt volume expand`), so the stored
/// size wins either way.
fn log_size_difference(store: &Store, requested: u64, source: &StoreSource) {
    let stored = store.size_bytes();
    if stored > requested {
        tracing::info!(
            store = %source, size_bytes = stored, requested,
            "the store holds a volume expanded past --size; serving it at its stored size (--size is the size \
             of a new store)"
        );
    } else if stored < requested {
        tracing::warn!(
            store = %source, size_bytes = stored, requested,
            "the store holds a smaller volume than --size; serving it at its stored size: a replica never \
             grows at start (grow a volume with `basalt volume expand`; its controller grows this replica \
             when it rejoins a larger volume)"
        );
    }
}

/// `basalt replica export`: the volume (or a snapshot of it) as a raw file.
fn export(source: &StoreSource, snapshot: Option<&str>, out: &std::path::Path) -> anyhow::Result<()> {
    // A snapshot's view is what the volume reads after a revert to it; a
    // revert changes the store, so it is done on a throw-away copy.
    let scratch;
    let copy;
    let source = match snapshot {
        None => source,
        Some(name) => {
            scratch = tempfile::tempdir().context("creating a scratch directory")?;
            copy = source.copy_into(scratch.path())?;
            let store = copy
                .open_existing()
                .with_context(|| format!("opening a copy of {source}"))?;
            store
                .snapshot_revert(name)
                .with_context(|| format!("no snapshot {name:?} in {source}"))?;
            drop(store);
            &copy
        }
    };
    let store = source
        .open_existing()
        .with_context(|| format!("cannot open the replica store on {source}"))?;
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
