//! `Store::write_batch`: many writes for one index-log append, with exactly the meaning of the same
//! writes made one by one.

use basalt_proto::VolumeId;
use basalt_replica::store::{Store, StoreError, BLOCK_SIZE};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;
const BLOCK: usize = BLOCK_SIZE as usize;

fn read_all(store: &Store) -> Vec<u8> {
    let mut buf = vec![0u8; store.size_bytes() as usize];
    store.read(0, &mut buf).unwrap();
    buf
}

fn as_batch(writes: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
    writes.iter().map(|(o, d)| (*o, &d[..])).collect()
}

#[test]
fn a_batch_reads_back_exactly_as_the_same_writes_made_one_by_one() {
    // Random batches of whole blocks, runs, repeats, sector writes and over-1-MiB writes, against a
    // second store fed the same writes one at a time.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let batched = Store::create(a.path(), VolumeId::random(), 4 * MIB).unwrap();
    let single = Store::create(b.path(), VolumeId::random(), 4 * MIB).unwrap();
    let blocks = 4 * MIB / BLOCK_SIZE;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..50u8 {
        let mut writes = Vec::new();
        let mut lba = rng.random_range(0..blocks);
        for _ in 0..rng.random_range(1..40) {
            let (offset, len) = match rng.random_range(0..10) {
                0 => (lba * BLOCK_SIZE + 512 * rng.random_range(0..8), 512),
                1 => (0, (MIB + BLOCK_SIZE) as usize),
                _ => (lba * BLOCK_SIZE, BLOCK * rng.random_range(1..4)),
            };
            let len = len.min((4 * MIB - offset) as usize);
            let fill = round.wrapping_mul(31).wrapping_add(writes.len() as u8);
            writes.push((offset, vec![fill; len]));
            lba = match rng.random_range(0..3) {
                0 => lba,
                1 => (offset + len as u64).div_ceil(BLOCK_SIZE) % blocks,
                _ => rng.random_range(0..blocks),
            };
        }
        for result in batched.write_batch(&as_batch(&writes)) {
            result.unwrap();
        }
        for (offset, data) in &writes {
            single.write(*offset, data).unwrap();
        }
        assert!(read_all(&batched) == read_all(&single), "round {round}");
    }
    assert_eq!(batched.allocated_ranges(), single.allocated_ranges());
    assert_eq!(
        batched.block_crcs(0..blocks),
        single.block_crcs(0..blocks),
        "the map holds the same checksums"
    );
}

#[test]
fn a_refused_write_fails_alone_and_the_others_still_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    let writes = vec![
        (0, vec![1u8; BLOCK]),
        (100, vec![2u8; BLOCK]),
        (BLOCK_SIZE, vec![3u8; BLOCK]),
        (16 * MIB, vec![4u8; BLOCK]),
        (0, vec![5u8; BLOCK]),
    ];
    let results = store.write_batch(&as_batch(&writes));
    assert_eq!(results.len(), writes.len());
    assert!(results[0].is_ok() && results[2].is_ok() && results[4].is_ok());
    assert!(matches!(
        results[1],
        Err(StoreError::Unaligned { offset: 100, .. })
    ));
    assert!(matches!(results[3], Err(StoreError::OutOfRange { .. })));
    let mut got = vec![0u8; 2 * BLOCK];
    store.read(0, &mut got).unwrap();
    assert_eq!(
        &got[..BLOCK],
        &[5u8; BLOCK][..],
        "the later write to block 0 wins"
    );
    assert_eq!(&got[BLOCK..], &[3u8; BLOCK][..]);
}

#[test]
fn an_empty_batch_does_nothing_and_a_batch_survives_flush_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    assert!(store.write_batch(&[]).is_empty());
    assert_eq!(store.allocated_ranges(), vec![]);
    let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|i| ((i * 3 % 64) * BLOCK_SIZE, vec![i as u8 + 1; BLOCK]))
        .collect();
    for result in store.write_batch(&as_batch(&writes)) {
        result.unwrap();
    }
    store.flush().unwrap();
    let before = read_all(&store);
    drop(store);
    let reopened = Store::open(dir.path()).unwrap();
    assert!(read_all(&reopened) == before);
    assert_eq!(reopened.allocated_ranges(), vec![0..64 * BLOCK_SIZE]);
}
