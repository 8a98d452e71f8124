//! The store's contract, one behaviour per test.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use basalt_proto::{Epoch, Revision, VolumeId};
use basalt_replica::store::{Store, StoreError, BLOCK_SIZE};

const MIB: u64 = 1 << 20;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; BLOCK_SIZE as usize]
}

fn read(store: &Store, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    store.read(offset, &mut buf).unwrap();
    buf
}

fn new_store(dir: &Path, size: u64) -> Store {
    Store::create(dir, VolumeId::random(), size).unwrap()
}

#[test]
fn unwritten_blocks_read_as_zeros_and_writes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    assert_eq!(read(&store, 0, 8192), vec![0; 8192]);
    let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize).map(|i| (i % 251) as u8).collect();
    store.write(4096, &data).unwrap();
    assert_eq!(read(&store, 4096, data.len()), data);
    // An unaligned-to-block (but sector-aligned) read straddling written and unwritten blocks.
    let got = read(&store, 3584, 4608);
    assert_eq!(&got[..512], &[0; 512]);
    assert_eq!(&got[512..], &data[..4096]);
}

#[test]
fn sector_writes_keep_the_rest_of_the_block_from_the_chain_below() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &block(1)).unwrap();
    store.snapshot_create("base").unwrap();
    store.write(512, &[2; 512]).unwrap();
    let mut expected = block(1);
    expected[512..1024].fill(2);
    let got = read(&store, 0, 4096);
    assert_eq!(got, expected);
}

#[test]
fn a_sector_write_straddling_two_blocks_patches_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &[9; 8192]).unwrap();
    store.write(3584, &[3; 1024]).unwrap();
    let got = read(&store, 0, 8192);
    assert!(got[..3584].iter().all(|&b| b == 9));
    assert!(got[3584..4608].iter().all(|&b| b == 3));
    assert!(got[4608..].iter().all(|&b| b == 9));
}

#[test]
fn misaligned_and_out_of_range_requests_are_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    assert!(matches!(
        store.write(100, &[0; 512]),
        Err(StoreError::Unaligned { offset: 100, .. })
    ));
    assert!(matches!(
        store.write(0, &[0; 100]),
        Err(StoreError::Unaligned { .. })
    ));
    assert!(matches!(
        store.read(16 * MIB, &mut [0; 512]),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.unmap(u64::MAX - 511, 512),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        Store::create(&dir.path().join("x"), VolumeId::random(), 1000),
        Err(StoreError::InvalidSize { .. })
    ));
}

#[test]
fn unmap_reads_zeros_over_older_snapshot_data_and_never_changes_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &vec![5; 64 * 1024]).unwrap();
    store.snapshot_create("s1").unwrap();
    store.write(8192, &block(6)).unwrap();
    // Whole blocks, plus a sub-block tail and a sub-block head.
    store.unmap(4096, 3 * 4096).unwrap();
    store.unmap(20 * 1024 + 512, 1024).unwrap();
    let got = read(&store, 0, 64 * 1024);
    assert!(got[..4096].iter().all(|&b| b == 5));
    assert!(got[4096..16384].iter().all(|&b| b == 0));
    assert!(got[16384..20 * 1024 + 512].iter().all(|&b| b == 5));
    assert!(got[20 * 1024 + 512..21 * 1024 + 512].iter().all(|&b| b == 0));
    assert!(got[21 * 1024 + 512..].iter().all(|&b| b == 5));

    // The snapshot still holds its data: revert to it and look.
    store.snapshot_revert("s1").unwrap();
    assert!(read(&store, 0, 64 * 1024).iter().all(|&b| b == 5));
}

#[test]
fn unmap_of_the_head_gives_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * MIB);
    store.write(0, &vec![7; 4 * MIB as usize]).unwrap();
    store.flush().unwrap();
    assert_eq!(store.head_allocated_bytes(), 4 * MIB);
    let data_file = dir.path().join("layer-00000001.data");
    let allocated = || std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&data_file).unwrap()) * 512;
    assert!(allocated() >= 4 * MIB);
    store.unmap(0, 64 * MIB).unwrap();
    assert_eq!(store.head_allocated_bytes(), 0);
    assert!(allocated() < MIB, "still {} bytes allocated", allocated());
    assert!(read(&store, 0, 4 * MIB as usize).iter().all(|&b| b == 0));
    assert!(store.allocated_ranges().is_empty());
}

#[test]
fn a_cached_read_answers_exactly_like_a_read_and_still_checks_every_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(4096, &[block(1), block(2)].concat()).unwrap();
    store.write(3 * 4096 + 512, &[7; 512]).unwrap();
    // Just written, so in the page cache: whole blocks, a sector inside a block, never-written blocks.
    for (offset, len) in [
        (0, 8 * 4096),
        (4096, 4096),
        (3 * 4096 + 512, 1024),
        (10 * 4096, 4096),
    ] {
        let mut cached = vec![0xEE; len];
        assert!(
            store.read_cached(offset, &mut cached).unwrap(),
            "{offset}+{len} not cached"
        );
        assert_eq!(cached, read(&store, offset, len), "{offset}+{len}");
    }
    // Out of range is the same error as a read's.
    assert!(matches!(
        store.read_cached(16 * MIB, &mut [0; 4096]),
        Err(StoreError::OutOfRange { .. })
    ));
    // A corrupt block is reported, not answered.
    store.flush().unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join("layer-00000001.data"))
        .unwrap();
    file.write_all_at(&[0x43], 2 * 4096 + 7).unwrap();
    assert!(matches!(
        store.read_cached(0, &mut [0; 4 * 4096]),
        Err(StoreError::ChecksumMismatch { lba: 2 })
    ));
}

#[test]
fn a_flipped_byte_is_a_checksum_mismatch_and_a_rewrite_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(5 * 4096, &block(0x42)).unwrap();
    store.flush().unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join("layer-00000001.data"))
        .unwrap();
    file.write_all_at(&[0x43], 5 * 4096 + 100).unwrap();
    let mut buf = vec![0; 4096];
    assert!(matches!(
        store.read(5 * 4096, &mut buf),
        Err(StoreError::ChecksumMismatch { lba: 5 })
    ));
    // Also when the corrupt block is inside a larger read.
    let mut big = vec![0; 16 * 4096];
    assert!(matches!(
        store.read(0, &mut big),
        Err(StoreError::ChecksumMismatch { lba: 5 })
    ));
    // A sector write needs the rest of the block, so it reports the corruption too.
    assert!(matches!(
        store.write(5 * 4096, &[1; 512]),
        Err(StoreError::ChecksumMismatch { lba: 5 })
    ));
    // The controller's repair: a whole-block write of the good data.
    store.write(5 * 4096, &block(0x42)).unwrap();
    assert_eq!(read(&store, 5 * 4096, 4096), block(0x42));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(read(&store, 5 * 4096, 4096), block(0x42));
}

#[test]
fn corruption_in_a_snapshot_is_detected_through_the_head_and_repaired_by_a_head_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &block(1)).unwrap();
    store.snapshot_create("s").unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(dir.path().join("layer-00000001.data"))
        .unwrap();
    file.write_all_at(&[0xFF], 7).unwrap();
    assert!(matches!(
        store.read(0, &mut [0; 4096]),
        Err(StoreError::ChecksumMismatch { lba: 0 })
    ));
    store.write(0, &block(1)).unwrap();
    assert_eq!(read(&store, 0, 4096), block(1));
}

#[test]
fn reopen_with_another_volume_id_is_refused_and_with_another_size_keeps_the_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId::random();
    drop(Store::create(dir.path(), id, 16 * MIB).unwrap());
    // A size is the size of a new store: an existing one neither grows nor shrinks at open.
    for asked in [8 * MIB, 32 * MIB] {
        let store = Store::open_or_create(dir.path(), asked, Some(id)).unwrap();
        assert_eq!(store.size_bytes(), 16 * MIB);
    }
    assert!(matches!(
        Store::open_or_create(dir.path(), 16 * MIB, Some(VolumeId::random())),
        Err(StoreError::VolumeMismatch { on_disk, .. }) if on_disk == id
    ));
    assert!(matches!(
        Store::create(dir.path(), id, 16 * MIB),
        Err(StoreError::AlreadyExists { .. })
    ));
    let store = Store::open_or_create(dir.path(), 16 * MIB, None).unwrap();
    assert_eq!(store.volume_id(), id);
    assert_eq!(store.size_bytes(), 16 * MIB);
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(empty.path()),
        Err(StoreError::NotAVolume { .. })
    ));
}

#[test]
fn epoch_is_durable_and_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    assert_eq!(store.epoch(), Epoch(0));
    store.set_epoch(Epoch(5)).unwrap();
    store.set_epoch(Epoch(5)).unwrap();
    assert!(matches!(
        store.set_epoch(Epoch(4)),
        Err(StoreError::StaleEpoch {
            current: Epoch(5),
            requested: Epoch(4)
        })
    ));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.epoch(), Epoch(5));
}

#[test]
fn every_flush_raises_the_revision_and_it_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    assert_eq!(store.revision(), Revision(0));
    assert_eq!(store.flush().unwrap(), Revision(1));
    store.write(0, &block(1)).unwrap();
    assert_eq!(store.flush().unwrap(), Revision(2));
    assert_eq!(store.revision(), Revision(2));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.revision(), Revision(2));
    store.snapshot_create("s").unwrap();
    let after_snapshot = store.revision();
    assert!(after_snapshot > Revision(2));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.revision(), after_snapshot);
    assert_eq!(store.flush().unwrap(), Revision(after_snapshot.0 + 1));
}

#[test]
fn snapshots_are_listed_oldest_first_with_parent_and_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &vec![1; 3 * 4096]).unwrap();
    let a = store.snapshot_create("a").unwrap();
    assert_eq!((a.parent.as_deref(), a.allocated_bytes), (None, 3 * 4096));
    store.write(0, &block(2)).unwrap();
    store.snapshot_create("b").unwrap();
    assert!(matches!(store.snapshot_create("a"), Err(StoreError::SnapshotExists(n)) if n == "a"));
    assert!(matches!(
        store.snapshot_create(""),
        Err(StoreError::InvalidSnapshotName { .. })
    ));
    let list = store.snapshot_list();
    let summary: Vec<_> = list
        .iter()
        .map(|s| (s.name.as_str(), s.parent.as_deref(), s.allocated_bytes))
        .collect();
    assert_eq!(summary, vec![("a", None, 3 * 4096), ("b", Some("a"), 4096)]);
    assert!(list[0].created <= list[1].created);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.snapshot_list(), list);
}

#[test]
fn deleting_a_snapshot_merges_it_into_its_child_and_keeps_every_view() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &vec![1; 4 * 4096]).unwrap(); // blocks 0..4 = 1
    store.snapshot_create("a").unwrap();
    store.write(4096, &block(2)).unwrap(); // block 1 = 2
    store.unmap(2 * 4096, 4096).unwrap(); // block 2 discarded in b
    store.snapshot_create("b").unwrap();
    store.write(3 * 4096, &block(3)).unwrap(); // head: block 3 = 3
    let live = read(&store, 0, 4 * 4096);

    store.snapshot_delete("a").unwrap();
    assert_eq!(read(&store, 0, 4 * 4096), live);
    let list = store.snapshot_list();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].parent.as_deref()), ("b", None));
    // b (now holding a's blocks) still shows b's view: block 0 = 1, block 1 = 2, block 2 = 0, block 3 = 1.
    store.snapshot_revert("b").unwrap();
    let b_view = read(&store, 0, 4 * 4096);
    assert_eq!(b_view[0], 1);
    assert_eq!(b_view[4096], 2);
    assert_eq!(b_view[2 * 4096], 0);
    assert_eq!(b_view[3 * 4096], 1);
    // Deleting the last snapshot merges it into the head.
    store.write(0, &block(9)).unwrap();
    store.snapshot_delete("b").unwrap();
    assert!(store.snapshot_list().is_empty());
    let head_view = read(&store, 0, 4 * 4096);
    assert_eq!(
        (
            head_view[0],
            head_view[4096],
            head_view[2 * 4096],
            head_view[3 * 4096]
        ),
        (9, 2, 0, 1)
    );
    assert!(matches!(
        store.snapshot_delete("b"),
        Err(StoreError::NoSuchSnapshot(_))
    ));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(read(&store, 0, 4 * 4096), head_view);
    // Only the head's two objects, the meta and the write-intent record remain (besides the open
    // store's lock file): the merged snapshots left nothing behind.
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "volume.lock")
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "intent.log",
            "layer-00000004.data",
            "layer-00000004.idx",
            "volume.meta"
        ],
        "{files:?}"
    );
}

#[test]
fn revert_drops_the_head_and_later_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &block(1)).unwrap();
    store.snapshot_create("one").unwrap();
    store.write(0, &block(2)).unwrap();
    store.snapshot_create("two").unwrap();
    store.write(0, &block(3)).unwrap();
    let before = store.revision();
    store.snapshot_revert("one").unwrap();
    assert!(store.revision() > before);
    assert_eq!(read(&store, 0, 4096), block(1));
    assert_eq!(
        store
            .snapshot_list()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        vec!["one"]
    );
    assert!(matches!(
        store.snapshot_revert("two"),
        Err(StoreError::NoSuchSnapshot(_))
    ));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(read(&store, 0, 4096), block(1));
}

#[test]
fn a_chain_of_a_thousand_snapshots_works_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    for i in 0..1000u64 {
        store
            .write((i % 4096) * 4096, &block((i % 251) as u8 + 1))
            .unwrap();
        store.snapshot_create(&format!("s{i}")).unwrap();
    }
    let check = |store: &Store| {
        for i in [0u64, 1, 500, 998, 999] {
            assert_eq!(read(store, i * 4096, 4096), block((i % 251) as u8 + 1));
        }
    };
    check(&store);
    assert_eq!(store.snapshot_list().len(), 1000);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    check(&store);
    store.snapshot_delete("s0").unwrap();
    store.snapshot_delete("s500").unwrap();
    store.snapshot_delete("s999").unwrap();
    check(&store);
    assert_eq!(store.snapshot_list().len(), 997);
}

#[test]
fn allocated_ranges_are_coalesced_bytes_of_the_merged_view() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 16 * MIB);
    store.write(0, &vec![1; 2 * 4096]).unwrap();
    store.snapshot_create("s").unwrap();
    store.write(2 * 4096, &block(2)).unwrap();
    store.write(10 * 4096, &block(3)).unwrap();
    store.unmap(4096, 4096).unwrap();
    assert_eq!(
        store.allocated_ranges(),
        vec![0..4096, 2 * 4096..3 * 4096, 10 * 4096..11 * 4096]
    );
}

#[test]
fn checksums_of_many_ranges_short_and_long_list_exactly_what_one_listing_per_range_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 64 * MIB);
    // Data in a snapshot and in the head, a block rewritten after the snapshot, discards of both.
    for lba in (0..4000u64).step_by(7) {
        store.write(lba * 4096, &block(lba as u8)).unwrap();
    }
    store.snapshot_create("s").unwrap();
    for lba in (3..4000u64).step_by(11) {
        store.write(lba * 4096, &block(!lba as u8)).unwrap();
    }
    store.unmap(14 * 4096, 4096).unwrap();
    store.unmap(300 * 4096, 200 * 4096).unwrap();
    // Short ranges (looked up block by block), long ones (listed in order), a long sparse one.
    let ranges = vec![
        0..1,
        3..5,
        7..71,
        100..165,
        290..520,
        700..702,
        1000..3000,
        3990..4100,
    ];
    let one_by_one: Vec<(u64, u32)> = ranges.iter().flat_map(|r| store.block_crcs(r.clone())).collect();
    assert!(
        one_by_one.iter().any(|&(lba, _)| lba == 3),
        "a head block is listed"
    );
    assert!(
        !one_by_one.iter().any(|&(lba, _)| lba == 14),
        "a discarded block is not"
    );
    let check = |store: &Store| {
        assert_eq!(
            store.block_crcs_in(&ranges, usize::MAX),
            (one_by_one.clone(), 4100)
        );
        // Cut short: the entries up to the limit, and the first block left out.
        for max in [0, 1, 5, one_by_one.len() - 1] {
            assert_eq!(
                store.block_crcs_in(&ranges, max),
                (one_by_one[..max].to_vec(), one_by_one[max].0),
                "at most {max} entries"
            );
        }
    };
    check(&store);
    // Reopened, the map is built from the logs instead of grown write by write.
    drop(store);
    check(&Store::open(dir.path()).unwrap());
}

#[test]
fn a_volume_larger_than_a_file_can_be_spans_segments() {
    // 64 TiB: beyond ext4's 16 TiB file limit, so the data lives in segment files.
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 40;
    let store = new_store(dir.path(), size);
    for offset in [0, (16u64 << 40) + 4096, size - 4096] {
        store.write(offset, &block(0x5A)).unwrap();
    }
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    for offset in [0, (16u64 << 40) + 4096, size - 4096] {
        assert_eq!(read(&store, offset, 4096), block(0x5A));
    }
    assert_eq!(read(&store, 40u64 << 40, 4096), block(0));
}

#[test]
fn concurrent_writers_and_readers_never_see_a_torn_block() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(new_store(dir.path(), 16 * MIB));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..500u32 {
                    let lba = u64::from(i % 8);
                    if t % 2 == 0 {
                        store.write(lba * 4096, &block(t * 50 + (i % 50) as u8)).unwrap();
                        if i % 100 == 0 {
                            store.flush().unwrap();
                        }
                    } else {
                        let got = read(&store, lba * 4096, 4096);
                        assert!(got.iter().all(|&b| b == got[0]), "torn block");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn starting_the_writeback_makes_nothing_durable_by_itself_and_changes_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 << 20).unwrap();
    let revision = store.revision();
    for lba in 0..64u64 {
        store.write(lba * 4096, &[lba as u8 + 1; 4096]).unwrap();
    }
    store.start_writeback().unwrap();
    assert_eq!(store.revision(), revision, "only a flush moves the revision");
    let mut buf = vec![0u8; 4096];
    for lba in 0..64u64 {
        store.read(lba * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == lba as u8 + 1), "block {lba}");
    }
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.recovered_unflushed(), 0);
    store.read(63 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 64));
}
