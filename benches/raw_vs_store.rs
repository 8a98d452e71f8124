//! Side by side, in one run: 4 KiB random writes and reads straight into the replica store (index log
//! append, CRC32 per block, verified on read) versus plain `pwrite`/`pread` on a file of the same size,
//! both through the page cache, no fsync. Prints each rate and the store/raw ratio (goal >= 0.8x).
//!
//! Writes are measured two ways: one `Store::write` per block, and `Store::write_batch` of
//! [`BATCH`] blocks, which is how a replica's ordered lane hands the store a pipelined controller's
//! queued writes. The raw file has no log to batch, so its side is one `pwrite` per block either way.
//!
//! The machine this runs on is shared and noisy, so the cases are interleaved in slices of ~1,000
//! operations (see [`SLICE`]), each round's ratios are computed inside the round (both sides saw the
//! same load), and the median over the rounds is reported, with the spread.
//!
//! `cargo bench -p basalt-benches --bench raw_vs_store`

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use rand::{Rng, SeedableRng};

/// 256 MiB: fits the page cache of a small machine, so both sides measure software overhead.
const SIZE: u64 = 256 << 20;
/// Operations per case per round: long enough (~0.1-1 s) to average out scheduler noise.
const OPS: usize = 64 * SLICE;
/// Rounds; the median ratio is reported. Odd, so the median is one round's figure.
const ROUNDS: usize = 9;
/// Writes per `write_batch`: open-iscsi's default session queue depth (32), i.e. what a controller
/// serving one busy initiator keeps in flight towards each replica.
const BATCH: usize = 32;

fn offsets(seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..OPS)
        .map(|_| rng.random_range(0..SIZE / 4096) * 4096)
        .collect()
}

/// Operations per slice: each case runs one slice in turn, so that every case sees the same load
/// from the rest of the machine within milliseconds (a shared 2-core box swings by 2x over seconds).
const SLICE: usize = 1_024;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One round's rates, in IOPS.
struct Round {
    raw_write: f64,
    store_write: f64,
    store_batch: f64,
    raw_read: f64,
    store_read: f64,
}

/// Runs the cases slice by slice, in turn (in rotating order, so none always follows the same
/// one), and returns each case's rate over all its slices.
fn interleaved<const N: usize>(ops: usize, cases: &mut [&mut dyn FnMut(Range<usize>); N]) -> [f64; N] {
    let mut spent = [Duration::ZERO; N];
    for (k, start) in (0..ops).step_by(SLICE).enumerate() {
        let slice = start..(start + SLICE).min(ops);
        for i in 0..N {
            let case = (i + k) % N;
            let t = Instant::now();
            cases[case](slice.clone());
            spent[case] += t.elapsed();
        }
    }
    spent.map(|d| ops as f64 / d.as_secs_f64())
}

fn round(raw: &File, store: &Store, writes: &[u64], reads: &[u64]) -> Round {
    let block = vec![0x6Bu8; 4096];
    let batch: Vec<(u64, &[u8])> = writes.iter().map(|&o| (o, &block[..])).collect();
    let [raw_write, store_write, store_batch] = interleaved(
        writes.len(),
        &mut [
            &mut |slice| {
                for &o in &writes[slice] {
                    raw.write_all_at(&block, o).unwrap();
                }
            },
            &mut |slice| {
                for &o in &writes[slice] {
                    store.write(o, &block).unwrap();
                }
            },
            &mut |slice| {
                for chunk in batch[slice].chunks(BATCH) {
                    for result in store.write_batch(chunk) {
                        result.unwrap();
                    }
                }
            },
        ],
    );
    let mut buf = vec![0u8; 4096];
    let mut raw_buf = vec![0u8; 4096];
    let [raw_read, store_read] = interleaved(
        reads.len(),
        &mut [
            &mut |slice| {
                for &o in &reads[slice] {
                    raw.read_exact_at(&mut raw_buf, o).unwrap();
                }
            },
            &mut |slice| {
                for &o in &reads[slice] {
                    store.read(o, &mut buf).unwrap();
                }
            },
        ],
    );
    Round {
        raw_write,
        store_write,
        store_batch,
        raw_read,
        store_read,
    }
}

fn report(what: &str, raw: &[f64], store: &[f64]) {
    let ratios: Vec<f64> = store.iter().zip(raw).map(|(s, r)| s / r).collect();
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    println!(
        "{what:<28} raw {:>9.0} IOPS, store {:>9.0} IOPS, ratio {:.2}x (median of {}; {lo:.2}..{hi:.2})",
        median(raw.to_vec()),
        median(store.to_vec()),
        median(ratios.clone()),
        ratios.len(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let dir = tempfile::tempdir().unwrap();
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
    // A warm-up round, not counted: first touches of the page cache and the map.
    round(&raw, &store, &writes, &reads);
    let rounds: Vec<Round> = (0..ROUNDS)
        .map(|_| round(&raw, &store, &writes, &reads))
        .collect();
    let col = |f: fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    report(
        "4 KiB random writes",
        &col(|r| r.raw_write),
        &col(|r| r.store_write),
    );
    report(
        &format!("4 KiB random writes, x{BATCH}"),
        &col(|r| r.raw_write),
        &col(|r| r.store_batch),
    );
    report("4 KiB random reads", &col(|r| r.raw_read), &col(|r| r.store_read));
}
