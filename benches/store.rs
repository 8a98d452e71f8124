//! Criterion micro-benchmarks of the replica store's data path: 4 KiB random reads and writes (CRC32
//! computed and verified), batches of 32 random 4 KiB writes (`Store::write_batch`), 64 KiB sequential
//! writes, and 512-byte sector writes (read-modify-write).
//!
//! `cargo bench -p basalt-benches --bench store`

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{Rng, SeedableRng};

/// 256 MiB: larger than the CPU caches, small enough to prefill quickly.
const VOLUME: u64 = 256 << 20;

fn store_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), VOLUME).unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    for offset in (0..VOLUME).step_by(chunk.len()) {
        store.write(offset, &chunk).unwrap();
    }
    store.flush().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let block = vec![0xA5u8; 4096];

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Bytes(4096));
    group.bench_function("write_4k_random", |b| {
        b.iter(|| {
            store
                .write(rng.random_range(0..VOLUME / 4096) * 4096, &block)
                .unwrap()
        })
    });
    // What the ordered lane of a replica connection hands over when a controller keeps 32 writes in
    // flight: one index-log append for all 32. Throughput counts all 32 blocks.
    group.throughput(Throughput::Bytes(32 * 4096));
    group.bench_function("write_4k_random_batch_of_32", |b| {
        b.iter_batched(
            || {
                (0..32)
                    .map(|_| rng.random_range(0..VOLUME / 4096) * 4096)
                    .collect::<Vec<u64>>()
            },
            |offsets| {
                let batch: Vec<(u64, &[u8])> = offsets.iter().map(|&o| (o, &block[..])).collect();
                for result in store.write_batch(&batch) {
                    result.unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    group.bench_function("read_4k_random", |b| {
        b.iter(|| {
            store
                .read(rng.random_range(0..VOLUME / 4096) * 4096, &mut buf)
                .unwrap()
        })
    });
    group.throughput(Throughput::Bytes(512));
    group.bench_function("write_512_sector_rmw", |b| {
        b.iter(|| {
            store
                .write(rng.random_range(0..VOLUME / 512) * 512, &block[..512])
                .unwrap()
        })
    });
    group.throughput(Throughput::Bytes(64 * 1024));
    let big = vec![0x3Cu8; 64 * 1024];
    let mut at = 0u64;
    group.bench_function("write_64k_sequential", |b| {
        b.iter(|| {
            store.write(at, &big).unwrap();
            at = (at + big.len() as u64) % VOLUME;
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("flush_after_one_write", |b| {
        b.iter_batched(
            || {
                store
                    .write(rng.random_range(0..VOLUME / 4096) * 4096, &block)
                    .unwrap()
            },
            |()| store.flush().unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, store_benches);
criterion_main!(benches);
