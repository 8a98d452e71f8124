//! Side by side, in one run: 4 KiB random writes and reads straight into the replica store (index log
//! append, CRC32 per block, verified on read) versus plain `pwrite`/`pread` on a file of the same size,
//! both through the page cache, no fsync. Prints each rate and the store/raw ratio (goal >= 0.8x).
//!
//! `cargo bench -p basalt-benches --bench raw_vs_store`

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use rand::{Rng, SeedableRng};

/// 256 MiB: fits the page cache of a small machine, so both sides measure software overhead.
const SIZE: u64 = 256 << 20;
const OPS: u64 = 200_000;

fn rate(ops: u64, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64()
}

fn offsets(seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..OPS)
        .map(|_| rng.random_range(0..SIZE / 4096) * 4096)
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let dir = tempfile::tempdir().unwrap();
    let block = vec![0x6Bu8; 4096];
    let mut buf = vec![0u8; 4096];
    let fill = vec![0x11u8; 1 << 20];

    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .unwrap();
    raw.set_len(SIZE).unwrap();
    let store = Store::create(&dir.path().join("store"), VolumeId::random(), SIZE).unwrap();
    for offset in (0..SIZE).step_by(fill.len()) {
        raw.write_all_at(&fill, offset).unwrap();
        store.write(offset, &fill).unwrap();
    }
    raw.sync_data().unwrap();
    store.flush().unwrap();

    let writes = offsets(1);
    let reads = offsets(2);
    let mut results = Vec::new();
    // Three rounds, alternating, so neither side always runs on a colder cache; the best round counts.
    for _ in 0..3 {
        let t = Instant::now();
        for &o in &writes {
            raw.write_all_at(&block, o).unwrap();
        }
        let raw_w = rate(OPS, t.elapsed());
        let t = Instant::now();
        for &o in &writes {
            store.write(o, &block).unwrap();
        }
        let store_w = rate(OPS, t.elapsed());
        let t = Instant::now();
        for &o in &reads {
            raw.read_exact_at(&mut buf, o).unwrap();
        }
        let raw_r = rate(OPS, t.elapsed());
        let t = Instant::now();
        for &o in &reads {
            store.read(o, &mut buf).unwrap();
        }
        let store_r = rate(OPS, t.elapsed());
        results.push((raw_w, store_w, raw_r, store_r));
    }
    let best = |f: fn(&(f64, f64, f64, f64)) -> f64| results.iter().map(f).fold(0.0, f64::max);
    let (raw_w, store_w, raw_r, store_r) = (best(|r| r.0), best(|r| r.1), best(|r| r.2), best(|r| r.3));
    println!(
        "4 KiB random writes: raw pwrite {raw_w:>10.0} IOPS, store {store_w:>10.0} IOPS, ratio {:.2}x",
        store_w / raw_w
    );
    println!(
        "4 KiB random reads:  raw pread  {raw_r:>10.0} IOPS, store {store_r:>10.0} IOPS, ratio {:.2}x",
        store_r / raw_r
    );
}
