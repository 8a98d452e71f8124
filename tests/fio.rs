//! fio as the initiator (libiscsi engine): random 4 KiB writes at queue depth 32 with a crc32c in every
//! block, read back and verified; then the target restarts and everything is verified again.

use basalt_tests::fio::{Extent, FioJob, Pattern, Verify};
use basalt_tests::{fio_libiscsi, ByteSize, Lun, TargetKind};

const LUN_SIZE: ByteSize = ByteSize::mib(64);
/// Half the LUN: enough for 8192 random 4 KiB writes, small enough to take a few seconds in a debug build.
const WRITTEN: ByteSize = ByteSize::mib(32);

fn job(verify: Verify) -> FioJob {
    FioJob {
        name: format!("randwrite-verify-{verify:?}").to_lowercase(),
        pattern: Pattern::RandWrite,
        block_size: ByteSize::kib(4),
        iodepth: 32,
        extent: Extent::Bytes(WRITTEN),
        verify,
    }
}

fn random_writes_verify_before_and_after_restart(kind: TargetKind) -> anyhow::Result<()> {
    let fio = fio_libiscsi()?;
    let mut lun = Lun::start(kind, LUN_SIZE)?;

    let first = job(Verify::WriteThenVerify).run(&fio, lun.url(), lun.scratch_dir())?;
    assert_eq!(
        first.error,
        0,
        "fio reported error {} against {}",
        first.error,
        lun.url()
    );
    assert_eq!(first.write.io_bytes, WRITTEN.bytes(), "fio wrote everything");
    assert_eq!(
        first.read.io_bytes,
        WRITTEN.bytes(),
        "fio read back and verified everything"
    );

    lun.restart()?;
    let again = job(Verify::VerifyOnly).run(&fio, lun.url(), lun.scratch_dir())?;
    assert_eq!(
        again.error, 0,
        "verification after restart failed: error {}",
        again.error
    );
    assert_eq!(
        again.read.io_bytes,
        WRITTEN.bytes(),
        "everything was verified after the restart"
    );
    lun.check_running()?;
    Ok(())
}

#[test]
fn fio_random_writes_verify_on_basalt_before_and_after_restart() -> anyhow::Result<()> {
    random_writes_verify_before_and_after_restart(TargetKind::BasaltServeFile)
}

#[test]
fn fio_random_writes_verify_on_tgt_before_and_after_restart() -> anyhow::Result<()> {
    random_writes_verify_before_and_after_restart(TargetKind::Tgt)
}
