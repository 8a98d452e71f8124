//! `basalt volume up|info|expand`: run a whole volume locally, look at one,
//! grow one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_proto::pb::controller::{ReplicaStatus, VolumeInfoReply, VolumeInfoRequest};

use basalt_engine::name::VolumeName;

use super::args::parse_volume_size;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(clap::Subcommand)]
pub enum VolumeCommand {
    /// Start a replicated volume on this machine: N replica processes (data
    /// under DIR/NAME/r1..rN) and a controller, stopped cleanly on Ctrl-C.
    Up(UpArgs),
    /// Show a running volume: size, epoch, replicas and their modes, I/O.
    Info(InfoArgs),
    /// Show or change a running volume's QoS limits (IOPS, bandwidth).
    Qos(super::qos::QosArgs),
    /// Grow a running volume online (every replica grows before the answer;
    /// logged-in initiators are told the new capacity). Never shrinks.
    /// `expand NAME --size S` grows a cluster volume through the node agent.
    Expand(super::expand::ExpandArgs),
    /// Create a cluster volume through the node agent: placed on the nodes,
    /// its services started by their agents.
    Create(super::cluster::volume::CreateArgs),
    /// List the cluster's volumes (node agent).
    Ls(super::cluster::volume::LsArgs),
    /// Show a cluster volume: placement, phase, services, iSCSI URL (node agent).
    Inspect(super::cluster::volume::NameArgs),
    /// Delete a cluster volume: its services stop and its data is removed
    /// (refused while attached).
    Rm(super::cluster::volume::NameArgs),
    /// Record that a node uses a cluster volume.
    Attach(super::cluster::volume::AttachArgs),
    /// Record that no node uses a cluster volume.
    Detach(super::cluster::volume::NameArgs),
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// Volume name (the target is iqn.2026-11.io.basalt:NAME, the data
    /// DIR/NAME): 1 to 63 characters from a-z, 0-9, '-' and '.', starting
    /// and ending with a letter or a digit.
    #[arg(long)]
    pub name: VolumeName,
    /// Volume size, e.g. 10G: the size of a new volume. An existing one keeps
    /// its own (grown online with `basalt volume expand`); a larger --size
    /// than it holds is refused.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    /// Number of replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub replicas: u16,
    /// Directory holding the volumes' data.
    #[arg(long, default_value = "./basalt-data")]
    pub data: PathBuf,
    /// iSCSI portal address.
    #[arg(long, default_value = "127.0.0.1:3260")]
    pub iscsi: SocketAddr,
    /// Management API address. The API is served without TLS here: `volume up` runs a volume on one
    /// machine, its API on the loopback by default; for an API others reach over a network, run
    /// `basalt controller` with --api-tls-cert and --api-tls-key.
    #[arg(long, default_value = "127.0.0.1:9600")]
    pub api: SocketAddr,
    /// Prometheus metrics address of the controller.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Fewest read-write replicas with which the volume accepts I/O
    /// (default: a majority).
    #[arg(long)]
    pub min_healthy: Option<usize>,
    /// QoS limits at start (change them later with `basalt volume qos`).
    #[command(flatten)]
    pub qos: super::qos::QosFlags<true>,
}

#[derive(clap::Args)]
pub struct InfoArgs {
    /// The controller's management API address.
    #[arg(long, default_value = "127.0.0.1:9600")]
    pub api: String,
    /// Print one JSON object instead of a table.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Show live progress bars (rebuilds, modes) until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        VolumeCommand::Up(a) => up(a),
        VolumeCommand::Info(a) => info(a),
        VolumeCommand::Qos(a) => super::qos::run(a),
        VolumeCommand::Expand(a) => super::expand::expand(a),
        VolumeCommand::Create(a) => super::cluster::volume::create(a),
        VolumeCommand::Ls(a) => super::cluster::volume::ls(a),
        VolumeCommand::Inspect(a) => super::cluster::volume::inspect(a),
        VolumeCommand::Rm(a) => super::cluster::volume::rm(a),
        VolumeCommand::Attach(a) => super::cluster::volume::attach(a),
        VolumeCommand::Detach(a) => super::cluster::volume::detach(a),
    }
}

/// What `volume up` remembers about a volume between runs.
#[derive(serde::Serialize, serde::Deserialize)]
struct VolumeRecord {
    uuid: uuid::Uuid,
    /// The size it was created with (its replicas know the current one).
    size_bytes: u64,
}

fn load_or_create_record(dir: &Path, size: u64) -> anyhow::Result<VolumeRecord> {
    let path = dir.join("volume.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let record: VolumeRecord = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Basalt volume record; move it away", path.display()))?;
        // Not an error: the volume may have been expanded since it was
        // created. Its replicas serve their own size, and the controller
        // refuses a --size above it.
        if record.size_bytes != size {
            eprintln!(
                "basalt: volume at {} was created with {} bytes; --size {size} only matters to a new volume \
                 (the replicas keep the size they hold)",
                dir.display(),
                record.size_bytes
            );
        }
        return Ok(record);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let record = VolumeRecord {
        uuid: uuid::Uuid::new_v4(),
        size_bytes: size,
    };
    let tmp = dir.join("volume.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(record)
}

/// Name of the volume's secret file in its data directory.
const SECRET_FILE: &str = "secret";
/// Name of the management API token file in the volume's data directory.
const TOKEN_FILE: &str = "api-token";

/// The contents of `dir/name`, generated with `generate` and stored (mode 0600, written, fsynced,
/// renamed, directory fsynced) the first time: a volume keeps its secret and token across restarts, or
/// its replicas would refuse the next controller.
fn load_or_generate(dir: &Path, name: &str, generate: impl FnOnce() -> Vec<u8>) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&generate())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(path)
}

/// A free port on 127.0.0.1 (the OS picks it; it stays free long enough for
/// the child we start next to bind it).
fn free_local_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Child processes, stopped with SIGTERM (then SIGKILL after a grace period)
/// when dropped, in reverse order of start.
struct Children(Vec<(String, Child)>);

impl Children {
    fn stop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            // SAFETY: plain kill(2) on a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if std::time::Instant::now() >= deadline => {
                        eprintln!("basalt: {name} did not stop within 20 s; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `exe args` with the volume's secret and API token in its environment (never on its command
/// line, where `ps` shows it).
fn spawn(exe: &Path, args: &[String], secrets: &[(&str, Vec<u8>)]) -> anyhow::Result<Child> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(exe);
    for (name, value) in secrets {
        command.env(name, std::ffi::OsStr::from_bytes(value));
    }
    command
        .args(args)
        .stdin(Stdio::null())
        // Own process group: Ctrl-C reaches only `volume up`, which then
        // stops the controller before the replicas (so it can flush).
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

fn up(a: UpArgs) -> anyhow::Result<()> {
    // A bad limit fails here, before any process starts.
    a.qos.limits()?;
    let exe = std::env::current_exe().context("locating the basalt binary")?;
    let dir = a.data.join(&a.name);
    let record = load_or_create_record(&dir, a.size)?;
    let secret_path = load_or_generate(&dir, SECRET_FILE, || {
        basalt_proto::auth::VolumeSecret::generate().expose().to_vec()
    })?;
    let token_path = load_or_generate(&dir, TOKEN_FILE, || {
        basalt_engine::api_auth::ApiToken::generate()
            .expose()
            .as_bytes()
            .to_vec()
    })?;
    let secrets = [
        (
            super::secrets::SECRET_ENV,
            super::secrets::read_private(&secret_path, "volume secret")?,
        ),
        (
            super::secrets::TOKEN_ENV,
            super::secrets::read_private(&token_path, "API token")?,
        ),
    ];
    let size = a.size.to_string();
    let mut children = Children(Vec::new());
    let mut replica_addrs = Vec::new();
    for i in 1..=a.replicas {
        let addr = format!("127.0.0.1:{}", free_local_port()?);
        let rdir = dir.join(format!("r{i}"));
        let args = vec![
            "replica".into(),
            "--dir".into(),
            rdir.display().to_string(),
            "--size".into(),
            size.clone(),
            "--listen".into(),
            addr.clone(),
            "--volume-id".into(),
            record.uuid.to_string(),
        ];
        children
            .0
            .push((format!("replica r{i}"), spawn(&exe, &args, &secrets[..1])?));
        replica_addrs.push(addr);
    }
    let mut args = vec![
        "controller".into(),
        "--name".into(),
        a.name.to_string(),
        "--size".into(),
        size,
        "--iscsi".into(),
        a.iscsi.to_string(),
        "--api".into(),
        a.api.to_string(),
        "--volume-id".into(),
        record.uuid.to_string(),
    ];
    for r in &replica_addrs {
        args.push("--replica".into());
        args.push(r.clone());
    }
    if let Some(m) = a.metrics {
        args.push("--metrics".into());
        args.push(m.to_string());
    }
    if let Some(m) = a.min_healthy {
        args.push("--min-healthy".into());
        args.push(m.to_string());
    }
    args.extend(a.qos.to_args());
    children
        .0
        .push(("controller".into(), spawn(&exe, &args, &secrets)?));

    println!(
        "volume {} ({} bytes, {} replicas, data in {})",
        a.name,
        a.size,
        a.replicas,
        dir.display()
    );
    for (i, r) in replica_addrs.iter().enumerate() {
        println!("  replica r{}: {r}", i + 1);
    }
    println!("iSCSI: iscsi://{}/{}/0", a.iscsi, a.name.iqn());
    println!(
        "API:   {}   (basalt volume info --api {} --token-file {})",
        a.api,
        a.api,
        token_path.display()
    );
    println!(
        "Secrets (0600): volume secret {}, API token {}",
        secret_path.display(),
        token_path.display()
    );
    println!("Ctrl-C stops the volume.");

    // Wait for Ctrl-C / SIGTERM, or for the controller to exit.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_flag(sig, stop.clone())?;
    }
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("basalt: stopping volume {}", a.name);
            children.stop();
            return Ok(());
        }
        let controller = &mut children.0.last_mut().expect("controller started").1;
        if let Some(status) = controller.try_wait()? {
            children.0.pop();
            children.stop();
            bail!("the controller exited ({status}); the volume is stopped (see the log above for why)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Set `flag` when `sig` arrives.
fn signal_flag(sig: libc::c_int, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    use std::sync::OnceLock;
    static FLAG: OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = OnceLock::new();
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _ = FLAG.set(flag);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let previous = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        bail!("cannot install a handler for signal {sig}");
    }
    Ok(())
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    if a.watch {
        return watch(&a.api, &a.auth);
    }
    let reply = super::client::block_on(fetch_info(&a.api, &a.auth))?;
    let io = reply.io.unwrap_or_default();
    let uuid = uuid::Uuid::from_slice(&reply.volume_uuid)
        .map(|u| u.to_string())
        .unwrap_or_default();
    if a.json {
        let replicas: Vec<_> = reply
            .replicas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "address": r.address, "mode": r.mode, "cause": r.cause, "revision": r.revision,
                    "outstanding": r.outstanding, "errors": r.errors, "removed": r.removed,
                    "rebuild": (r.mode == "WO").then(|| serde_json::json!({
                        "done_bytes": r.rebuild_done_bytes, "total_bytes": r.rebuild_total_bytes,
                        "rate_bytes_per_sec": r.rebuild_rate, "eta_secs": eta(r), "delta": r.rebuild_delta,
                    })),
                    "hydration": (r.hydrate_total_bytes > 0).then(|| serde_json::json!({
                        "done_bytes": r.hydrated_bytes, "total_bytes": r.hydrate_total_bytes,
                    })),
                })
            })
            .collect();
        let v = serde_json::json!({
            "name": reply.name, "iqn": reply.iqn, "volume_uuid": uuid, "size_bytes": reply.size_bytes,
            "epoch": reply.epoch, "state": reply.state, "min_healthy": reply.min_healthy,
            "sessions": reply.sessions, "replicas": replicas,
            "clone_of": (!reply.clone_of.is_empty()).then_some(&reply.clone_of), "hydrated": reply.hydrated,
            "io": {
                "reads": io.reads, "writes": io.writes, "flushes": io.flushes, "unmaps": io.unmaps,
                "bytes_read": io.bytes_read, "bytes_written": io.bytes_written, "errors": io.errors,
                "in_flight": io.in_flight,
            },
            "qos": qos_json(&reply),
        });
        println!("{v}");
        return Ok(());
    }
    println!("volume   {} ({})", reply.name, reply.iqn);
    println!("uuid     {uuid}");
    println!("size     {} bytes", reply.size_bytes);
    println!("epoch    {}", reply.epoch);
    println!("state    {} (min healthy {})", reply.state, reply.min_healthy);
    println!("sessions {}", reply.sessions);
    if !reply.clone_of.is_empty() {
        let state = if reply.hydrated {
            "hydrated: independent of its source"
        } else {
            "hydrating: its source must stay"
        };
        println!("clone of {} ({state})", reply.clone_of);
    }
    println!("replicas");
    for r in &reply.replicas {
        let mut note = if r.cause.is_empty() {
            String::new()
        } else {
            format!("  ({})", r.cause)
        };
        if r.mode == "WO" && r.rebuild_total_bytes > 0 {
            note = format!(
                "  rebuilding{}: {} of {} bytes, {:.1} MiB/s, ETA {:.0} s",
                if r.rebuild_delta { " (delta)" } else { "" },
                r.rebuild_done_bytes,
                r.rebuild_total_bytes,
                r.rebuild_rate / (1 << 20) as f64,
                eta(r).unwrap_or(0.0)
            );
        }
        if r.hydrate_total_bytes > 0 && r.hydrated_bytes < r.hydrate_total_bytes {
            note.push_str(&format!(
                "  hydrating: {} of {} bytes",
                r.hydrated_bytes, r.hydrate_total_bytes
            ));
        }
        println!(
            "  {:<22} {:<3} revision {:<8} outstanding {:<4} errors {}{note}",
            r.address, r.mode, r.revision, r.outstanding, r.errors
        );
    }
    println!(
        "io       reads {} ({} B), writes {} ({} B), flushes {}, unmaps {}, errors {}, in flight {}",
        io.reads, io.bytes_read, io.writes, io.bytes_written, io.flushes, io.unmaps, io.errors, io.in_flight
    );
    let stats = reply.qos_stats.unwrap_or_default();
    println!(
        "qos      {}; throttled read {:.3} s, write {:.3} s; waiting read {}, write {}",
        super::qos::describe(&reply.qos.unwrap_or_default())?,
        stats.read_throttled_seconds,
        stats.write_throttled_seconds,
        stats.read_waiting,
        stats.write_waiting
    );
    Ok(())
}

/// The `qos` object of `volume info --json`.
fn qos_json(reply: &VolumeInfoReply) -> serde_json::Value {
    let stats = reply.qos_stats.unwrap_or_default();
    serde_json::json!({
        "limits": super::qos::to_json(&reply.qos.unwrap_or_default()),
        "throttled_seconds": { "read": stats.read_throttled_seconds, "write": stats.write_throttled_seconds },
        "waiting": { "read": stats.read_waiting, "write": stats.write_waiting },
    })
}

async fn fetch_info(api: &str, auth: &super::secrets::ApiClientArgs) -> anyhow::Result<VolumeInfoReply> {
    let mut client = super::client::connect(api, auth).await?;
    let reply = client
        .volume_info(VolumeInfoRequest {})
        .await
        .map_err(super::client::status_message)?;
    Ok(reply.into_inner())
}

/// Seconds left in a rebuild at its current rate.
fn eta(r: &ReplicaStatus) -> Option<f64> {
    let left = r.rebuild_total_bytes.saturating_sub(r.rebuild_done_bytes) as f64;
    (r.rebuild_rate > 0.0).then(|| left / r.rebuild_rate)
}

/// `volume info --watch`: a live progress bar per rebuilding replica, and
/// the modes, until interrupted.
fn watch(api: &str, auth: &super::secrets::ApiClientArgs) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:<24} {msg:<4} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut shown: std::collections::HashMap<String, ProgressBar> = std::collections::HashMap::new();
    super::client::block_on(async {
        loop {
            let reply = fetch_info(api, auth).await?;
            for r in &reply.replicas {
                let bar = shown.entry(r.address.clone()).or_insert_with(|| {
                    let b = bars.add(ProgressBar::new(1));
                    b.set_style(style.clone());
                    b.set_prefix(r.address.clone());
                    b
                });
                bar.set_message(r.mode.clone());
                if r.mode == "WO" {
                    bar.set_length(r.rebuild_total_bytes.max(1));
                    bar.set_position(r.rebuild_done_bytes);
                } else {
                    bar.set_length(1);
                    bar.set_position(u64::from(r.mode == "RW"));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
