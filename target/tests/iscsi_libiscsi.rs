//! The transport against a real initiator: libiscsi's command-line tools
//! (`apt-get install libiscsi-bin`, done by `tests/setup.sh`). A missing tool
//! is a test failure with instructions, never a skip.

mod iscsi_support;

use std::process::Output;
use std::time::Duration;

use basalt_target::iscsi::{
    target_iqn, AuthPolicy, ChapCredentials, ChapSecret, PortalConfig, Target, TargetConfig,
};
use iscsi_support::*;

/// Run a libiscsi tool off the async runtime (the portal runs on it).
async fn run_tool(tool: &str, args: Vec<String>) -> Output {
    let tool_name = tool.to_string();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || std::process::Command::new(&tool_name).args(&args).output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{tool} did not finish within 120 s"))
    .expect("tool thread");
    match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed: run tests/setup.sh libiscsi-bin (or apt-get install libiscsi-bin) \
             to get libiscsi's initiator tools"
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn file_portal(dir: &tempfile::TempDir, name: &str) -> TestPortal {
    start_portal(
        PortalConfig::default(),
        vec![target_with(name, file_lu(dir, 64 << 20))],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_ls_discovers_the_target_and_its_lun() {
    let dir = tempfile::tempdir().unwrap();
    let tp = file_portal(&dir, "ls").await;
    let out = run_tool("iscsi-ls", vec!["-s".into(), format!("iscsi://{}", tp.addr)]).await;
    let printed = text(&out);
    assert!(out.status.success(), "iscsi-ls failed: {printed}");
    assert!(
        printed.contains(&format!("Target:{} Portal:{},1", target_iqn("ls"), tp.addr)),
        "{printed}"
    );
    assert!(
        printed.contains("Lun:0") && printed.contains("DIRECT_ACCESS"),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_inq_reads_inquiry_through_a_normal_session() {
    let dir = tempfile::tempdir().unwrap();
    let tp = file_portal(&dir, "inq").await;
    let url = format!("iscsi://{}/{}/0", tp.addr, target_iqn("inq"));
    let out = run_tool("iscsi-inq", vec![url]).await;
    let printed = text(&out);
    assert!(out.status.success(), "iscsi-inq failed: {printed}");
    assert!(printed.contains("Vendor:BASALT"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libiscsi_chap_login_succeeds_with_the_secret_and_fails_without() {
    let dir = tempfile::tempdir().unwrap();
    let creds = ChapCredentials::new("alice", ChapSecret::new("alice-secret-123")).unwrap();
    let target = Target::new(TargetConfig {
        auth: AuthPolicy::chap(creds, None).unwrap(),
        ..TargetConfig::new(target_iqn("chap"), file_lu(&dir, 1 << 20))
    })
    .unwrap();
    let tp = start_portal(PortalConfig::default(), vec![target]).await;
    let good = format!(
        "iscsi://alice%alice-secret-123@{}/{}/0",
        tp.addr,
        target_iqn("chap")
    );
    let out = run_tool("iscsi-inq", vec![good]).await;
    assert!(
        out.status.success(),
        "CHAP login with the right secret failed: {}",
        text(&out)
    );
    let bad = format!(
        "iscsi://alice%wrong-secret-00@{}/{}/0",
        tp.addr,
        target_iqn("chap")
    );
    let out = run_tool("iscsi-inq", vec![bad]).await;
    assert!(
        !out.status.success(),
        "CHAP login with a wrong secret succeeded: {}",
        text(&out)
    );
    let none = format!("iscsi://{}/{}/0", tp.addr, target_iqn("chap"));
    let out = run_tool("iscsi-inq", vec![none]).await;
    assert!(
        !out.status.success(),
        "login without CHAP succeeded on a CHAP target"
    );
}

/// Parse CUnit's "tests  total ran passed failed inactive" summary row.
fn cunit_failures(printed: &str) -> (u32, u32) {
    let row = printed
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .unwrap_or_else(|| panic!("no CUnit summary in iscsi-test-cu output:\n{printed}"));
    let n: Vec<u32> = row
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[2], n[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libiscsi_conformance_suites_for_the_transport_pass() {
    let dir = tempfile::tempdir().unwrap();
    let tp = file_portal(&dir, "cu").await;
    let url = format!("iscsi://{}/{}/0", tp.addr, target_iqn("cu"));
    // The iSCSI-level suites (CmdSN window, DataSN checks, read residuals,
    // task management) plus the basic read/write command suites. The write
    // residual suites test the command set's handling of EDTL != CDB length,
    // which is not the transport's.
    for suite in [
        "iSCSI.iSCSIcmdsn",
        "iSCSI.iSCSIdatasn",
        "iSCSI.iSCSIResiduals.Read10Invalid",
        "iSCSI.iSCSIResiduals.Read10Residuals",
        "iSCSI.iSCSIResiduals.Read16Residuals",
        "iSCSI.iSCSITMF",
        "SCSI.Read10",
        "SCSI.Write10",
        "SCSI.TestUnitReady",
    ] {
        let out = run_tool(
            "iscsi-test-cu",
            vec!["--dataloss".into(), "-t".into(), suite.into(), url.clone()],
        )
        .await;
        let printed = text(&out);
        let (passed, failed) = cunit_failures(&printed);
        assert!(
            passed > 0 && failed == 0,
            "{suite}: {failed} failed, {passed} passed:\n{printed}"
        );
    }
    // Every session logged out or was dropped.
    wait_for_sessions("after the test suites", || tp.portal.session_count(), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_initiators_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let lu = file_lu(&dir, 16 << 20);
    let tp = start_portal(PortalConfig::default(), vec![target_with("many", lu)]).await;
    let url = format!("iscsi://{}/{}/0", tp.addr, target_iqn("many"));
    let runs: Vec<_> = (0..8)
        .map(|_| tokio::spawn(run_tool("iscsi-inq", vec![url.clone()])))
        .collect();
    for r in runs {
        let out = r.await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
}
