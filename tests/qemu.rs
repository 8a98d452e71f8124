//! qemu's iSCSI block driver as the initiator: `qemu-img convert` an image into the LUN and back out, and
//! get the same bytes.

use std::process::Command;

use basalt_tests::{random_bytes, read_file, run_checked, ByteSize, Lun, TargetKind};

/// The LUN is larger than the image so that the part the image does not cover is checked too (still zero).
const LUN_SIZE: ByteSize = ByteSize::mib(16);
const IMAGE_SIZE: usize = 6 << 20;

fn image_round_trips_byte_identical(kind: TargetKind) -> anyhow::Result<()> {
    let lun = Lun::start(kind, LUN_SIZE)?;
    let dir = lun.scratch_dir();

    // Random data with a 1 MiB hole and a 4 KiB-unaligned tail: qemu turns zeros into WRITE SAME/UNMAP or
    // skips them, so both data and zero paths of the target are exercised.
    let mut raw = random_bytes(IMAGE_SIZE - 1536);
    raw[2 << 20..3 << 20].fill(0);
    let src_raw = dir.join("src.raw");
    std::fs::write(&src_raw, &raw)?;
    let src_qcow2 = dir.join("src.qcow2");
    run_checked(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&src_raw)
            .arg(&src_qcow2),
    )?;

    let url = lun.url().to_string();
    let info = run_checked(Command::new("qemu-img").args(["info", "--output=json", &url]))?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(LUN_SIZE.bytes()),
        "qemu-img info {url}: {info}"
    );

    run_checked(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
            .arg(&src_qcow2)
            .arg(&url),
    )?;
    let back = dir.join("back.raw");
    run_checked(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &url])
            .arg(&back),
    )?;

    let back = read_file(&back)?;
    assert_eq!(back.len() as u64, LUN_SIZE.bytes(), "read back the whole LUN");
    let first_diff = raw.iter().zip(&back).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "image differs at byte {first_diff:?} after a round trip through {url}"
    );
    let nonzero_tail = back[raw.len()..].iter().position(|&b| b != 0);
    assert_eq!(
        nonzero_tail, None,
        "bytes past the image are not zero (offset {nonzero_tail:?} past its end)"
    );
    Ok(())
}

#[test]
fn qemu_img_round_trips_an_image_through_basalt_byte_identical() -> anyhow::Result<()> {
    image_round_trips_byte_identical(TargetKind::BasaltServeFile)
}

#[test]
fn qemu_img_round_trips_an_image_through_tgt_byte_identical() -> anyhow::Result<()> {
    image_round_trips_byte_identical(TargetKind::Tgt)
}
