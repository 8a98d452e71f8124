//! fio jobs over the libiscsi engine, and what we read back from fio's JSON.
//!
//! fio talks to the LUN directly as an iSCSI initiator (`--ioengine=libiscsi`), so the numbers and the
//! verification cover the target alone: no kernel initiator, no block layer, no page cache in between.
//!
//! Latency figures are fio's *completion* latency (`clat`: submission to completion); the mean and the 99th
//! percentile are taken from the same distribution so they can be compared.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{io, run_checked, ByteSize, HarnessError, IscsiUrl, Result};

/// The I/O pattern of a job (fio's `--rw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandWrite,
    RandRead,
    SeqWrite,
    SeqRead,
}

impl Pattern {
    fn fio_rw(self) -> &'static str {
        match self {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "write",
            Pattern::SeqRead => "read",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
}

/// How long a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Until `size` bytes have been done once (verification jobs).
    Bytes(ByteSize),
    /// For a fixed time over the whole LUN, after `ramp` unmeasured time (benchmarks).
    Time { runtime: Duration, ramp: Duration },
}

/// Whether and how the job checks data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    None,
    /// Write with a crc32c header in every block, then read everything back and check it.
    WriteThenVerify,
    /// Only read back and check what an identical earlier `WriteThenVerify` job wrote (same seed), e.g. after
    /// the target restarted.
    VerifyOnly,
}

/// One fio job against one LUN.
#[derive(Clone, Debug)]
pub struct FioJob {
    pub name: String,
    pub pattern: Pattern,
    pub block_size: ByteSize,
    pub iodepth: u32,
    pub extent: Extent,
    pub verify: Verify,
}

impl FioJob {
    /// fio's arguments for this job against `url`.
    pub fn args(&self, url: &IscsiUrl) -> Vec<String> {
        let mut args = vec![
            format!("--name={}", self.name),
            "--ioengine=libiscsi".into(),
            format!("--filename={}", url.fio_filename()),
            format!("--rw={}", self.pattern.fio_rw()),
            format!("--bs={}", self.block_size.bytes()),
            format!("--iodepth={}", self.iodepth),
            "--output-format=json".into(),
        ];
        match self.extent {
            Extent::Bytes(size) => args.push(format!("--size={}", size.bytes())),
            Extent::Time { runtime, ramp } => {
                args.push("--time_based=1".into());
                args.push(format!("--runtime={}ms", runtime.as_millis()));
                args.push(format!("--ramp_time={}ms", ramp.as_millis()));
                // Random jobs need not visit every block once; tracking that costs CPU we want to measure.
                args.push("--norandommap=1".into());
                args.push("--randrepeat=0".into());
            }
        }
        match self.verify {
            Verify::None => {}
            Verify::WriteThenVerify | Verify::VerifyOnly => {
                // A fixed seed makes the written pattern reproducible for a later VerifyOnly pass.
                args.extend(
                    [
                        "--verify=crc32c",
                        "--do_verify=1",
                        "--verify_fatal=1",
                        "--randseed=20261121",
                    ]
                    .map(String::from),
                );
                if self.verify == Verify::VerifyOnly {
                    args.push("--verify_only=1".into());
                }
            }
        }
        args
    }

    /// Runs the job with `fio` and returns its parsed result; fio's JSON is also kept in `log_dir`.
    pub fn run(&self, fio: &Path, url: &IscsiUrl, log_dir: &Path) -> Result<FioResult> {
        let mut cmd = Command::new(fio);
        // fio saves verify state files into its working directory: keep them with the logs.
        cmd.args(self.args(url)).current_dir(log_dir);
        let out = run_checked(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json_path = log_dir.join(format!("fio-{}.json", self.name));
        std::fs::write(&json_path, text.as_bytes()).map_err(io(format!("write {}", json_path.display())))?;
        FioResult::parse(&text)
    }
}

/// Throughput and latency of one direction (read or write) of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Direction {
    pub io_bytes: u64,
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub mean_latency: Duration,
    pub p99_latency: Duration,
}

/// What fio reported for one job.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FioResult {
    /// fio's per-job error code (an errno; 0 when every I/O and every verification succeeded).
    pub error: i64,
    pub read: Direction,
    pub write: Direction,
}

impl FioResult {
    /// Parses `--output-format=json` output. fio may print notes before the JSON document.
    pub fn parse(text: &str) -> Result<FioResult> {
        let bad = |detail: String| HarnessError::Parse {
            what: "fio's JSON output".into(),
            detail,
        };
        let start = text
            .find("\n{")
            .map(|i| i + 1)
            .or_else(|| text.starts_with('{').then_some(0));
        let start = start.ok_or_else(|| bad(format!("no JSON document in:\n{text}")))?;
        let doc: Value = serde_json::from_str(&text[start..]).map_err(|e| bad(e.to_string()))?;
        let job = doc.pointer("/jobs/0").ok_or_else(|| bad("no jobs[0]".into()))?;
        let direction = |key: &str| -> Result<Direction> {
            let d = job.get(key).ok_or_else(|| bad(format!("no `{key}` section")))?;
            let num = |ptr: &str| d.pointer(ptr).and_then(Value::as_f64);
            let ns = |ptr: &str| Duration::from_nanos(num(ptr).unwrap_or(0.0) as u64);
            Ok(Direction {
                io_bytes: num("/io_bytes").ok_or_else(|| bad(format!("no {key}.io_bytes")))? as u64,
                iops: num("/iops").unwrap_or(0.0),
                bytes_per_sec: num("/bw_bytes").unwrap_or(0.0),
                mean_latency: ns("/clat_ns/mean"),
                p99_latency: ns("/clat_ns/percentile/99.000000"),
            })
        };
        Ok(FioResult {
            error: job
                .get("error")
                .and_then(Value::as_i64)
                .ok_or_else(|| bad("no job error field".into()))?,
            read: direction("read")?,
            write: direction("write")?,
        })
    }

    /// The direction a job of `pattern` measures.
    pub fn measured(&self, pattern: Pattern) -> &Direction {
        if pattern.is_write() {
            &self.write
        } else {
            &self.read
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn url() -> IscsiUrl {
        IscsiUrl {
            portal: "127.0.0.1:3260".parse::<SocketAddr>().unwrap(),
            iqn: "iqn.x:y".into(),
            lun: 0,
        }
    }

    #[test]
    fn filename_escapes_every_colon_for_fio() {
        let job = FioJob {
            name: "j".into(),
            pattern: Pattern::RandWrite,
            block_size: ByteSize::mib(1),
            iodepth: 8,
            extent: Extent::Bytes(ByteSize::mib(4)),
            verify: Verify::VerifyOnly,
        };
        let args = job.args(&url());
        assert!(
            args.contains(&"--filename=iscsi\\://127.0.0.1\\:3260/iqn.x\\:y/0".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--verify_only=1".to_string()));
        assert!(args.contains(&"--bs=1048576".to_string()));
    }

    #[test]
    fn json_after_a_note_is_parsed_with_clat_mean_and_p99() {
        let text =
            "note: both iodepth >= 1 and synchronous I/O engine are selected\n{\"jobs\":[{\"error\":0,\
            \"read\":{\"io_bytes\":0,\"iops\":0,\"bw_bytes\":0},\
            \"write\":{\"io_bytes\":4096,\"iops\":1000.5,\"bw_bytes\":4098048,\
            \"clat_ns\":{\"mean\":1500.0,\"percentile\":{\"99.000000\":3000}}}}]}";
        let r = FioResult::parse(text).unwrap();
        assert_eq!(r.error, 0);
        assert_eq!(r.write.io_bytes, 4096);
        assert_eq!(
            r.measured(Pattern::SeqWrite).p99_latency,
            Duration::from_nanos(3000)
        );
        assert_eq!(r.write.mean_latency, Duration::from_nanos(1500));
    }

    #[test]
    fn output_without_json_is_an_error() {
        assert!(FioResult::parse("fio: engine libiscsi not loadable\n").is_err());
    }
}
