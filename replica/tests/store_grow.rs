//! Growing a volume (`Store::grow`): the new blocks read as zeros and take writes, the old ones keep
//! their content, the new size survives a reopen, and a shrink, an unaligned size or one the storage
//! cannot hold is refused and changes nothing. On both backends.

use std::path::Path;
use std::sync::Arc;

use basalt_proto::VolumeId;
use basalt_replica::store::backend::block::{BlockBackend, DeviceOptions, Format, Geometry};
use basalt_replica::store::backend::SEGMENT_BYTES;
use basalt_replica::store::{Growth, Store, StoreError, MAX_VOLUME_BYTES};

const MIB: u64 = 1 << 20;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; 4096]
}

fn read(store: &Store, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    store.read(offset, &mut buf).unwrap();
    buf
}

#[test]
fn a_grown_volume_keeps_its_data_takes_writes_past_the_old_end_and_reopens_at_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId::random();
    let store = Store::create(dir.path(), id, 16 * MIB).unwrap();
    store.write(0, &block(1)).unwrap();
    store.write(16 * MIB - 4096, &block(2)).unwrap();
    assert!(matches!(
        store.write(16 * MIB, &block(3)),
        Err(StoreError::OutOfRange { .. })
    ));

    assert_eq!(store.grow(32 * MIB).unwrap(), Growth::From(16 * MIB));
    assert_eq!(store.size_bytes(), 32 * MIB);
    assert_eq!(
        read(&store, 16 * MIB, 8192),
        vec![0; 8192],
        "new blocks read as zeros"
    );
    store.write(16 * MIB, &block(3)).unwrap();
    // A sector write into a new block: read-modify-write of a block no layer holds.
    store.write(32 * MIB - 512, &[4; 512]).unwrap();
    assert_eq!(read(&store, 0, 4096), block(1));
    assert_eq!(read(&store, 16 * MIB - 4096, 4096), block(2));
    store.flush().unwrap();
    drop(store);

    // Restarted with the size it was first given: the grown size wins.
    let store = Store::open_or_create(dir.path(), 16 * MIB, Some(id)).unwrap();
    assert_eq!(store.size_bytes(), 32 * MIB);
    assert_eq!(read(&store, 16 * MIB, 4096), block(3));
    let mut tail = vec![0; 4096];
    tail[4096 - 512..].fill(4);
    assert_eq!(read(&store, 32 * MIB - 4096, 4096), tail);
    assert_eq!(read(&store, 0, 4096), block(1));
}

#[test]
fn the_same_size_is_a_no_op_and_a_shrink_or_a_bad_size_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    store.write(4096, &block(7)).unwrap();
    assert_eq!(store.grow(16 * MIB).unwrap(), Growth::Unchanged);
    assert!(matches!(
        store.grow(8 * MIB),
        Err(StoreError::Shrink { size, requested }) if size == 16 * MIB && requested == 8 * MIB
    ));
    assert!(matches!(
        store.grow(16 * MIB + 512),
        Err(StoreError::InvalidSize { .. })
    ));
    assert!(matches!(
        store.grow(MAX_VOLUME_BYTES + 4096),
        Err(StoreError::TooLarge { max, .. }) if max == MAX_VOLUME_BYTES
    ));
    assert!(matches!(
        store.check_grow(8 * MIB),
        Err(StoreError::Shrink { .. })
    ));
    assert_eq!(store.check_grow(32 * MIB).unwrap(), Growth::From(16 * MIB));
    assert_eq!(store.size_bytes(), 16 * MIB, "a check changes nothing");
    assert_eq!(read(&store, 4096, 4096), block(7));
    drop(store);
    assert_eq!(Store::open(dir.path()).unwrap().size_bytes(), 16 * MIB);
}

#[test]
fn a_volume_grows_across_the_directory_backends_segment_boundary() {
    // A one-segment volume (1 TiB) becomes a two-segment one: blocks below the boundary stay in
    // the first segment file, blocks past it go to a new one.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), SEGMENT_BYTES).unwrap();
    store.write(SEGMENT_BYTES - 4096, &block(5)).unwrap();
    store.grow(2 * SEGMENT_BYTES).unwrap();
    store.write(SEGMENT_BYTES + 8192, &block(6)).unwrap();
    // A write straddling the boundary.
    store.write(SEGMENT_BYTES - 512, &[8; 1024]).unwrap();
    store.flush().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.size_bytes(), 2 * SEGMENT_BYTES);
    let mut last = block(5);
    last[4096 - 512..].fill(8);
    assert_eq!(read(&store, SEGMENT_BYTES - 4096, 4096), last);
    let mut first = vec![0; 4096];
    first[..512].fill(8);
    assert_eq!(read(&store, SEGMENT_BYTES, 4096), first);
    assert_eq!(read(&store, SEGMENT_BYTES + 8192, 4096), block(6));
}

#[test]
fn a_snapshot_taken_before_a_grow_reverts_to_its_data_at_the_new_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    store.write(0, &block(1)).unwrap();
    store.snapshot_create("before").unwrap();
    store.grow(24 * MIB).unwrap();
    store.write(0, &block(2)).unwrap();
    store.write(20 * MIB, &block(3)).unwrap();
    store.snapshot_create("after").unwrap();
    store.snapshot_delete("before").unwrap();
    assert_eq!(read(&store, 0, 4096), block(2));
    store.snapshot_revert("after").unwrap();
    assert_eq!(store.size_bytes(), 24 * MIB);
    assert_eq!(read(&store, 20 * MIB, 4096), block(3));
    store.write(24 * MIB - 4096, &block(4)).unwrap();
    assert_eq!(read(&store, 24 * MIB - 4096, 4096), block(4));
}

fn device(dir: &Path, bytes: u64) -> std::path::PathBuf {
    let path = dir.join("device");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(bytes))
        .unwrap();
    path
}

fn device_options() -> DeviceOptions {
    DeviceOptions {
        volume_bytes: Some(8 * MIB),
        format: Format::IfBlank,
        geometry: Geometry {
            cluster_bytes: 64 << 10,
            journal_bytes: 64 << 10,
            max_objects: 32,
        },
    }
}

#[test]
fn on_a_block_device_a_volume_grows_up_to_what_the_device_holds_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let path = device(dir.path(), 64 * MIB);
    let open = || Arc::new(BlockBackend::open(&path, &device_options()).unwrap());
    let store = Store::create_with_backend(open(), VolumeId::random(), 8 * MIB).unwrap();
    store.write(8 * MIB - 4096, &block(1)).unwrap();
    let max = store.max_size_bytes();
    assert!(
        max > 32 * MIB && max < 64 * MIB,
        "a 64 MiB device holds a volume of {max} bytes"
    );
    assert!(matches!(
        store.grow(max + 4096),
        Err(StoreError::TooLarge { max: m, requested, .. }) if m == max && requested == max + 4096
    ));
    assert_eq!(store.size_bytes(), 8 * MIB, "a refused grow changes nothing");
    store.grow(max).unwrap();
    store.write(max - 4096, &block(2)).unwrap();
    store.write(16 * MIB, &block(3)).unwrap();
    store.flush().unwrap();
    drop(store);

    // The grown volume opens on the device (the device check at open is the one the grow used).
    let options = DeviceOptions {
        volume_bytes: Some(max),
        ..device_options()
    };
    let store = Store::open_with_backend(Arc::new(BlockBackend::open(&path, &options).unwrap())).unwrap();
    assert_eq!(store.size_bytes(), max);
    assert_eq!(read(&store, 8 * MIB - 4096, 4096), block(1));
    assert_eq!(read(&store, 16 * MIB, 4096), block(3));
    assert_eq!(read(&store, max - 4096, 4096), block(2));
}
