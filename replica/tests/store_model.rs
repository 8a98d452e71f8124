//! Model-based test: random sequences of writes, sector writes, discards (whole and sub-block),
//! flushes, snapshot create / delete / revert and reopens, checked after every step against a plain
//! in-memory model (a byte vector per snapshot plus the live view).

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use proptest::prelude::*;

/// 64 blocks: small enough that whole-volume comparisons after every step are cheap, large enough
/// that runs, straddles and holes all occur.
const VOLUME: usize = 64 * 4096;
const SECTORS: u64 = (VOLUME / 512) as u64;

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Unmap { sector: u64, sectors: u64 },
    Flush,
    SnapshotCreate,
    SnapshotDelete(usize),
    SnapshotRevert(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SECTORS, 1..=24u64, any::<u8>()).prop_map(|(sector, sectors, seed)| Op::Write { sector, sectors, seed }),
        3 => (0..SECTORS, 1..=40u64).prop_map(|(sector, sectors)| Op::Unmap { sector, sectors }),
        1 => Just(Op::Flush),
        2 => Just(Op::SnapshotCreate),
        1 => any::<usize>().prop_map(Op::SnapshotDelete),
        1 => any::<usize>().prop_map(Op::SnapshotRevert),
        1 => Just(Op::Reopen),
    ]
}

/// Distinct bytes per position so a block written at the wrong place is caught.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

struct Model {
    live: Vec<u8>,
    snapshots: Vec<(String, Vec<u8>)>,
    next_name: u32,
}

fn check(store: &Store, model: &Model, step: usize, op: &Op) {
    let mut got = vec![0u8; VOLUME];
    store.read(0, &mut got).unwrap();
    if got != model.live {
        let first = got.iter().zip(&model.live).position(|(a, b)| a != b).unwrap();
        panic!(
            "after step {step} ({op:?}): byte {first} (block {}) differs",
            first / 4096
        );
    }
    let names: Vec<String> = store.snapshot_list().into_iter().map(|s| s.name).collect();
    let expected: Vec<String> = model.snapshots.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, expected, "after step {step} ({op:?})");
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::create(dir.path(), VolumeId::random(), VOLUME as u64).unwrap();
    let mut model = Model {
        live: vec![0; VOLUME],
        snapshots: Vec::new(),
        next_name: 0,
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let sectors = sectors.min(SECTORS - sector);
                let (at, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                let data = pattern(seed, len);
                store.write(at as u64, &data).unwrap();
                model.live[at..at + len].copy_from_slice(&data);
            }
            Op::Unmap { sector, sectors } => {
                let sectors = sectors.min(SECTORS - sector);
                let (at, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                store.unmap(at as u64, len as u64).unwrap();
                model.live[at..at + len].fill(0);
            }
            Op::Flush => {
                store.flush().unwrap();
            }
            Op::SnapshotCreate => {
                let name = format!("s{}", model.next_name);
                model.next_name += 1;
                store.snapshot_create(&name).unwrap();
                model.snapshots.push((name, model.live.clone()));
            }
            Op::SnapshotDelete(i) => {
                if model.snapshots.is_empty() {
                    continue;
                }
                let (name, _) = model.snapshots.remove(i % model.snapshots.len());
                store.snapshot_delete(&name).unwrap();
            }
            Op::SnapshotRevert(i) => {
                if model.snapshots.is_empty() {
                    continue;
                }
                let i = i % model.snapshots.len();
                store.snapshot_revert(&model.snapshots[i].0).unwrap();
                model.live = model.snapshots[i].1.clone();
                model.snapshots.truncate(i + 1);
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(dir.path()).unwrap();
            }
        }
        check(&store, &model, step, op);
    }
    // Finally every snapshot still holds exactly what it held when it was taken.
    for i in (0..model.snapshots.len()).rev() {
        store.snapshot_revert(&model.snapshots[i].0).unwrap();
        model.live = model.snapshots[i].1.clone();
        model.snapshots.truncate(i + 1);
        check(&store, &model, usize::MAX, &Op::SnapshotRevert(i));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_read_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
