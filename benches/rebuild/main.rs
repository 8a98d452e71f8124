//! `rebuild-bench`: how long a replica takes to come back, what the initiator feels meanwhile, and what a
//! snapshot costs the I/O that runs across it. One 3-replica volume on 127.0.0.1 (real `basalt replica` and
//! `basalt controller` processes, [`Cluster`]), driven by fio's libiscsi engine. Run via
//! `benches/rebuild/run.sh`.
//!
//! ```text
//!   fill      1 GiB sequential (1 MiB, QD8) into a 10 GiB volume: what every rebuild below must copy
//!   full      kill r3, wipe its directory, restart it: auto re-add, rebuild, RW        (idle)
//!   delta     kill r3, change 1% of the written data with fio, restart it: only the difference moves
//!   loaded    4 KiB random writes (QD8) run throughout:
//!               |-- baseline (3 RW) --|kill r3 + wipe|-- restart .. WO .. RW (rebuild) --|-- tail --|
//!             IOPS in the baseline window vs the rebuild window, and the longest completion latency of an
//!             I/O that completed between the restart and the end of the rebuild (RW, then the final drain
//!             that flushes what was copied): the stall an initiator sees on re-add
//!   snapshot  4 KiB random writes (QD8) while `basalt snapshot create` runs N times: latency percentiles
//! ```
//!
//! Times are wall clock from the replica's restart, asking the controller's `VolumeInfo` (gRPC, one
//! connection kept open) every [`POLL`]; the moment of RW is then taken from the controller's own log line
//! of the promotion (the poll sees it up to a `POLL` late, a tenth of a delta rebuild). "restart → RW"
//! is what an operator waits; it splits into "restart → WO" (the controller's re-add back-off and probe) and
//! "WO → RW" (the rebuild proper). fio logs every completion with a Unix-epoch timestamp
//! (`--write_lat_log`, `--log_unix_epoch`), so its windows line up with the harness's clock.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::VolumeInfoRequest;
use basalt_tests::fio::{Extent, FioJob, Pattern, Verify};
use basalt_tests::volume::{qemu_io, Cluster, Controller};
use basalt_tests::{basalt_binary, basalt_command, die_with_parent, fio_libiscsi, run_checked, ByteSize};
use clap::Parser;
use serde_json::Value;
use tonic::service::interceptor::InterceptedService;

/// Rebuild and snapshot-pause benchmarks of a 3-replica Basalt volume (run via benches/rebuild/run.sh).
#[derive(Parser, Debug)]
struct Args {
    /// Volume size in GiB.
    #[arg(long, default_value_t = 10)]
    size_gib: u64,
    /// How much is written before the rebuilds (MiB), sequentially from offset 0.
    #[arg(long, default_value_t = 1024)]
    written_mib: u64,
    /// Share of the written data changed while the replica is away, for the delta rebuild (percent).
    #[arg(long, default_value_t = 1.0)]
    delta_percent: f64,
    /// Seconds of load with all replicas healthy before the loaded rebuild (the IOPS baseline).
    #[arg(long, default_value_t = 10)]
    baseline_secs: u64,
    /// Snapshots taken during the snapshot-pause run.
    #[arg(long, default_value_t = 50)]
    snapshots: u32,
    /// Only these phases (comma-separated): full, delta, loaded, snapshot. The fill always runs.
    #[arg(long, value_delimiter = ',', default_value = "full,delta,loaded,snapshot")]
    phases: Vec<String>,
    /// Where fio's JSON and latency logs go (default: benches/.cache/rebuild).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How often the harness asks the controller for replica modes while it times a rebuild: one `VolumeInfo`
/// call on a kept connection (~0.2 ms of the controller's time), so the timing error is about 5 ms where
/// a 50 ms poll of `basalt volume info` (a process start each) made it up to 60 ms -- as much as a whole
/// delta rebuild should take.
const POLL: Duration = Duration::from_millis(5);
/// Longest any single wait may take before the benchmark gives up (a rebuild that stalls is a finding, not
/// a reason to hang).
const DEADLINE: Duration = Duration::from_secs(600);
/// Queue depth of the background write load: the depth of a busy guest, below the QD32 saturation point.
const LOAD_QD: u32 = 8;
/// The replica the benchmark kills and brings back.
const VICTIM: usize = 2;

/// One rebuild, timed from outside.
#[derive(Clone, Copy, Debug)]
struct RebuildTimes {
    /// From the replica process starting to its port accepting connections (the store's open).
    listening: Duration,
    /// From the replica process starting to its mode turning WO (re-add back-off + probe).
    to_wo: Duration,
    /// From the replica process starting to RW.
    to_rw: Duration,
    /// From RW to the controller's final drain having flushed what was copied (the replica serves as
    /// RW meanwhile; the controller's `after_rw=`), if it logged it.
    to_durable: Option<Duration>,
}

impl RebuildTimes {
    fn rebuild(&self) -> Duration {
        self.to_rw.saturating_sub(self.to_wo)
    }
}

/// What the initiator saw during the loaded rebuild.
struct LoadedRebuild {
    times: RebuildTimes,
    baseline_iops: f64,
    rebuild_iops: f64,
    /// Longest completion latency of an I/O that completed between the restart and the end of the
    /// rebuild (RW, then its final drain).
    max_stall: Duration,
    /// Longest completion latency of the whole run (includes losing the replica).
    max_overall: Duration,
}

struct SnapshotPause {
    taken: u32,
    create_mean: Duration,
    create_max: Duration,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    iops: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let known = ["full", "delta", "loaded", "snapshot"];
    if let Some(p) = args.phases.iter().find(|p| !known.contains(&p.as_str())) {
        bail!("unknown phase {p:?}; phases: {}", known.join(", "));
    }
    if args.written_mib == 0 || args.written_mib > args.size_gib * 1024 {
        bail!(
            "--written-mib must be between 1 and the volume size ({} MiB)",
            args.size_gib * 1024
        );
    }
    if !(args.delta_percent > 0.0 && args.delta_percent <= 100.0) {
        bail!("--delta-percent must be in (0, 100], got {}", args.delta_percent);
    }
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    let fio = fio_libiscsi()?;
    basalt_binary()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace.join("benches/.cache/rebuild"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;

    let size = ByteSize::mib(args.size_gib * 1024);
    let written = ByteSize::mib(args.written_mib);
    let mut cluster = Cluster::start(3, size)?;
    let controller = cluster.start_controller(&[])?;
    eprintln!(
        "bench: 3 replicas, {size} volume at {}; writing {written}",
        controller.url
    );
    let fill = FioJob {
        name: "fill".into(),
        pattern: Pattern::SeqWrite,
        block_size: ByteSize::mib(1),
        iodepth: 8,
        extent: Extent::Bytes(written),
        verify: Verify::None,
    };
    let start = Instant::now();
    let r = fill.run(&fio, &controller.url, &out).context("fill the volume")?;
    if r.error != 0 {
        bail!("fio reported error {} while filling the volume", r.error);
    }
    eprintln!(
        "bench: filled {written} in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Flushed, as a guest's filesystem would have within seconds: a phase run alone then starts where it
    // would after the others (each rebuild ends with a flush), not with 1 GiB of unflushed writes that the
    // victim must verify at open and the rebuild's final flush must write back.
    flush_volume(&controller)?;

    let mut full = None;
    let mut delta = None;
    let mut loaded = None;
    let mut snapshot = None;
    if phase("full") {
        kill_victim(&mut cluster, &controller, true)?;
        let t = restart_victim(&mut cluster, &controller)?;
        eprintln!("bench: full rebuild idle: {t:?}");
        full = Some(t);
    }
    if phase("delta") {
        kill_victim(&mut cluster, &controller, false)?;
        let changed = (written.bytes() as f64 * args.delta_percent / 100.0) as u64 / 4096 * 4096;
        let mut cmd = Command::new(&fio);
        cmd.args(fio_base("delta-change", &controller, LOAD_QD, written))
            .arg(format!("--io_size={}", changed.max(4096)))
            .current_dir(&out);
        die_with_parent(&mut cmd);
        let text = run_checked(&mut cmd).context("change data while the replica is away")?;
        std::fs::write(out.join("fio-delta-change.json"), &text.stdout)?;
        // The guest flushes what it changed, as a filesystem does within seconds; unflushed, the
        // rebuild's final flush would also write back the guest's 10 MiB on every replica, work the
        // guest's own next flush pays for anyway.
        flush_volume(&controller)?;
        let t = restart_victim(&mut cluster, &controller)?;
        eprintln!("bench: delta rebuild ({changed} bytes changed): {t:?}");
        delta = Some((changed, t));
    }
    if phase("loaded") {
        loaded = Some(loaded_rebuild(&args, &fio, &out, &mut cluster, &controller)?);
    }
    if phase("snapshot") {
        snapshot = Some(snapshot_pause(&args, &fio, &out, &controller)?);
    }

    print!(
        "{}",
        report(&args, written, full, delta, loaded.as_ref(), snapshot.as_ref())
    );
    eprintln!(
        "bench: fio JSON and logs in {}; daemon logs were in {}",
        out.display(),
        cluster.log_dir().display()
    );
    Ok(())
}

/// fio's arguments for a 4 KiB random-write job on the volume that logs every completion with a Unix
/// timestamp (the job runs until `--size`/`--io_size` or `--runtime` ends it, or it is interrupted).
fn fio_base(name: &str, controller: &Controller, iodepth: u32, written: ByteSize) -> Vec<String> {
    vec![
        // Writes stay inside the filled region, so every rebuild copies the same data set ("1 GiB written")
        // instead of one that grows with each second of load.
        format!("--size={}", written.bytes()),
        format!("--name={name}"),
        "--ioengine=libiscsi".into(),
        format!("--filename={}", controller.url.fio_filename()),
        "--rw=randwrite".into(),
        "--bs=4096".into(),
        format!("--iodepth={iodepth}"),
        "--norandommap=1".into(),
        "--randrepeat=0".into(),
        // Jobs as threads of one process: a job process would outlive the harness (see `die_with_parent`).
        "--thread".into(),
        "--output-format=json".into(),
    ]
}

/// Makes everything written so far durable on every replica, as a guest's flush does: qemu-io writes 4 KiB
/// at offset 0 (over data the fill wrote; qemu skips a flush with no write before it) and flushes
/// (SYNCHRONIZE CACHE). Not fio's end_fsync: fio 3.33's libiscsi engine sends SYNCHRONIZE CACHE(16) with
/// the volume's size in *bytes* as its block count, which a target that checks the range (Basalt, LIO)
/// refuses with LBA OUT OF RANGE -- and fio still exits 0.
fn flush_volume(controller: &Controller) -> anyhow::Result<()> {
    let (ok, out) = qemu_io(&controller.url, &["write 0 4k", "flush"])?;
    if !ok {
        bail!("qemu-io could not flush the volume: {out}");
    }
    Ok(())
}

/// Kills the victim replica like a node crash, waits until the controller marks it ERR, and (for a full
/// rebuild) wipes its directory so it comes back empty.
fn kill_victim(cluster: &mut Cluster, controller: &Controller, wipe: bool) -> anyhow::Result<()> {
    cluster.kill_replica(VICTIM);
    let addr = cluster.replicas[VICTIM].addr;
    wait_mode(controller, addr, "ERR")?;
    if wipe {
        let dir = &cluster.replicas[VICTIM].dir;
        std::fs::remove_dir_all(dir).with_context(|| format!("wipe {}", dir.display()))?;
    }
    Ok(())
}

/// Starts the victim again and times it through WO to RW.
fn restart_victim(cluster: &mut Cluster, controller: &Controller) -> anyhow::Result<RebuildTimes> {
    let addr = cluster.replicas[VICTIM].addr;
    let flushed_before = flushed_lines(controller, addr).len();
    let start = Instant::now();
    let started = SystemTime::now();
    cluster.start_replica(VICTIM)?;
    let listening = start.elapsed();
    // WO can be brief for a small delta: RW also counts as "past WO".
    let mut to_wo = None;
    let mut api = ModeProbe::connect(controller.api)?;
    loop {
        let mode = api.mode(addr);
        match mode.as_deref() {
            Some("WO") if to_wo.is_none() => to_wo = Some(start.elapsed()),
            Some("RW") => {
                let seen = start.elapsed();
                let flushed = flushed_line(controller, addr, flushed_before);
                // The controller's own time of the promotion, which the poll above sees up to a
                // `POLL` late (a tenth of a delta rebuild); the poll's if the line is not there.
                let rw_line = last_rebuild_line(controller, addr);
                let to_rw = rw_line
                    .as_deref()
                    .and_then(log_time)
                    .and_then(|at| at.duration_since(started).ok())
                    .filter(|&exact| exact <= seen)
                    .unwrap_or(seen);
                let to_wo = to_wo.map_or(to_rw, |wo: Duration| wo.min(to_rw));
                let after_rw = flushed
                    .as_deref()
                    .and_then(|l| field(l, "after_rw")?.parse::<f64>().ok());
                let times = RebuildTimes {
                    listening,
                    to_wo,
                    to_rw,
                    to_durable: after_rw.map(Duration::from_secs_f64),
                };
                // Where the controller says the time went (its steps, in ms), next to the outside view.
                let opened = cluster.replicas[VICTIM].daemon.as_ref().and_then(|d| {
                    d.plain_log()
                        .lines()
                        .rev()
                        .find(|l| l.contains("store opened"))
                        .map(str::to_string)
                });
                eprintln!(
                    "bench: replica listening after {}; replica: {}; controller: {}; then: {}",
                    ms(listening),
                    opened.unwrap_or_else(|| "no open line logged".into()),
                    rw_line.unwrap_or_else(|| "no rebuild line logged".into()),
                    flushed.unwrap_or_else(|| "no flush line logged".into())
                );
                return Ok(times);
            }
            _ => {}
        }
        if start.elapsed() > DEADLINE {
            bail!("replica {addr} did not become RW within {DEADLINE:?} of its restart (last mode {mode:?})");
        }
        std::thread::sleep(POLL);
    }
}

/// The replica modes the controller reports, over one kept gRPC connection.
struct ModeProbe {
    runtime: tokio::runtime::Runtime,
    client: ControllerServiceClient<InterceptedService<tonic::transport::Channel, basalt_tests::AddApiToken>>,
}

impl ModeProbe {
    fn connect(api: std::net::SocketAddr) -> anyhow::Result<ModeProbe> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = runtime
            .block_on(tonic::transport::Channel::from_shared(format!("http://{api}"))?.connect())
            .with_context(|| format!("connect to the controller's API at {api}"))?;
        let client = ControllerServiceClient::with_interceptor(
            channel,
            basalt_tests::add_api_token as basalt_tests::AddApiToken,
        );
        Ok(ModeProbe { runtime, client })
    }

    /// The mode ("RW", "WO", "ERR") of the replica at `addr`; `None` if the controller does not answer or
    /// does not list it.
    fn mode(&mut self, addr: std::net::SocketAddr) -> Option<String> {
        let reply = self
            .runtime
            .block_on(self.client.volume_info(VolumeInfoRequest {}))
            .ok()?
            .into_inner();
        let address = addr.to_string();
        reply
            .replicas
            .into_iter()
            .find(|r| r.address == address)
            .map(|r| r.mode)
    }
}

/// The controller's log line for the last completed rebuild of `addr`: bytes copied, whether the
/// write-intent record answered, and the time of each step.
fn last_rebuild_line(controller: &Controller, addr: std::net::SocketAddr) -> Option<String> {
    let log = controller.daemon.plain_log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("rebuild complete") && l.contains(&format!("replica={addr}")))?;
    Some(line.to_string())
}

/// The controller's log lines saying a rebuilt `addr` was flushed (the end of its rebuild, after RW).
fn flushed_lines(controller: &Controller, addr: std::net::SocketAddr) -> Vec<String> {
    let log = controller.daemon.plain_log();
    log.lines()
        .filter(|l| l.contains("rebuilt replica flushed") && l.contains(&format!("replica={addr}")))
        .map(str::to_string)
        .collect()
}

/// The flush line of the rebuild that just turned `addr` RW (the one after the `before` earlier
/// ones), waiting up to 10 s for it.
fn flushed_line(controller: &Controller, addr: std::net::SocketAddr, before: usize) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(line) = flushed_lines(controller, addr).into_iter().nth(before) {
            return Some(line);
        }
        std::thread::sleep(POLL);
    }
    None
}

/// When a log line was written: its leading UTC timestamp (`2026-11-21T16:45:16.261623Z`, as the
/// daemons' tracing output starts every line).
fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.splitn(3, ':');
    let (h, min) = (hms.next()?.parse::<u64>().ok()?, hms.next()?.parse::<u64>().ok()?);
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let whole = Duration::from_secs(days * 86_400 + h * 3_600 + min * 60);
    Some(UNIX_EPOCH + whole + Duration::from_secs_f64(sec))
}

/// The value of `key=value` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn wait_mode(controller: &Controller, addr: std::net::SocketAddr, want: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut api = ModeProbe::connect(controller.api)?;
    loop {
        let mode = api.mode(addr);
        if mode.as_deref() == Some(want) {
            return Ok(());
        }
        if start.elapsed() > DEADLINE {
            bail!("replica {addr} did not turn {want} within {DEADLINE:?} (last mode {mode:?})");
        }
        std::thread::sleep(POLL);
    }
}

/// A background fio load that logs every completion; stopped with SIGINT so it still writes its JSON and
/// logs.
struct Load {
    child: Child,
    name: String,
    out: PathBuf,
}

impl Load {
    fn start(
        fio: &Path,
        out: &Path,
        name: &str,
        controller: &Controller,
        written: ByteSize,
    ) -> anyhow::Result<Load> {
        let mut cmd = Command::new(fio);
        cmd.args(fio_base(name, controller, LOAD_QD, written))
            .args(["--time_based=1", "--runtime=3600s"])
            .arg(format!("--write_lat_log={name}"))
            .args(["--log_unix_epoch=1", "--log_avg_msec=0"])
            .current_dir(out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("start fio")?;
        Ok(Load {
            child,
            name: name.into(),
            out: out.into(),
        })
    }

    /// Stops fio and returns its JSON document and its completion log (Unix ms, latency).
    fn stop(self) -> anyhow::Result<(Value, Vec<(u64, Duration)>)> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let output = self.child.wait_with_output().context("wait for fio")?;
        let text = String::from_utf8_lossy(&output.stdout);
        std::fs::write(self.out.join(format!("fio-{}.json", self.name)), text.as_bytes())?;
        let start = text
            .find('{')
            .with_context(|| format!("fio printed no JSON: {}", String::from_utf8_lossy(&output.stderr)))?;
        let doc: Value = serde_json::from_str(&text[start..]).context("parse fio's JSON")?;
        if let Some(e) = doc
            .pointer("/jobs/0/error")
            .and_then(Value::as_i64)
            .filter(|&e| e != 0)
        {
            bail!("fio reported error {e} in {}", self.name);
        }
        let log = self.out.join(format!("{}_clat.1.log", self.name));
        let log = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
        Ok((doc, parse_lat_log(&log)))
    }
}

/// fio's latency log: `time_ms, latency_ns, direction, block_size, offset[, prio]` per completion.
fn parse_lat_log(text: &str) -> Vec<(u64, Duration)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let t = f.next()?.parse().ok()?;
            let ns = f.next()?.parse().ok()?;
            Some((t, Duration::from_nanos(ns)))
        })
        .collect()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Completions per second and the longest latency among completions in `[from, to)` (Unix ms).
fn window(log: &[(u64, Duration)], from: u64, to: u64) -> (f64, Duration) {
    let inside = log.iter().filter(|(t, _)| (from..to).contains(t));
    let (n, max) = inside.fold((0u64, Duration::ZERO), |(n, m), (_, l)| (n + 1, m.max(*l)));
    let secs = (to.saturating_sub(from)) as f64 / 1e3;
    (if secs > 0.0 { n as f64 / secs } else { 0.0 }, max)
}

fn loaded_rebuild(
    args: &Args,
    fio: &Path,
    out: &Path,
    cluster: &mut Cluster,
    controller: &Controller,
) -> anyhow::Result<LoadedRebuild> {
    let load = Load::start(
        fio,
        out,
        "loaded-rebuild",
        controller,
        ByteSize::mib(args.written_mib),
    )?;
    // fio logs in and ramps up; the baseline window starts after that.
    std::thread::sleep(Duration::from_secs(2));
    let base_from = unix_ms();
    std::thread::sleep(Duration::from_secs(args.baseline_secs));
    let base_to = unix_ms();
    kill_victim(cluster, controller, true)?;
    let restart_at = unix_ms();
    let times = restart_victim(cluster, controller)?;
    // `restart_victim` returns once the rebuilt replica is RW *and* its final drain has flushed what
    // was copied (the drain runs after the promotion): the window covers both.
    let done_at = unix_ms();
    std::thread::sleep(Duration::from_secs(2));
    let (doc, log) = load.stop()?;
    let (baseline_iops, _) = window(&log, base_from, base_to);
    let (rebuild_iops, max_stall) = window(&log, restart_at, done_at);
    let max_overall = Duration::from_nanos(
        doc.pointer("/jobs/0/write/clat_ns/max")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as u64,
    );
    eprintln!(
        "bench: loaded rebuild: {times:?}, {baseline_iops:.0} -> {rebuild_iops:.0} IOPS, stall {max_stall:?}"
    );
    Ok(LoadedRebuild {
        times,
        baseline_iops,
        rebuild_iops,
        max_stall,
        max_overall,
    })
}

fn snapshot_pause(
    args: &Args,
    fio: &Path,
    out: &Path,
    controller: &Controller,
) -> anyhow::Result<SnapshotPause> {
    let load = Load::start(
        fio,
        out,
        "snapshot-pause",
        controller,
        ByteSize::mib(args.written_mib),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let from = unix_ms();
    let mut creates = Vec::new();
    for i in 0..args.snapshots {
        let mut cmd = basalt_command()?;
        cmd.args(["snapshot", "create", "--api", &controller.api.to_string()])
            .arg(format!("bench-{i}"));
        let start = Instant::now();
        run_checked(&mut cmd).with_context(|| format!("snapshot {i}"))?;
        creates.push(start.elapsed());
        // Spaced out so each pause is seen on its own rather than merged with the next.
        std::thread::sleep(Duration::from_millis(200));
    }
    let to = unix_ms();
    let each: Vec<String> = creates
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    eprintln!("bench: snapshot create times in order (ms): {}", each.join(" "));
    let (_doc, log) = load.stop()?;
    let mut lat: Vec<Duration> = log
        .iter()
        .filter(|(t, _)| (from..to).contains(t))
        .map(|(_, l)| *l)
        .collect();
    if lat.is_empty() {
        bail!("fio completed no write while the snapshots were taken");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let iops = lat.len() as f64 / ((to - from) as f64 / 1e3);
    Ok(SnapshotPause {
        taken: args.snapshots,
        create_mean: creates.iter().sum::<Duration>() / creates.len().max(1) as u32,
        create_max: creates.iter().copied().max().unwrap_or_default(),
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: lat[lat.len() - 1],
        iops,
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// A Markdown table, ready for benches/README.md.
fn report(
    args: &Args,
    written: ByteSize,
    full: Option<RebuildTimes>,
    delta: Option<(u64, RebuildTimes)>,
    loaded: Option<&LoadedRebuild>,
    snapshot: Option<&SnapshotPause>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n3 replicas, {} GiB volume, {written} written; rebuild times: restart -> RW (restart -> WO + WO -> RW; \
         of which restart -> listening, the replica opening its store; then RW -> what was copied flushed)\n",
        args.size_gib
    );
    let _ = writeln!(s, "| measurement | figure | goal | |");
    let _ = writeln!(s, "|---|---:|---:|---|");
    let rebuild_row = |s: &mut String, what: &str, t: &RebuildTimes, goal: Duration| {
        let _ = writeln!(
            s,
            "| {what} | {} ({} + {}; {}; then {}) | <= {} | {} |",
            secs(t.to_rw),
            secs(t.to_wo),
            secs(t.rebuild()),
            secs(t.listening),
            t.to_durable.map_or("-".into(), secs),
            secs(goal),
            verdict(t.to_rw <= goal)
        );
    };
    if let Some(t) = &full {
        rebuild_row(&mut s, "full rebuild, idle", t, Duration::from_secs(5));
    }
    if let Some(l) = loaded {
        rebuild_row(
            &mut s,
            "full rebuild, 4 KiB randwrite QD8 load",
            &l.times,
            Duration::from_secs(15),
        );
    }
    if let Some((changed, t)) = &delta {
        let goal = full.map(|f| f.to_rw.mul_f64(0.05));
        let _ = writeln!(
            s,
            "| delta rebuild ({:.1} MiB changed) | {} ({} + {}; {}; then {}) | {} | {} |",
            *changed as f64 / f64::from(1u32 << 20),
            secs(t.to_rw),
            secs(t.to_wo),
            secs(t.rebuild()),
            secs(t.listening),
            t.to_durable.map_or("-".into(), secs),
            goal.map_or("5% of full".into(), |g| format!("<= {}", secs(g))),
            goal.map_or("-", |g| verdict(t.to_rw <= g))
        );
    }
    if let Some(l) = loaded {
        let ratio = if l.baseline_iops > 0.0 {
            l.rebuild_iops / l.baseline_iops
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "| write IOPS during rebuild / before | {:.0} / {:.0} = {:.2} | >= 0.50 | {} |",
            l.rebuild_iops,
            l.baseline_iops,
            ratio,
            verdict(ratio >= 0.5)
        );
        let _ = writeln!(
            s,
            "| longest I/O completion, restart -> RW + final drain | {} | <= 200 ms | {} |",
            ms(l.max_stall),
            verdict(l.max_stall <= Duration::from_millis(200))
        );
        let _ = writeln!(
            s,
            "| longest I/O completion, whole run (incl. the kill) | {} | - | |",
            ms(l.max_overall)
        );
    }
    if let Some(p) = snapshot {
        let _ = writeln!(
            s,
            "| {} snapshots under QD8 randwrite: write p50 / p99 / p99.9 / max | {} / {} / {} / {} | p99 <= 50 ms | {} |",
            p.taken,
            ms(p.p50),
            ms(p.p99),
            ms(p.p999),
            ms(p.max),
            verdict(p.p99 <= Duration::from_millis(50))
        );
        let _ = writeln!(
            s,
            "| snapshot create (CLI round trip) mean / max; IOPS meanwhile | {} / {}; {:.0} | - | |",
            ms(p.create_mean),
            ms(p.create_max),
            p.iops
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_timed_by_their_leading_utc_stamp() {
        let at = |line: &str| log_time(line).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_micros());
        assert_eq!(
            at("2026-11-21T16:45:16.261623Z  INFO basalt_engine::volume::rebuild: replica RW"),
            Some(1_795_279_516_261_623)
        );
        assert_eq!(at("2024-02-29T00:00:00Z x"), Some(1_709_164_800_000_000));
        assert_eq!(at("1970-01-01T00:00:00.5Z"), Some(500_000));
        for garbage in [
            "",
            "bench: no stamp",
            "2026-11-21 16:45:16Z",
            "2026-11-21T16:45:16",
        ] {
            assert_eq!(at(garbage), None, "{garbage:?}");
        }
    }
}
