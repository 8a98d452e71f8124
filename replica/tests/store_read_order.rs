//! Reads of a volume whose head holds (nearly) every block: the store then reads a block from the
//! head before looking it up (to hide the lookup's cache miss behind the `pread`), and must answer
//! exactly as the lookup-first order does.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use basalt_proto::VolumeId;
use basalt_replica::store::{Store, StoreError};

const BLOCK: usize = 4096;
/// 1 MiB: 256 blocks, so 1/16 of them is 16.
const SIZE: u64 = 1 << 20;
const BLOCKS: u64 = SIZE / BLOCK as u64;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; BLOCK]
}

fn read_block(store: &Store, lba: u64) -> Vec<u8> {
    let mut buf = block(0xEE);
    store.read(lba * BLOCK as u64, &mut buf).unwrap();
    buf
}

#[test]
fn a_corrupt_block_of_a_fully_written_head_is_a_checksum_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), SIZE).unwrap();
    store.write(0, &vec![0x42; SIZE as usize]).unwrap();
    store.flush().unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join("layer-00000001.data"))
        .unwrap();
    file.write_all_at(&[0x43], 9 * BLOCK as u64 + 100).unwrap();
    let mut buf = block(0);
    assert!(matches!(
        store.read(9 * BLOCK as u64, &mut buf),
        Err(StoreError::ChecksumMismatch { lba: 9 })
    ));
    assert!(matches!(
        store.read_cached(9 * BLOCK as u64, &mut buf),
        Err(StoreError::ChecksumMismatch { lba: 9 })
    ));
    assert_eq!(read_block(&store, 8), block(0x42));
    // A rewrite repairs it, read the same way.
    store.write(9 * BLOCK as u64, &block(0x44)).unwrap();
    assert_eq!(read_block(&store, 9), block(0x44));
}

#[test]
fn a_dense_head_still_answers_blocks_it_does_not_hold_from_below_or_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), SIZE).unwrap();
    store.write(0, &vec![0x11; SIZE as usize]).unwrap();
    store.snapshot_create("base").unwrap();
    // The new head gets every block but 0..8 (left to the snapshot), then 8..12 are discarded:
    // 244 of 256 blocks hold data in the head, more than 15/16.
    store
        .write(8 * BLOCK as u64, &vec![0x22; SIZE as usize - 8 * BLOCK])
        .unwrap();
    store.unmap(8 * BLOCK as u64, 4 * BLOCK as u64).unwrap();
    for lba in 0..BLOCKS {
        let expected = match lba {
            0..8 => block(0x11),
            8..12 => block(0),
            _ => block(0x22),
        };
        assert_eq!(read_block(&store, lba), expected, "block {lba}");
        let mut cached = block(0xEE);
        if store.read_cached(lba * BLOCK as u64, &mut cached).unwrap() {
            assert_eq!(cached, expected, "block {lba}, read_cached");
        }
    }
}

#[test]
fn reads_racing_whole_block_rewrites_of_a_dense_head_return_one_version_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), SIZE).unwrap();
    store.write(0, &vec![0xAA; SIZE as usize]).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..20_000u32 {
                let fill = if i % 2 == 0 { 0xBB } else { 0xAA };
                store.write(3 * BLOCK as u64, &block(fill)).unwrap();
            }
            done.store(true, Ordering::Release);
        });
        for _ in 0..2 {
            s.spawn(|| {
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) || reads < 1000 {
                    let got = read_block(&store, 3);
                    assert!(
                        got == block(0xAA) || got == block(0xBB),
                        "a torn or foreign block: starts {:x?}",
                        &got[..8]
                    );
                    reads += 1;
                }
            });
        }
    });
}
