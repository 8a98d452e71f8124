//! `basalt replica`: serve one replica store over the data-path protocol.
//!
//! Opens the store in `--dir` (creating it if the directory holds none), or
//! on the raw block device `--device` (formatting it if it is blank, or with
//! `--format` if it holds something else), serves data and control on
//! `--listen`, metrics on `--metrics`, and on
//! SIGTERM or Ctrl-C stops accepting, finishes what it accepted, flushes and
//! exits 0. Once listening it prints `listening <addr>` on stdout (and
//! `metrics <addr>` if enabled), so that scripts and tests can use port 0.
//!
//! With `--clone-from`, a new store is a clone of a snapshot of another
//! volume (`basalt_replica::server::clone`): every source replica named is
//! checked and holds the snapshot before the store is created (or nothing is
//! created), the replica serves at once, and it copies its source in the
//! background, resuming where it was after a restart (the store remembers its
//! source: the flags are needed only the first time). The source replicas
//! check the SOURCE volume's secret, not the clone's: the clone replica takes
//! it from `--clone-source-secret-file` or `BASALT_CLONE_SOURCE_SECRET`, and
//! needs it until it is hydrated (after a restart too: it is never stored).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use basalt_proto::auth::VolumeSecret;
use basalt_proto::VolumeId;
use basalt_replica::server::clone::{self, CloneRequest};
use basalt_replica::server::{bind_metrics, serve_metrics, Metrics, Server};
use basalt_replica::store::backend::block::{BlockBackend, DeviceOptions, Format};
use basalt_replica::store::{Backend, CloneOrigin, DirBackend, Store, StoreError};

use super::secrets::CloneSourceSecretArgs;

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
    busy_poll: super::args::BusyPoll,
    /// Make a new store a clone of a snapshot of another volume: the address
    /// (host:port) of a replica of the source volume. Repeat it for every
    /// source replica: each holds the snapshot until the clone is hydrated,
    /// and any of them is read. Needs --clone-snapshot and --volume-id (the
    /// clone's, the same on each of its replicas).
    #[arg(long = "clone-from", requires_all = ["clone_snapshot", "volume_id"])]
    clone_from: Vec<String>,
    /// The source snapshot to clone.
    #[arg(long, requires = "clone_from")]
    clone_snapshot: Option<String>,
    /// The source volume's UUID: every --clone-from replica must serve it.
    #[arg(long, requires = "clone_from")]
    clone_source_volume: Option<uuid::Uuid>,
    /// Most bytes a second a clone copies from its source in the background,
    /// so that the source's own I/O keeps most of its disk (K, M, G
    /// suffixes; 0: as fast as it goes). Reads of blocks not copied yet are
    /// fetched at once, whatever the pace.
    #[arg(long, default_value = "128M", value_parser = super::args::parse_size)]
    hydrate_rate: u64,
    #[command(flatten)]
    secret: super::secrets::SecretArgs,
    #[command(flatten)]
    clone_source_secret: super::secrets::CloneSourceSecretArgs,
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
        auth: super::secrets::ApiClientArgs,
    },
    /// Remove a replica from a running volume for good.
    Rm {
        #[arg(long, default_value = "127.0.0.1:9600")]
        api: String,
        address: String,
        #[command(flatten)]
        auth: super::secrets::ApiClientArgs,
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
    let source_secret = args.clone_source_secret.load()?;
    let runtime =
        basalt_poll::runtime(args.io_threads, "basalt-replica").context("starting the async runtime")?;
    runtime.block_on(async {
        args.busy_poll.start();
        serve(args, secret, source_secret).await
    })
}

async fn serve(args: Args, secret: VolumeSecret, source_secret: Option<VolumeSecret>) -> anyhow::Result<()> {
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
    let clone = match (args.clone_from.is_empty(), args.clone_snapshot.clone()) {
        (false, Some(snapshot)) => Some(CloneRequest {
            sources: args.clone_from.clone(),
            source_volume: args.clone_source_volume.map(VolumeId),
            snapshot,
            source_secret: source_secret.clone().ok_or_else(CloneSourceSecretArgs::missing)?,
        }),
        (true, _) => None,
        (false, None) => anyhow::bail!("--clone-from needs --clone-snapshot NAME: the snapshot to clone"),
    };
    let shown = source.to_string();
    let opening = std::time::Instant::now();
    let store = open_or_create(source, size, volume, format, clone)
        .await
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
    let hydration = start_hydration(&store, source_secret, args.hydrate_rate, &shutdown)?;

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
    if let Some(hydration) = hydration {
        // It stops at the cancellation; its progress is durable up to its last step.
        let _ = hydration.await;
    }
    result.context("the replica server failed")
}

/// Opens the store, or creates it -- as a clone if `clone` says so, after holding the snapshot on
/// every source replica (see the module docs).
async fn open_or_create(
    source: StoreSource,
    size: u64,
    volume: Option<VolumeId>,
    format: Format,
    clone: Option<CloneRequest>,
) -> anyhow::Result<Store> {
    let source = Arc::new(source);
    let opener = source.clone();
    let existing = tokio::task::spawn_blocking(move || opener.open_checked(size, volume, format))
        .await
        .context("opening the store")??;
    if let Some(store) = existing {
        if let Some(request) = &clone {
            check_same_origin(&store, request)?;
        }
        // A clone too: once made, it is a volume like any other, grown only by its controller.
        log_size_difference(&store, size, &source);
        return Ok(store);
    }
    let volume = volume.unwrap_or_else(VolumeId::random);
    let origin = match &clone {
        None => None,
        Some(request) => {
            // Unique per clone replica, so that each releases only its own hold; readable, so that
            // an operator can tell whose hold refuses a snapshot delete.
            let tag = uuid::Uuid::new_v4().simple().to_string();
            let holder = format!("clone {volume} replica {}", &tag[..8]);
            let origin = clone::prepare(request, size, &holder)
                .await
                .context("cannot make the clone; nothing was created")?;
            tracing::info!(
                snapshot = %origin.snapshot, source = %origin.source_volume, %holder,
                "source checked and held on every source replica; creating the clone"
            );
            Some(origin)
        }
    };
    tokio::task::spawn_blocking(move || source.create(size, volume, format, origin))
        .await
        .context("creating the store")?
}

/// Refuses to serve an existing store with `--clone-from` flags that say it is something else.
fn check_same_origin(store: &Store, request: &CloneRequest) -> anyhow::Result<()> {
    let Some(status) = store.clone_status() else {
        anyhow::bail!(
            "this store already holds volume {}, which is not a clone: drop --clone-from to serve it, or \
             give an empty directory to make a clone",
            store.volume_id()
        );
    };
    let origin = &status.origin;
    let other_volume = request.source_volume.is_some_and(|v| v != origin.source_volume);
    if origin.snapshot != request.snapshot || other_volume {
        anyhow::bail!(
            "this store is a clone of snapshot {:?} of volume {}, not of what --clone-snapshot and \
             --clone-source-volume say: drop the --clone-* flags to resume it, or give an empty directory",
            origin.snapshot,
            origin.source_volume
        );
    }
    Ok(())
}

/// Starts copying a clone's source in the background, if the store is a clone whose holds are not
/// all released yet; such a clone cannot go on without the source volume's secret.
fn start_hydration(
    store: &Arc<Store>,
    source_secret: Option<VolumeSecret>,
    rate: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(status) = store.clone_status().filter(|s| !s.released) else {
        return Ok(None);
    };
    let source_secret = source_secret.ok_or_else(|| {
        CloneSourceSecretArgs::missing().context(format!(
            "this store is a clone of snapshot {:?} of volume {} that still reads its source",
            status.origin.snapshot, status.origin.source_volume
        ))
    })?;
    tracing::info!(
        snapshot = %status.origin.snapshot, source = %status.origin.source_volume,
        hydrated_bytes = status.hydrated_bytes, total_bytes = status.origin.source_size_bytes,
        "clone: hydrating from its source in the background"
    );
    let reader = clone::SourceReader::new(status.origin, source_secret, tokio::runtime::Handle::current());
    store.attach_source(reader.clone());
    let options = clone::HydrateOptions {
        rate: (rate > 0).then_some(rate),
    };
    Ok(Some(tokio::spawn(clone::hydrate(
        store.clone(),
        reader,
        options,
        shutdown.clone(),
    ))))
}

/// `basalt replica add|rm`: ask the controller.
fn membership(
    api: &str,
    auth: &super::secrets::ApiClientArgs,
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
    /// The backend of a store to open or create (a blank device is formatted as `format` allows).
    fn backend(&self, size: u64, format: Format) -> anyhow::Result<Arc<dyn Backend>> {
        Ok(match self {
            StoreSource::Dir(dir) => Arc::new(DirBackend::new(dir)?),
            StoreSource::Device(device) => {
                let options = DeviceOptions {
                    volume_bytes: Some(size),
                    format,
                    ..DeviceOptions::default()
                };
                Arc::new(BlockBackend::open(device, &options)?)
            }
        })
    }

    /// The existing store, `None` if there is none; one of another id (when `volume` is given) is
    /// refused, and one of another size opens at its own size (see [`log_size_difference`]).
    fn open_checked(
        &self,
        size: u64,
        volume: Option<VolumeId>,
        format: Format,
    ) -> anyhow::Result<Option<Store>> {
        let store = match Store::open_with_backend(self.backend(size, format)?) {
            Err(StoreError::NotAVolume { .. }) => return Ok(None),
            opened => opened?,
        };
        let location = self.to_string();
        if let Some(requested) = volume.filter(|&v| v != store.volume_id()) {
            return Err(StoreError::VolumeMismatch {
                dir: location,
                on_disk: store.volume_id(),
                requested,
            }
            .into());
        }
        Ok(Some(store))
    }

    /// A new store: a clone of `origin`, or empty.
    fn create(
        &self,
        size: u64,
        volume: VolumeId,
        format: Format,
        origin: Option<CloneOrigin>,
    ) -> anyhow::Result<Store> {
        let backend = self.backend(size, format)?;
        Ok(match origin {
            Some(origin) => Store::create_clone(backend, volume, size, origin)?,
            None => Store::create_with_backend(backend, volume, size)?,
        })
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
