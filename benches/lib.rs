//! Shared helpers for Basalt benchmarks.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use rand::{Rng, SeedableRng};

/// Bytes per prefill write, for both sides of a store-versus-raw-file comparison. The page cache
/// sizes a new folio after the write that creates it, and the cost of a later small read or
/// overwrite depends on that size (a 4 KiB overwrite into a 1 MiB folio walks all its buffer heads:
/// measured 3-4x slower). The store's backend writes its data in aligned 16 KiB pieces whatever the
/// caller's size (`WRITE_CHUNK`), so the raw file must be written in the same pieces, or the comparison
/// measures folio sizes instead of the store.
pub const PREFILL_WRITE: usize = 16 << 10;

/// A plain file and a fresh store, both `size` bytes, both filled with the same data written the same
/// way (see [`PREFILL_WRITE`]) and made durable, so that both start from the same page-cache state.
pub fn raw_and_store(dir: &Path, size: u64) -> (File, Store) {
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("raw"))
        .unwrap();
    raw.set_len(size).unwrap();
    let store = Store::create(&dir.join("store"), VolumeId::random(), size).unwrap();
    let fill = vec![0x11u8; PREFILL_WRITE];
    for offset in (0..size).step_by(fill.len()) {
        raw.write_all_at(&fill, offset).unwrap();
        store.write(offset, &fill).unwrap();
    }
    raw.sync_data().unwrap();
    store.flush().unwrap();
    (raw, store)
}

/// `n` random block-aligned offsets in a volume of `size` bytes, the same for every run with `seed`.
pub fn random_block_offsets(seed: u64, n: usize, size: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..size / 4096) * 4096).collect()
}

/// Runs `cases` over `0..ops` slice by slice, in turn, and returns each case's rate (operations per
/// second) over all its slices. On a shared machine whose speed swings by 2x over seconds, this is
/// what makes two cases comparable: each sees the same load as the others within milliseconds. The
/// order rotates every slice, so no case always runs right after the same other one (and inherits
/// its cache state).
///
/// Time is the calling thread's CPU time (user and kernel), not the wall clock: on a machine shared
/// with other engineers' builds, a slice during which the thread was preempted would otherwise be
/// charged the other processes' time, and that noise was as large as the differences measured.
/// Everything a synchronous `pread`/`pwrite` costs is the calling thread's CPU time, so nothing of
/// either side is left out (asynchronous writeback by the kernel's flusher threads is left out for
/// both, as it was with the wall clock when a core was free).
pub fn interleaved<const N: usize>(
    ops: usize,
    slice: usize,
    cases: &mut [&mut dyn FnMut(Range<usize>); N],
) -> [f64; N] {
    let mut spent = [Duration::ZERO; N];
    for (k, start) in (0..ops).step_by(slice).enumerate() {
        let part = start..(start + slice).min(ops);
        for i in 0..N {
            let case = (i + k) % N;
            let t = thread_cpu_time();
            cases[case](part.clone());
            spent[case] += thread_cpu_time() - t;
        }
    }
    spent.map(|d| ops as f64 / d.as_secs_f64())
}

/// CPU time used by the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One block-sized I/O buffer, aligned like a page.
///
/// Both sides of a comparison read into one of these: the kernel's copy out of the page cache
/// (`rep movsb`) runs at a speed that depends on where the destination sits within a page
/// (measured here: a cached 4 KiB `pread` into a buffer 16 bytes past a page boundary took 2.2 us,
/// at 0, 64, 368 or 2048 bytes past it 0.82 us), and two `vec![0; 4096]`s land wherever the
/// allocator puts them, so one side could pay for its buffer's address rather than for its work.
#[repr(C, align(4096))]
pub struct PageBuf(pub [u8; 4096]);

impl PageBuf {
    pub fn new() -> Box<PageBuf> {
        Box::new(PageBuf([0; 4096]))
    }
}
