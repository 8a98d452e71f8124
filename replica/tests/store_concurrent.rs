//! Reads racing writes to the very same blocks: a read never fails its checksum and never returns a
//! half-written block, although reads take no stripe lock unless a block fails its check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use basalt_proto::VolumeId;
use basalt_replica::store::Store;

const MIB: u64 = 1 << 20;
/// Few blocks, so that nearly every read lands on a block being written.
const BLOCKS: u64 = 4;
const WRITES: u64 = 20_000;

/// Whether `block` is one whole version: every byte the same (each write fills a block with one byte).
fn is_one_version(block: &[u8]) -> bool {
    block.iter().all(|&b| b == block[0])
}

#[test]
fn reads_racing_writes_discards_and_batches_see_whole_blocks_and_no_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap());
    store.write(0, &vec![1u8; (BLOCKS * 4096) as usize]).unwrap();
    store.snapshot_create("under").unwrap();
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut one = vec![0u8; 4096];
                let mut all = vec![0u8; (BLOCKS * 4096) as usize];
                while !done.load(Ordering::Acquire) || reads < 1000 {
                    let lba = reads % BLOCKS;
                    store
                        .read(lba * 4096, &mut one)
                        .unwrap_or_else(|e| panic!("reader {r}: read {reads}: {e}"));
                    assert!(is_one_version(&one), "reader {r}: block {lba} read half-written");
                    store
                        .read(0, &mut all)
                        .unwrap_or_else(|e| panic!("reader {r}: read {reads}: {e}"));
                    assert!(
                        all.chunks(4096).all(is_one_version),
                        "reader {r}: a block read torn"
                    );
                    reads += 1;
                }
            })
        })
        .collect();

    for i in 0..WRITES {
        let lba = i % BLOCKS;
        let fill = (i % 250) as u8 + 2;
        match i % 5 {
            0 => store.unmap(lba * 4096, 4096).unwrap(),
            1 => {
                let (a, b) = (vec![fill; 4096], vec![fill.wrapping_add(1); 4096]);
                for result in store.write_batch(&[(lba * 4096, &a), (((lba + 1) % BLOCKS) * 4096, &b)]) {
                    result.unwrap();
                }
            }
            _ => store.write(lba * 4096, &vec![fill; 4096]).unwrap(),
        }
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        reader.join().unwrap();
    }
}
