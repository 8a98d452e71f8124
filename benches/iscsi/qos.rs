//! `iscsi-bench --qos`: QoS limits measured on one 3-replica volume, side by side with the same volume unlimited.
//!
//! The volume (`basalt-r3`) is prefilled once; then, round after round, every job runs under three settings,
//! changed at run time with `basalt volume qos` (the same binary and the same volume throughout):
//!
//! ```text
//!   none       no limit configured: the throttle's fast path
//!   high       --iops 10000000 --bps 100G: limits set, never reached (every op goes through the buckets)
//!   limited    --iops 2000 for the 4 KiB jobs, --bps 50M for the 1 MiB job (default burst: one second)
//! ```
//!
//! The ramp (unmeasured) spends the one-second burst, so the measured figure is the rate itself. The table gives
//! the limited figure against its limit, and `high` against `none`: what the QoS code costs when no limit bites.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_tests::fio::{Direction, Extent, FioJob, Pattern, Verify};
use basalt_tests::{basalt_command, fio_libiscsi, run_checked, ByteSize, Lun, TargetKind};

/// The IOPS limit the 4 KiB jobs run under (issue 14's figure).
const LIMIT_IOPS: u64 = 2_000;
/// The bandwidth limit the 1 MiB job runs under, MiB/s (issue 14's figure).
const LIMIT_MIB_S: u64 = 50;

/// One job and the limit it is measured against.
struct QosJob {
    name: &'static str,
    pattern: Pattern,
    block_size: ByteSize,
    /// `basalt volume qos` flags of the limited setting.
    limit_flags: [&'static str; 2],
}

const JOBS: [QosJob; 3] = [
    QosJob {
        name: "4k-randwrite-qd32",
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        limit_flags: ["--iops", "2000"],
    },
    QosJob {
        name: "4k-randread-qd32",
        pattern: Pattern::RandRead,
        block_size: ByteSize::kib(4),
        limit_flags: ["--iops", "2000"],
    },
    QosJob {
        name: "1m-write-qd32",
        pattern: Pattern::SeqWrite,
        block_size: ByteSize::mib(1),
        limit_flags: ["--bps", "50M"],
    },
];

/// The three settings, in the order they run within a round.
const SETTINGS: [&str; 3] = ["none", "high", "limited"];

/// Set the volume's limits for `setting` with `basalt volume qos` (replacing whatever was set).
fn apply(api: SocketAddr, setting: &str, job: &QosJob) -> anyhow::Result<()> {
    let mut cmd = basalt_command()?;
    cmd.args(["volume", "qos", "--api", &api.to_string(), "--clear"]);
    match setting {
        "none" => {}
        "high" => {
            cmd.args(["--iops", "10000000", "--bps", "100G"]);
        }
        _ => {
            cmd.args(job.limit_flags);
        }
    }
    run_checked(&mut cmd).with_context(|| format!("set the QoS limits ({setting})"))?;
    Ok(())
}

/// Run the QoS comparison and print its table.
pub fn run(runtime: u64, ramp: u64, rounds: u32, size_mib: u64, out: &Path) -> anyhow::Result<()> {
    let fio = fio_libiscsi()?;
    let size = ByteSize::mib(size_mib);
    let mut lun = Lun::start(TargetKind::BasaltVolume3, size).context("start basalt-r3")?;
    let api = lun.volume_api().context("a replicated volume has an API")?;
    eprintln!("bench: basalt-r3 serves {} ({size}), prefilling", lun.url());
    FioJob {
        name: "qos-prefill".into(),
        pattern: Pattern::SeqWrite,
        block_size: ByteSize::mib(1),
        iodepth: 8,
        extent: Extent::Bytes(size),
        verify: Verify::None,
    }
    .run(&fio, lun.url(), out)
    .context("prefill")?;

    let extent = Extent::Time {
        runtime: Duration::from_secs(runtime),
        ramp: Duration::from_secs(ramp),
    };
    // results[job][setting] = one Direction per round
    let mut results = vec![vec![Vec::new(); SETTINGS.len()]; JOBS.len()];
    for round in 1..=rounds {
        for (j, job) in JOBS.iter().enumerate() {
            for (s, setting) in SETTINGS.iter().enumerate() {
                apply(api, setting, job)?;
                eprintln!(
                    "bench: round {round}/{rounds}: {} with limits {setting}",
                    job.name
                );
                let result = FioJob {
                    name: format!("qos-{}-{setting}-r{round}", job.name),
                    pattern: job.pattern,
                    block_size: job.block_size,
                    iodepth: 32,
                    extent,
                    verify: Verify::None,
                }
                .run(&fio, lun.url(), out)
                .with_context(|| {
                    format!("{} ({setting}); controller log:\n{}", job.name, lun.server_log())
                })?;
                if result.error != 0 {
                    bail!("fio reported error {} for {} ({setting})", result.error, job.name);
                }
                lun.check_running()?;
                results[j][s].push(*result.measured(job.pattern));
            }
        }
    }
    print!("{}", table(runtime, ramp, rounds, size_mib, &results));
    Ok(())
}

fn mean(runs: &[Direction], f: fn(&Direction) -> f64) -> f64 {
    runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64
}

fn table(runtime: u64, ramp: u64, rounds: u32, size_mib: u64, results: &[Vec<Vec<Direction>>]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nbasalt-r3, QD32, {rounds} round(s), {runtime} s per job (+{ramp} s ramp), {size_mib} MiB volume; \
         limits {LIMIT_IOPS} IOPS (4k jobs) and {LIMIT_MIB_S} MiB/s (1m job)\n"
    );
    let _ = writeln!(s, "| job | limits | IOPS | MiB/s | vs limit | vs none |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|");
    for (j, job) in JOBS.iter().enumerate() {
        let none_iops = mean(&results[j][0], |d| d.iops);
        for (k, setting) in SETTINGS.iter().enumerate() {
            let iops = mean(&results[j][k], |d| d.iops);
            let mib = mean(&results[j][k], |d| d.bytes_per_sec) / f64::from(1u32 << 20);
            let vs_limit = match *setting {
                "limited" if job.block_size == ByteSize::mib(1) => {
                    format!("{:+.1} %", (mib / LIMIT_MIB_S as f64 - 1.0) * 100.0)
                }
                "limited" => format!("{:+.1} %", (iops / LIMIT_IOPS as f64 - 1.0) * 100.0),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {setting} | {iops:.0} | {mib:.1} | {vs_limit} | {:.2}x |",
                job.name,
                iops / none_iops
            );
        }
    }
    s
}
