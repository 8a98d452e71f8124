//! SCSI/iSCSI conformance: libiscsi's `iscsi-test-cu` suite against a file-backed thin LUN.
//!
//! Basalt must pass every test it runs (skips, for features it does not offer, are allowed and counted).
//! tgt does not pass the full suite (see benches/README.md for its numbers, from tests/tools/conformance.sh),
//! so against tgt we run a subset it passes: that proves the runner and the report parser end to end.

use std::time::Duration;

use basalt_tests::cunit::run_iscsi_test_cu;
use basalt_tests::{ByteSize, Lun, TargetKind};

/// The suite's destructive tests write all over the LUN; 64 MiB keeps the whole run short.
const LUN_SIZE: ByteSize = ByteSize::mib(64);

/// A full run takes about a minute against tgt; a target that stops answering must not hang CI.
const FULL_SUITE_DEADLINE: Duration = Duration::from_secs(15 * 60);

#[test]
fn libiscsi_conformance_suite_passes_against_basalt() -> anyhow::Result<()> {
    let lun = Lun::start(TargetKind::BasaltServeFile, LUN_SIZE)?;
    let report = run_iscsi_test_cu(lun.url(), None, lun.scratch_dir(), FULL_SUITE_DEADLINE)?;
    let c = report.counts();
    println!("basalt conformance: {c:?}");
    assert!(
        c.failed == 0 && c.did_not_finish == 0,
        "{} of {} conformance tests failed against {}:\n{}\n--- target log ---\n{}",
        c.failed + c.did_not_finish,
        c.ran,
        lun.url(),
        report.failures().join("\n"),
        lun.server_log()
    );
    assert!(c.passed > c.ran / 2, "most tests were skipped: {c:?}");
    Ok(())
}

#[test]
fn conformance_runner_reports_a_clean_subset_against_tgt() -> anyhow::Result<()> {
    let lun = Lun::start(TargetKind::Tgt, LUN_SIZE)?;
    let report = run_iscsi_test_cu(
        lun.url(),
        Some("SCSI.Read10"),
        lun.scratch_dir(),
        Duration::from_secs(120),
    )?;
    let c = report.counts();
    assert!(c.ran >= 5, "SCSI.Read10 has at least five tests, ran {c:?}");
    assert_eq!(c.failed + c.did_not_finish, 0, "{}", report.failures().join("\n"));
    assert!(
        report.tests.iter().all(|t| t.suite == "Read10"),
        "the filter selects only Read10"
    );
    Ok(())
}
