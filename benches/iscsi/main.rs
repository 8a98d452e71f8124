//! `iscsi-bench`: the same fio jobs against several iSCSI targets, side by side.
//!
//! Every target serves a sparse file of the same size on 127.0.0.1 (the fixtures of the end-to-end tests,
//! [`basalt_tests::Lun`]), is prefilled once with sequential 1 MiB writes (so reads hit allocated data, not
//! holes), and then each job runs on every target in turn before the next job starts:
//!
//! ```text
//!   round 1:  4k randwrite QD1: tgt, basalt   4k randwrite QD32: tgt, basalt   ...   1M read QD8: tgt, basalt
//!   round 2:  ...
//! ```
//!
//! Interleaving spreads slow drifts of a shared machine (other builds, page-cache state) over all targets
//! instead of charging them to whichever target ran last. Results are averaged over rounds; the ratio column
//! compares each target with the first one named (the baseline, tgt by default). fio's JSON for every run is
//! kept in the output directory.
//!
//! Adding a target means adding a [`TargetKind`] variant; this program and the end-to-end tests pick it up by
//! name. Replicated Basalt volumes are `basalt-r1` and `basalt-r3` (1 or 3 `basalt replica` processes, each on
//! its own sparse directory, plus a `basalt controller`). For those, a sampler thread reads the controller's
//! `/proc/PID/status` every [`RSS_SAMPLE_EVERY`] while each job runs: the table gets the highest VmRSS seen
//! during the job and the process's VmHWM (peak since start) after it, so memory growth under a deep queue is
//! visible next to the IOPS it bought.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use basalt_tests::fio::{Direction, Extent, FioJob, Pattern, Verify};
use basalt_tests::{fio_libiscsi, ByteSize, Lun, TargetKind};
use clap::Parser;

mod qos;

/// Benchmark iSCSI targets side by side with fio's libiscsi engine (run via benches/iscsi/run.sh).
#[derive(Parser, Debug)]
struct Args {
    /// Targets, comma-separated; the first is the baseline of the ratio column.
    /// Known: tgt, basalt (serve-file), basalt-r1, basalt-r3 (replicated volumes).
    #[arg(long, default_value = "tgt,basalt", value_delimiter = ',')]
    targets: Vec<String>,
    /// Measured seconds per job and target.
    #[arg(long, default_value_t = 15)]
    runtime: u64,
    /// Unmeasured warm-up seconds before each measurement.
    #[arg(long, default_value_t = 2)]
    ramp: u64,
    /// LUN size in MiB. 1 GiB: larger than any cache the targets keep of their own, prefilled in seconds.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// How many times the whole interleaved sequence runs; figures are means over rounds.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Only jobs whose name contains this (e.g. `4k`, `qd32`).
    #[arg(long)]
    only: Option<String>,
    /// Where fio's JSON output goes (default: benches/.cache/iscsi).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Instead of comparing targets: QoS limits (2,000 IOPS, 50 MiB/s) on one basalt-r3 volume, beside the
    /// same volume with no limit and with limits too high to bite (--targets and --only do not apply).
    #[arg(long)]
    qos: bool,
}

/// One measured job: what it does, independent of the target.
struct Job {
    name: &'static str,
    pattern: Pattern,
    block_size: ByteSize,
    iodepth: u32,
}

/// The job set. Queue depth 1 shows per-command latency; 32 shows how much the target overlaps commands;
/// 1 MiB at QD8 shows streaming bandwidth (data-segment handling, R2T/immediate-data negotiation).
const JOBS: [Job; 6] = [
    Job {
        name: "4k-randwrite-qd1",
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        iodepth: 1,
    },
    Job {
        name: "4k-randwrite-qd32",
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        iodepth: 32,
    },
    Job {
        name: "4k-randread-qd1",
        pattern: Pattern::RandRead,
        block_size: ByteSize::kib(4),
        iodepth: 1,
    },
    Job {
        name: "4k-randread-qd32",
        pattern: Pattern::RandRead,
        block_size: ByteSize::kib(4),
        iodepth: 32,
    },
    Job {
        name: "1m-write-qd8",
        pattern: Pattern::SeqWrite,
        block_size: ByteSize::mib(1),
        iodepth: 8,
    },
    Job {
        name: "1m-read-qd8",
        pattern: Pattern::SeqRead,
        block_size: ByteSize::mib(1),
        iodepth: 8,
    },
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace.join("benches/.cache/iscsi"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    if args.qos {
        if args.rounds == 0 || args.runtime == 0 {
            bail!("need at least one round and a runtime of at least 1 s");
        }
        return qos::run(args.runtime, args.ramp, args.rounds, args.size_mib, &out);
    }
    let kinds = args
        .targets
        .iter()
        .map(|name| {
            TargetKind::from_name(name).with_context(|| {
                let known: Vec<_> = TargetKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown target {name:?}; known targets: {}", known.join(", "))
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if kinds.is_empty() || args.rounds == 0 || args.runtime == 0 {
        bail!("need at least one target, one round and a runtime of at least 1 s");
    }
    let jobs: Vec<&Job> = JOBS
        .iter()
        .filter(|j| args.only.as_deref().is_none_or(|o| j.name.contains(o)))
        .collect();
    if jobs.is_empty() {
        bail!(
            "--only {:?} matches no job; jobs: {}",
            args.only,
            JOBS.map(|j| j.name).join(", ")
        );
    }
    let fio = fio_libiscsi()?;
    let size = ByteSize::mib(args.size_mib);

    let mut luns = Vec::new();
    for &kind in &kinds {
        let lun = Lun::start(kind, size).with_context(|| format!("start {kind}"))?;
        eprintln!("bench: {kind} serves {} ({size}), prefilling", lun.url());
        let prefill = FioJob {
            name: format!("{kind}-prefill"),
            pattern: Pattern::SeqWrite,
            block_size: ByteSize::mib(1),
            iodepth: 8,
            extent: Extent::Bytes(size),
            verify: Verify::None,
        };
        prefill
            .run(&fio, lun.url(), &out)
            .with_context(|| format!("prefill {kind}"))?;
        luns.push(lun);
    }

    // results[job][target] = one Direction per round; memory[job][target] = controller memory per round
    let mut results: Vec<Vec<Vec<Direction>>> = vec![vec![Vec::new(); luns.len()]; jobs.len()];
    let mut memory: Vec<Vec<Vec<Memory>>> = vec![vec![Vec::new(); luns.len()]; jobs.len()];
    let extent = Extent::Time {
        runtime: Duration::from_secs(args.runtime),
        ramp: Duration::from_secs(args.ramp),
    };
    for round in 1..=args.rounds {
        for (j, job) in jobs.iter().enumerate() {
            for (t, lun) in luns.iter_mut().enumerate() {
                let kind = lun.kind();
                let fio_job = FioJob {
                    name: format!("{kind}-{}-r{round}", job.name),
                    pattern: job.pattern,
                    block_size: job.block_size,
                    iodepth: job.iodepth,
                    extent,
                    verify: Verify::None,
                };
                eprintln!("bench: round {round}/{}: {} on {kind}", args.rounds, job.name);
                // Only replicated volumes are sampled: the goal is about the controller's memory.
                let sampler = kind.replicas().and(lun.server_pid()).map(RssSampler::start);
                let result = fio_job.run(&fio, lun.url(), &out);
                if let Some(sampler) = sampler {
                    memory[j][t].push(sampler.finish());
                }
                let result = result
                    .with_context(|| format!("{} on {kind}; target log:\n{}", job.name, lun.server_log()))?;
                if result.error != 0 {
                    bail!("fio reported error {} for {} on {kind}", result.error, job.name);
                }
                lun.check_running()?;
                results[j][t].push(*result.measured(job.pattern));
            }
        }
    }

    print!("{}", table(&args, &kinds, &jobs, &results, &memory));
    eprintln!("bench: fio JSON in {}", out.display());
    Ok(())
}

/// How often the controller's memory is sampled during a job: often enough to catch a peak that lasts a
/// fraction of a second, rarely enough (10 reads of a small procfs file per second) to cost nothing measurable.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A process's memory during one job, in KiB as /proc reports it.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    /// The highest VmRSS sampled while the job ran.
    rss_max_kib: u64,
    /// VmHWM (peak resident set since the process started) when the job ended.
    hwm_kib: u64,
}

/// Samples `/proc/PID/status` on a thread until [`RssSampler::finish`].
struct RssSampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                max = max.max(status_kib(pid, "VmRSS:").unwrap_or(0));
                std::thread::sleep(RSS_SAMPLE_EVERY);
            }
            max
        });
        RssSampler { pid, stop, thread }
    }

    fn finish(self) -> Memory {
        self.stop.store(true, Ordering::Relaxed);
        let rss_max_kib = self.thread.join().unwrap_or(0);
        Memory {
            rss_max_kib,
            hwm_kib: status_kib(self.pid, "VmHWM:").unwrap_or(0),
        }
    }
}

/// One `Vm*:` field of `/proc/PID/status` in KiB; `None` if the process is gone or the field is missing.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&status, field)
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Mean of each figure over rounds.
fn mean(runs: &[Direction]) -> Direction {
    let n = runs.len().max(1) as f64;
    let avg_dur = |f: fn(&Direction) -> Duration| {
        Duration::from_secs_f64(runs.iter().map(|d| f(d).as_secs_f64()).sum::<f64>() / n)
    };
    Direction {
        io_bytes: runs.iter().map(|d| d.io_bytes).sum::<u64>() / runs.len().max(1) as u64,
        iops: runs.iter().map(|d| d.iops).sum::<f64>() / n,
        bytes_per_sec: runs.iter().map(|d| d.bytes_per_sec).sum::<f64>() / n,
        mean_latency: avg_dur(|d| d.mean_latency),
        p99_latency: avg_dur(|d| d.p99_latency),
    }
}

/// A Markdown table, ready for benches/README.md.
fn table(
    args: &Args,
    kinds: &[TargetKind],
    jobs: &[&Job],
    results: &[Vec<Vec<Direction>>],
    memory: &[Vec<Vec<Memory>>],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} round(s), {} s per job (+{} s ramp), {} MiB LUNs; ratio = IOPS / {}'s IOPS\n",
        args.rounds, args.runtime, args.ramp, args.size_mib, kinds[0]
    );
    let _ = writeln!(
        s,
        "| job | target | IOPS | MiB/s | mean lat | p99 lat | ratio | controller VmRSS max / VmHWM |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|");
    for (j, job) in jobs.iter().enumerate() {
        let baseline = mean(&results[j][0]);
        for (t, kind) in kinds.iter().enumerate() {
            let d = mean(&results[j][t]);
            let ratio = if baseline.iops > 0.0 {
                d.iops / baseline.iops
            } else {
                f64::NAN
            };
            // Memory is a peak, so the worst round is reported, not the mean.
            let mem = memory[j][t].iter().fold(None, |acc: Option<Memory>, m| {
                let a = acc.unwrap_or_default();
                Some(Memory {
                    rss_max_kib: a.rss_max_kib.max(m.rss_max_kib),
                    hwm_kib: a.hwm_kib.max(m.hwm_kib),
                })
            });
            let mem = mem.map_or_else(
                || "-".to_string(),
                |m| {
                    format!(
                        "{:.1} / {:.1} MiB",
                        m.rss_max_kib as f64 / 1024.0,
                        m.hwm_kib as f64 / 1024.0
                    )
                },
            );
            let _ = writeln!(
                s,
                "| {} | {kind} | {:.0} | {:.1} | {} | {} | {:.2} | {mem} |",
                job.name,
                d.iops,
                d.bytes_per_sec / f64::from(1u32 << 20),
                latency(d.mean_latency),
                latency(d.p99_latency),
                ratio
            );
        }
    }
    s
}

fn latency(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    }
}
