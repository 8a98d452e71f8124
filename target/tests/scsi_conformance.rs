//! The command set against libiscsi's conformance suite (`iscsi-test-cu`,
//! from `apt-get install libiscsi-bin`): every test of the SCSI family, with
//! `--dataloss`, over the real iSCSI portal and a thin file-backed LUN, must
//! pass. A missing tool is a failure with instructions, never a skip.
//!
//! Run it alone to see libiscsi's report:
//! `cargo test -p basalt-target --test scsi_conformance -- --nocapture`;
//! `BASALT_TEST_CU_FILTER=ALL` runs the whole suite, transport tests included
//! (any `iscsi-test-cu -t` pattern works).

mod iscsi_support;

use std::time::Duration;

use basalt_target::iscsi::{target_iqn, PortalConfig};
use iscsi_support::*;

/// 256 MiB: large enough for every test's I/O pattern (65536-block writes,
/// 256-block UNMAPs at both ends), small enough to be sparse and fast.
const LUN_BYTES: u64 = 256 << 20;

/// Parse "tests  615  615  579  36  0" from CUnit's run summary.
fn summary(report: &str) -> Option<(u32, u32, u32)> {
    let line = report.lines().find(|l| l.trim_start().starts_with("tests"))?;
    let n: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((*n.get(1)?, *n.get(2)?, *n.get(3)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libiscsi_scsi_family_passes_with_zero_failures_on_a_thin_file_lun() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("conformance", file_lu(&dir, LUN_BYTES))],
    )
    .await;
    let filter = std::env::var("BASALT_TEST_CU_FILTER").unwrap_or_else(|_| "SCSI".into());
    let url = format!("iscsi://{}/{}/0", tp.addr, target_iqn("conformance"));
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("iscsi-test-cu")
            .args(["--dataloss", "-n", "-t", &filter, &url])
            .output()
    });
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("iscsi-test-cu did not finish within 10 minutes")
        .expect("tool thread");
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("iscsi-test-cu is not installed: apt-get install -y libiscsi-bin")
        }
        Err(e) => panic!("cannot run iscsi-test-cu: {e}"),
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    let (ran, passed, failed) = summary(&report).unwrap_or_else(|| panic!("no CUnit summary in:\n{report}"));
    let failures: Vec<&str> = report.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(
        failed,
        0,
        "{failed} of {ran} libiscsi tests failed:\n{}",
        failures.join("\n")
    );
    assert_eq!(ran, passed);
    // The SCSI family has 215 tests in libiscsi 1.19; a much smaller count
    // means iscsi-test-cu could not reach the LUN for most of them.
    assert!(ran >= 200, "only {ran} tests ran");
}
