//! Running libiscsi's conformance suite (`iscsi-test-cu`) and reading its CUnit report.
//!
//! `iscsi-test-cu` prints, in its default verbose mode:
//!
//! ```text
//! Suite: WriteSame10
//!   Test: Simple ...passed
//!   Test: Unmap ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
//! passed
//!   Test: Read16Residuals ...FAILED
//!     1. test_read16_residuals.c:229  - CU_ASSERT_EQUAL(task->residual_status,SCSI_RESIDUAL_OVERFLOW)
//! Run Summary:    Type  Total    Ran Passed Failed Inactive
//!                suites    134    134    n/a      0        0
//!                 tests    615    615    598     17        0
//! ```
//!
//! CUnit itself has no "skipped": a libiscsi test that finds a feature absent logs `[SKIPPED]` and passes. We
//! count those separately, because "passed" should mean "the target did the thing". Lines like
//! `[FAILED] WRITESAME10 command failed ...` are libiscsi's own logs inside a test that may still pass; only the
//! CUnit status word decides. The parsed counts are cross-checked against CUnit's "Run Summary" so that a
//! change in the output format fails loudly instead of miscounting.
//!
//! The run has a deadline: a target that stops answering would otherwise hang the suite forever (tgt does,
//! with thin provisioning on). Output is line-buffered (`stdbuf -oL`) so the report names the test that hung.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{require_tool, Daemon, HarnessError, IscsiUrl, Result, StopPolicy};

/// How one CUnit test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Passed,
    /// Passed without exercising anything: the target lacks the feature (`[SKIPPED]` in the log).
    Skipped,
    Failed,
    /// Started but never reported a status: the run hit its deadline or iscsi-test-cu died.
    DidNotFinish,
}

/// One test of the suite, `Suite.Test` (CUnit's suite names repeat across libiscsi's families).
#[derive(Clone, Debug)]
pub struct CunitTest {
    pub suite: String,
    pub name: String,
    pub outcome: Outcome,
    /// What the test printed (skip reasons, failed assertions).
    pub detail: String,
}

/// CUnit's own "tests" summary row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub ran: usize,
    pub passed: usize,
    pub failed: usize,
}

/// Counts per outcome, for assertions and the side-by-side table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ran: usize,
    pub passed: usize,
    pub skipped: usize,
    pub failed: usize,
    pub did_not_finish: usize,
}

/// The parsed result of one `iscsi-test-cu` run.
#[derive(Clone, Debug, Default)]
pub struct CunitReport {
    pub tests: Vec<CunitTest>,
    pub summary: Option<RunSummary>,
}

impl CunitReport {
    /// Parses `iscsi-test-cu`'s verbose output (see the module doc).
    pub fn parse(output: &str) -> Result<CunitReport> {
        let mut report = CunitReport::default();
        let mut suite = String::new();
        let mut current: Option<(String, String)> = None; // (name, body)
        let mut in_summary = false;
        for line in output.lines() {
            let trimmed = line.trim();
            if in_summary {
                let cols: Vec<&str> = trimmed.split_whitespace().collect();
                if cols.first() == Some(&"tests") {
                    let num = |i: usize| -> Result<usize> {
                        cols.get(i)
                            .and_then(|c| c.parse().ok())
                            .ok_or_else(|| HarnessError::Parse {
                                what: "iscsi-test-cu".into(),
                                detail: format!("unexpected CUnit summary row `{trimmed}`"),
                            })
                    };
                    report.summary = Some(RunSummary {
                        ran: num(2)?,
                        passed: num(3)?,
                        failed: num(4)?,
                    });
                }
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("Suite: ") {
                report.finish(&suite, current.take());
                suite = rest.trim().to_string();
            } else if let Some(rest) = trimmed.strip_prefix("Test: ") {
                report.finish(&suite, current.take());
                let (name, tail) = rest.split_once(" ...").unwrap_or((rest, ""));
                current = Some((name.trim().to_string(), format!("{tail}\n")));
            } else if trimmed.starts_with("Run Summary:") {
                report.finish(&suite, current.take());
                in_summary = true;
            } else if let Some((_, body)) = current.as_mut() {
                body.push_str(line);
                body.push('\n');
            }
        }
        report.finish(&suite, current.take());
        report.cross_check()?;
        Ok(report)
    }

    fn finish(&mut self, suite: &str, test: Option<(String, String)>) {
        let Some((name, body)) = test else { return };
        let status = body.lines().map(str::trim).find_map(|l| {
            // The status word starts a line (or the text after "..."), possibly followed by output that the
            // next suite's setup printed without a line break; or it ends a line that the test's own output
            // left unterminated. Lines starting with '[' are libiscsi's logs.
            if l.starts_with("passed") {
                Some(Outcome::Passed)
            } else if l.starts_with("FAILED") {
                Some(Outcome::Failed)
            } else if l.starts_with('[') {
                None
            } else if l.ends_with("passed") {
                Some(Outcome::Passed)
            } else if l.ends_with("FAILED") {
                Some(Outcome::Failed)
            } else {
                None
            }
        });
        let outcome = match status {
            Some(Outcome::Passed) if body.contains("[SKIPPED]") => Outcome::Skipped,
            Some(outcome) => outcome,
            None => Outcome::DidNotFinish,
        };
        self.tests.push(CunitTest {
            suite: suite.into(),
            name,
            outcome,
            detail: body.trim().to_string(),
        });
    }

    /// Our counts must agree with CUnit's summary; otherwise the output format changed under us.
    fn cross_check(&self) -> Result<()> {
        let counts = self.counts();
        if let Some(summary) = self.summary {
            let ours = RunSummary {
                ran: counts.ran - counts.did_not_finish,
                passed: counts.passed + counts.skipped,
                failed: counts.failed,
            };
            if ours != summary {
                return Err(HarnessError::Parse {
                    what: "iscsi-test-cu".into(),
                    detail: format!("parsed {ours:?} but CUnit's summary says {summary:?}"),
                });
            }
        }
        if self.tests.is_empty() {
            return Err(HarnessError::Parse {
                what: "iscsi-test-cu".into(),
                detail: "no test ran (could it log in to the target?)".into(),
            });
        }
        Ok(())
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            ran: self.tests.len(),
            ..Counts::default()
        };
        for t in &self.tests {
            match t.outcome {
                Outcome::Passed => c.passed += 1,
                Outcome::Skipped => c.skipped += 1,
                Outcome::Failed => c.failed += 1,
                Outcome::DidNotFinish => c.did_not_finish += 1,
            }
        }
        c
    }

    /// Tests that failed or did not finish, as `Suite.Test` followed by what they printed.
    pub fn failures(&self) -> Vec<String> {
        self.tests
            .iter()
            .filter(|t| matches!(t.outcome, Outcome::Failed | Outcome::DidNotFinish))
            .map(|t| format!("{}.{} ({:?}):\n{}", t.suite, t.name, t.outcome, t.detail))
            .collect()
    }
}

/// Runs `iscsi-test-cu --dataloss` (destructive tests allowed: the LUN is scratch) against `url`, optionally
/// only the tests matching `filter` (`FAMILY[.SUITE[.TEST]]`), and kills it after `deadline`.
///
/// We run in CUnit's "ignore errors" mode rather than `-A` (abort on first failure): one run then lists every
/// failing test, which is what a developer fixing the target needs; the caller asserts on the counts.
pub fn run_iscsi_test_cu(
    url: &IscsiUrl,
    filter: Option<&str>,
    log_dir: &Path,
    deadline: Duration,
) -> Result<CunitReport> {
    require_tool("iscsi-test-cu")?;
    require_tool("stdbuf")?;
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "-eL", "iscsi-test-cu", "--dataloss"]);
    if let Some(filter) = filter {
        cmd.args(["-t", filter]);
    }
    cmd.arg(url.to_string());
    let mut run = Daemon::spawn("iscsi-test-cu", cmd, log_dir, StopPolicy::Kill)?;
    let finished = run.wait_for_exit(deadline)?;
    let output = run.log();
    drop(run);
    let report = CunitReport::parse(&output)?;
    if finished.is_none() && report.counts().did_not_finish == 0 {
        // Hung between tests (e.g. at login): still a failure, and parse found nothing to blame.
        return Err(HarnessError::Timeout {
            what: format!("iscsi-test-cu against {url}"),
            waited: deadline,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\n\n     CUnit - A unit testing framework for C - Version 2.1-3\n\n\
Suite: WriteSame10\n\
  Test: Simple ...passed\n\
  Test: Unmap ...    [SKIPPED] Logical unit is fully provisioned. Skipping test\n\
passed\n\
  Test: UnmapVPD ...    [FAILED] WRITESAME10 command failed with status 2 / sense key ILLEGAL_REQUEST(0x05)\n\
passed\n\
Suite: iSCSITMF\n\
  Test: LUNReset ...passed    [FAILED] PRIN command: failed with sense. SENSE KEY:UNIT_ATTENTION(6)\n\
Suite: iSCSIResiduals\n\
  Test: Read16Residuals ...FAILED\n\
    1. test_read16_residuals.c:229  - CU_ASSERT_EQUAL(task->residual_status,SCSI_RESIDUAL_OVERFLOW)\n\
  Test: Read10Residuals ...    [SKIPPED] no\n\
FAILED\n\
    1. x.c:1 - y\n\
\n\
Run Summary:    Type  Total    Ran Passed Failed Inactive\n\
              suites      3      3    n/a      0        0\n\
               tests      6      6      4      2        0\n\
             asserts   3086   3086   3084      2      n/a\n";

    #[test]
    fn skipped_tests_are_counted_apart_from_passes_and_logged_failures_do_not_fail_a_test() {
        // UnmapVPD logs "[FAILED] ..." but passes; LUNReset's status is followed on the same line by the next
        // suite's setup output.
        let report = CunitReport::parse(SAMPLE).unwrap();
        let c = report.counts();
        assert_eq!(
            (c.ran, c.passed, c.skipped, c.failed, c.did_not_finish),
            (6, 3, 1, 2, 0)
        );
        let unmap_vpd = report.tests.iter().find(|t| t.name == "UnmapVPD").unwrap();
        assert_eq!(unmap_vpd.outcome, Outcome::Passed);
    }

    #[test]
    fn failures_name_suite_test_and_assertion() {
        let report = CunitReport::parse(SAMPLE).unwrap();
        let failures = report.failures();
        assert_eq!(failures.len(), 2);
        assert!(
            failures[0].starts_with("iSCSIResiduals.Read16Residuals (Failed)"),
            "{}",
            failures[0]
        );
        assert!(failures[0].contains("test_read16_residuals.c:229"));
    }

    #[test]
    fn a_summary_that_disagrees_with_the_parsed_tests_is_an_error() {
        let tampered = SAMPLE.replace(
            "tests      6      6      4      2",
            "tests      7      7      5      2",
        );
        let err = CunitReport::parse(&tampered).unwrap_err();
        assert!(err.to_string().contains("CUnit's summary"), "{err}");
    }

    #[test]
    fn a_run_cut_off_mid_test_reports_that_test_as_unfinished() {
        let cut = "Suite: CompareAndWrite\n  Test: Simple ...passed\n  Test: InvalidDataOutSize ...";
        let report = CunitReport::parse(cut).unwrap();
        assert_eq!(report.counts().did_not_finish, 1);
        assert!(report.failures()[0].starts_with("CompareAndWrite.InvalidDataOutSize (DidNotFinish)"));
    }

    #[test]
    fn output_without_tests_is_an_error() {
        let err = CunitReport::parse("iscsi_connect failed. Connection refused\n").unwrap_err();
        assert!(err.to_string().contains("no test ran"), "{err}");
    }
}
