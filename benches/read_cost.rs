//! Instructions per 4 KiB cached read, store versus plain file, for `valgrind --tool=callgrind` (which
//! counts user-space instructions exactly and repeatably, however busy the machine is; the kernel's
//! side of each `pread` is not counted, and is the same for both files since they are written the
//! same way, see [`basalt_benches::raw_and_store`]).
//!
//! ```text
//! cargo bench -p basalt-benches --bench read_cost --no-run   # prints the binary's path
//! valgrind --tool=callgrind --callgrind-out-file=cg.out <binary> --bench --once
//! callgrind_annotate --inclusive=yes cg.out | grep -E 'read_cost::(raw|store|crc)_reads'
//! ```
//!
//! With `--once` each `*_reads` function runs once over [`READS`] reads, so its inclusive count
//! divided by [`READS`] is the user-space cost of one read. Valgrind hides VPCLMULQDQ from the
//! program, so under it crc32fast takes its 128-bit PCLMULQDQ path, not the 256-bit one it uses on
//! this CPU natively: callgrind's CRC figure is an upper bound. Without valgrind and `--once`, the
//! cases run interleaved ([`interleaved`]) for [`ROUNDS`] rounds and the median nanoseconds per read
//! are printed, with the CRC32 of an L1-resident block alone for scale.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;

use basalt_benches::{interleaved, random_block_offsets, raw_and_store, PageBuf};
use basalt_replica::store::Store;

/// 256 MiB, as in `raw_vs_store`: far larger than the CPU caches, so that neither side finds the
/// block it reads, or its map slot, in a cache by luck (a 16 MiB pair of files fit in L3).
const SIZE: u64 = 256 << 20;
/// Reads per case: enough for per-call overhead outside the loop to vanish in the division.
const READS: usize = 10_000;

#[inline(never)]
fn raw_reads(raw: &File, offsets: &[u64], buf: &mut [u8]) {
    for &o in offsets {
        raw.read_exact_at(buf, o).unwrap();
        black_box(&mut *buf);
    }
}

/// A plain `pread` plus the CRC32 the store must verify: the floor of a checksummed read.
#[inline(never)]
fn crc_reads(raw: &File, offsets: &[u64], buf: &mut [u8]) {
    for &o in offsets {
        raw.read_exact_at(buf, o).unwrap();
        black_box(crc32fast::hash(buf));
    }
}

#[inline(never)]
fn store_reads(store: &Store, offsets: &[u64], buf: &mut [u8]) {
    for &o in offsets {
        store.read(o, buf).unwrap();
        black_box(&mut *buf);
    }
}

/// Timing rounds (without valgrind); the median of each case is printed. Time is thread CPU time
/// (see [`interleaved`]).
const ROUNDS: usize = 31;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, store) = raw_and_store(dir.path(), SIZE);
    let offsets = random_block_offsets(3, READS, SIZE);
    // The plain `pread` + CRC32 case reads the raw file too, so it gets blocks of its own: with the
    // same ones, whichever of the two ran second in a slice found them in the CPU cache.
    let crc_offsets = random_block_offsets(4, READS, SIZE);
    let mut buf = PageBuf::new();
    // Warm-up, and all valgrind needs: page cache, map, lazily initialised state (crc32fast's CPU
    // feature detection).
    raw_reads(&raw, &offsets, &mut buf.0);
    crc_reads(&raw, &crc_offsets, &mut buf.0);
    store_reads(&store, &offsets, &mut buf.0);
    if std::env::args().any(|a| a == "--once") {
        return;
    }
    let block = vec![0x11u8; 4096];
    let (mut b1, mut b2, mut b3) = (buf, PageBuf::new(), PageBuf::new());
    let mut ns = [const { Vec::new() }; 4];
    for _ in 0..ROUNDS {
        let rates = interleaved(
            READS,
            500,
            &mut [
                &mut |s| raw_reads(&raw, &offsets[s], &mut b1.0),
                &mut |s| crc_reads(&raw, &crc_offsets[s], &mut b2.0),
                &mut |s| store_reads(&store, &offsets[s], &mut b3.0),
                &mut |s| {
                    for _ in s {
                        black_box(crc32fast::hash(black_box(&block)));
                    }
                },
            ],
        );
        for (v, rate) in ns.iter_mut().zip(rates) {
            v.push(1e9 / rate);
        }
    }
    let [raw_ns, crc_ns, store_ns, hash_ns] = ns.map(median);
    println!(
        "ns per 4 KiB read (median of {ROUNDS}): raw pread {raw_ns:.0}, raw pread + CRC32 {crc_ns:.0}, \
         store {store_ns:.0}; CRC32 of 4 KiB alone {hash_ns:.0}; store/raw {:.2}x, \
         (raw + CRC32)/raw {:.2}x",
        raw_ns / store_ns,
        raw_ns / crc_ns,
    );
}
