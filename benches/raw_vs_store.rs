//! Side by side, in one run: 4 KiB random writes and reads straight into the replica store (index log
//! append, CRC32 per block, verified on read) versus plain `pwrite`/`pread` on a file of the same size,
//! both through the page cache, no fsync. Prints each rate and the store/raw ratio (goal >= 0.8x).
//! Both are prefilled with the same writes ([`basalt_benches::raw_and_store`]): the page cache sizes
//! its folios after the writes that created them, and a file prefilled with larger writes than the
//! store's makes every small raw I/O costlier (before that was fixed, raw 4 KiB overwrites ran at a
//! third of their fair rate and the write ratio read 3x).
//!
//! Writes are measured two ways: one `Store::write` per block, and `Store::write_batch` of
//! [`BATCH`] blocks, which is how a replica's ordered lane hands the store a pipelined controller's
//! queued writes. The raw file has no log to batch, so its side is one `pwrite` per block either way.
//!
//! Reads are measured three ways: the store, a plain `pread`, and a plain `pread` followed by the
//! CRC32 of the block -- the floor of any checksummed read, shown so the store's own overhead can be
//! told apart from the checksum's.
//!
//! Every case works on a file of its own (see `Files`): cases sharing a file warm its page-cache
//! index for each other, which made the raw reads ~10% faster than they are alone.
//!
//! The machine this runs on is shared and noisy, so the cases are interleaved in slices of ~1,000
//! operations (see [`SLICE`]), each round's ratios are computed inside the round (both sides saw the
//! same load), and the median over the rounds is reported, with the spread.
//!
//! `cargo bench -p basalt-benches --bench raw_vs_store`

use std::fs::File;
use std::os::unix::fs::FileExt;

use basalt_benches::{interleaved, random_block_offsets, raw_and_store, PageBuf};
use basalt_replica::store::Store;

/// 256 MiB: fits the page cache of a small machine, so both sides measure software overhead.
const SIZE: u64 = 256 << 20;
/// Operations per case per round: long enough (~0.1-1 s) to average out scheduler noise.
const OPS: usize = 64 * SLICE;
/// Rounds; the median ratio is reported. Odd, so the median is one round's figure.
const ROUNDS: usize = 9;
/// Writes per `write_batch`: open-iscsi's default session queue depth (32), i.e. what a controller
/// serving one busy initiator keeps in flight towards each replica.
const BATCH: usize = 32;

/// Operations per slice: each case runs one slice in turn, so that every case sees the same load
/// from the rest of the machine within milliseconds (a shared 2-core box swings by 2x over seconds).
const SLICE: usize = 1_024;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What the cases work on: each case its own file. Cases that share a file keep its page-cache
/// index (the kernel's xarray of the file's folios) warm for each other between their slices, and
/// a lookup in it is a third of a cached 4 KiB `pread`: when the `pread` + CRC32 case read the raw
/// file too, the raw reads found it warm twice as often as the store's reads found theirs.
struct Files {
    raw: File,
    store: Store,
    /// The `pread` + CRC32 case's file.
    raw_crc: File,
    /// The `write_batch` case's store.
    store_batch: Store,
}

/// One round's rates, in IOPS.
struct Round {
    raw_write: f64,
    store_write: f64,
    store_batch: f64,
    raw_read: f64,
    raw_crc_read: f64,
    store_read: f64,
}

fn round(files: &Files, writes: &[u64], reads: &[u64], crc_reads: &[u64]) -> Round {
    let Files {
        raw,
        store,
        raw_crc,
        store_batch,
    } = files;
    let block = vec![0x6Bu8; 4096];
    let batch: Vec<(u64, &[u8])> = writes.iter().map(|&o| (o, &block[..])).collect();
    let [raw_write, store_write, store_batch] = interleaved(
        writes.len(),
        SLICE,
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
                    for result in store_batch.write_batch(chunk) {
                        result.unwrap();
                    }
                }
            },
        ],
    );
    // The same alignment on every side (see `PageBuf`).
    let (mut buf, mut raw_buf, mut crc_buf) = (PageBuf::new(), PageBuf::new(), PageBuf::new());
    let [raw_read, raw_crc_read, store_read] = interleaved(
        reads.len(),
        SLICE,
        &mut [
            &mut |slice| {
                for &o in &reads[slice] {
                    raw.read_exact_at(&mut raw_buf.0, o).unwrap();
                }
            },
            &mut |slice| {
                for &o in &crc_reads[slice] {
                    raw_crc.read_exact_at(&mut crc_buf.0, o).unwrap();
                    std::hint::black_box(crc32fast::hash(&crc_buf.0));
                }
            },
            &mut |slice| {
                for &o in &reads[slice] {
                    store.read(o, &mut buf.0).unwrap();
                }
            },
        ],
    );
    Round {
        raw_write,
        store_write,
        store_batch,
        raw_read,
        raw_crc_read,
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
    // Every case its own file, written the same way (see `Files`).
    for sub in ["a", "b"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    let (raw, store) = raw_and_store(&dir.path().join("a"), SIZE);
    let (raw_crc, store_batch) = raw_and_store(&dir.path().join("b"), SIZE);
    let files = Files {
        raw,
        store,
        raw_crc,
        store_batch,
    };
    let writes = random_block_offsets(1, OPS, SIZE);
    let reads = random_block_offsets(2, OPS, SIZE);
    // The pread + CRC32 case reads the raw file too, so it gets blocks of its own: with the same
    // ones, whichever of the two ran second in a slice found them in the CPU cache.
    let crc_reads = random_block_offsets(3, OPS, SIZE);
    // A warm-up round, not counted: first touches of the page cache and the map.
    round(&files, &writes, &reads, &crc_reads);
    let rounds: Vec<Round> = (0..ROUNDS)
        .map(|_| round(&files, &writes, &reads, &crc_reads))
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
    // Not the store: a plain `pread` plus the CRC32 every store read must verify, i.e. the most a
    // checksummed read can reach with this CRC implementation on this CPU.
    report(
        "  (raw pread + CRC32 alone)",
        &col(|r| r.raw_read),
        &col(|r| r.raw_crc_read),
    );
}
