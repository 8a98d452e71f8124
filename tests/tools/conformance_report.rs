//! `conformance-report`: libiscsi's full conformance suite against several targets, counts side by side.
//!
//! Each target serves a fresh 64 MiB sparse file (the fixtures of the end-to-end tests); the suite runs with
//! destructive tests allowed. Prints a Markdown table of run / passed / skipped / failed per target, then the
//! failing tests of each. Run it through tests/tools/conformance.sh.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use basalt_tests::cunit::{run_iscsi_test_cu, CunitReport};
use basalt_tests::{ByteSize, Lun, TargetKind};
use clap::Parser;

/// Run iscsi-test-cu against each target and print the counts side by side.
#[derive(Parser, Debug)]
struct Args {
    /// Targets, comma-separated. Known: tgt, basalt.
    #[arg(long, default_value = "basalt,tgt", value_delimiter = ',')]
    targets: Vec<String>,
    /// Only tests matching this libiscsi filter, FAMILY[.SUITE[.TEST]] (default: all).
    #[arg(long)]
    filter: Option<String>,
    /// Give up on a target after this many seconds (a hung target must not hang the report).
    #[arg(long, default_value_t = 900)]
    deadline: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut reports: Vec<(TargetKind, String, CunitReport)> = Vec::new();
    for name in &args.targets {
        let kind = TargetKind::from_name(name).with_context(|| format!("unknown target {name:?}"))?;
        let lun = Lun::start(kind, ByteSize::mib(64))?;
        eprintln!(
            "conformance: running iscsi-test-cu against {kind} at {}",
            lun.url()
        );
        let report = run_iscsi_test_cu(
            lun.url(),
            args.filter.as_deref(),
            lun.scratch_dir(),
            Duration::from_secs(args.deadline),
        )
        .with_context(|| format!("iscsi-test-cu against {kind}"))?;
        reports.push((kind, lun.url().to_string(), report));
    }

    let mut s = String::new();
    let _ = writeln!(
        s,
        "| target | tests run | passed | skipped | failed | did not finish |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for (kind, _, report) in &reports {
        let c = report.counts();
        let _ = writeln!(
            s,
            "| {kind} | {} | {} | {} | {} | {} |",
            c.ran, c.passed, c.skipped, c.failed, c.did_not_finish
        );
    }
    for (kind, url, report) in &reports {
        let failures: Vec<String> = report
            .failures()
            .iter()
            .map(|f| {
                f.lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches(':')
                    .to_string()
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(s, "\n{kind} ({url}) failed:\n  {}", failures.join("\n  "));
        }
    }
    print!("{s}");
    Ok(())
}
