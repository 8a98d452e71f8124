//! How fast the copy goes: as fast as the replicas take it while the guest is idle, yielding to a
//! busy guest ([`CopyPacer`]), with the target flushed along the way so the final drain stays short
//! ([`TargetWriteback`]).

use std::time::{Duration, Instant};

use basalt_proto::client::ClientError;
use basalt_proto::frame::Extent;

use crate::volume::Volume;

use super::delta::copy_len;
use super::replicas::Pair;
use super::{RebuildError, BLOCK, MAX_COPY};

/// Copies in flight at once during a rebuild: enough to keep a replica busy
/// over loopback without starving guest I/O of the core's attention. Small
/// copies need no more, because they are gathered into copies of
/// [`COPY_EXTENTS`] blocks: deeper only queues thousands of scattered reads
/// on the sources' blocking pools while the target waits for its first
/// write (`benches/README.md`, "Rebuild").
const COPY_DEPTH: usize = 16;

/// Bytes of copies in flight while the guest is busy (see [`CopyPacer`]):
/// two 1 MiB copies, or up to [`COPY_DEPTH`] smaller ones.
const BUSY_COPY_BYTES: u64 = 2 * MAX_COPY;

/// Bytes a second the copy may take while the guest is busy (see
/// [`CopyPacer`]): 1 GiB in 8 s, inside the 15 s goal for a rebuild under
/// load with room for its drains.
const BUSY_COPY_RATE: u64 = 128 << 20;

/// Guest I/Os per second from which the copy yields to the guest: well
/// above a guest that only ticks (a filesystem's periodic commit), well
/// below one that does real work.
const BUSY_GUEST_IOPS: f64 = 200.0;

/// How often the copy looks at the guest's rate: often enough to yield
/// within a few I/Os' time of a burst, long enough to count a rate.
const PACE_INTERVAL: Duration = Duration::from_millis(100);

/// Bytes copied between two flushes of the target during the copy (see
/// [`TargetWriteback`]): written back in well under the 200 ms a guest I/O
/// may stall, on the disks we measure on, and few enough flushes (16 per
/// GiB) that their fixed cost does not count.
const TARGET_FLUSH_BYTES: u64 = 64 << 20;

/// Flushes of the target while the copy goes on, one every
/// [`TARGET_FLUSH_BYTES`] copied, each running while the next bytes are
/// copied. Durability is the final drain's business; these only keep the
/// target's unwritten page cache small. Without them a full rebuild leaves
/// the whole copy dirty on the target, and the drain's flush writes it back
/// in one go: every guest write waits for the write-only target too, and
/// the target's writes queue behind that writeback, so the guest stalls
/// just before the replica turns RW (`benches/README.md`, "Rebuild").
///
/// The flushes travel on the rebuild's own connection to the target, not
/// through the volume: the target is off any shared flush numbering from
/// step 3 until the final drain, so flushes of its own number nothing anyone
/// relies on, and each is awaited before that drain.
#[derive(Default)]
pub(super) struct TargetWriteback {
    since_flush: u64,
    flushing: Option<tokio::task::JoinHandle<Result<basalt_proto::Revision, ClientError>>>,
}

impl TargetWriteback {
    /// `bytes` more were copied; starts a flush once enough have been since
    /// the last one (after waiting for that one, so one runs at a time).
    pub(super) async fn copied(&mut self, bytes: u64, replicas: &Pair) -> Result<(), RebuildError> {
        self.since_flush += bytes;
        if self.since_flush < TARGET_FLUSH_BYTES {
            return Ok(());
        }
        self.finish(replicas).await?;
        self.since_flush = 0;
        self.flushing = Some(tokio::spawn(replicas.target.flush()));
        Ok(())
    }

    /// Waits for the flush in progress, if any.
    pub(super) async fn finish(&mut self, replicas: &Pair) -> Result<(), RebuildError> {
        let Some(flushing) = self.flushing.take() else {
            return Ok(());
        };
        match flushing.await {
            Ok(flushed) => flushed
                .map(drop)
                .map_err(replicas.on_target("flushing what was copied so far")),
            Err(e) => Err(RebuildError::Volume(format!(
                "the flush of {} during its copy did not finish: {e}",
                replicas.addr
            ))),
        }
    }
}

/// Copies in flight for copies of `average` bytes with `budget` bytes in
/// flight: at least one, at most [`COPY_DEPTH`].
fn copy_depth(average: u64, budget: u64) -> usize {
    let depth = budget / average.max(BLOCK);
    usize::try_from(depth).unwrap_or(usize::MAX).clamp(1, COPY_DEPTH)
}

/// How fast the copy may go, from how busy the guest is.
///
/// Idle, the copy runs as fast as the replicas take it: [`COPY_DEPTH`]
/// copies of [`MAX_COPY`] bytes' worth in flight. While the guest does I/O
/// the copy yields: at most [`BUSY_COPY_BYTES`] in flight and
/// [`BUSY_COPY_RATE`] bytes a second. On a small machine the copy and the
/// guest share the same cores (controller, replicas, loopback): a copy at
/// full speed leaves the guest a small fraction of its IOPS, and bounding
/// the bytes in flight alone is not enough, against a goal of keeping half.
/// A rebuild under load has a 15 s goal for 1 GiB and needs far less at full
/// speed, so there is time to give back (`benches/README.md`, "Rebuild").
/// The guest's rate is read from the volume's own I/O counters every
/// [`PACE_INTERVAL`].
pub(super) struct CopyPacer<'a> {
    volume: &'a Volume,
    idle_depth: usize,
    busy_depth: usize,
    busy: bool,
    last: (Instant, u64),
    /// While busy: when the bytes started so far are paid for at [`BUSY_COPY_RATE`].
    next_at: Instant,
}

impl<'a> CopyPacer<'a> {
    pub(super) fn new(volume: &'a Volume, copies: &[Vec<Extent>]) -> CopyPacer<'a> {
        let bytes: u64 = copies.iter().map(|c| copy_len(c)).sum();
        let average = bytes / (copies.len() as u64).max(1);
        let mut pacer = CopyPacer {
            volume,
            idle_depth: copy_depth(average, COPY_DEPTH as u64 * MAX_COPY),
            busy_depth: copy_depth(average, BUSY_COPY_BYTES),
            busy: false,
            last: (Instant::now(), 0),
            next_at: Instant::now(),
        };
        pacer.last.1 = pacer.guest_ops();
        pacer
    }

    fn guest_ops(&self) -> u64 {
        let m = &self.volume.metrics;
        m.counter(&m.ops, "write") + m.counter(&m.ops, "read")
    }

    /// Copies allowed in flight now.
    pub(super) fn depth(&mut self) -> usize {
        let now = Instant::now();
        let elapsed = now - self.last.0;
        if elapsed >= PACE_INTERVAL {
            let ops = self.guest_ops();
            let rate = (ops - self.last.1.min(ops)) as f64 / elapsed.as_secs_f64();
            self.busy = rate >= BUSY_GUEST_IOPS;
            self.last = (now, ops);
        }
        if self.busy {
            self.busy_depth
        } else {
            self.idle_depth
        }
    }

    /// When the next copy may start, if the guest is busy and the copies
    /// started so far have used up its share until then.
    pub(super) fn held_until(&self) -> Option<Instant> {
        (self.busy && self.next_at > Instant::now()).then_some(self.next_at)
    }

    /// A copy of `bytes` starts now.
    pub(super) fn spend(&mut self, bytes: u64) {
        if self.busy {
            let cost = Duration::from_secs_f64(bytes as f64 / BUSY_COPY_RATE as f64);
            self.next_at = self.next_at.max(Instant::now()) + cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_in_flight_are_bounded_in_number_and_while_the_guest_is_busy_in_bytes() {
        let idle = |average| copy_depth(average, COPY_DEPTH as u64 * MAX_COPY);
        assert_eq!(idle(1 << 20), COPY_DEPTH, "16 MiB in flight");
        assert_eq!(idle(64 * 4096), COPY_DEPTH, "scattered blocks, 64 to a copy");
        assert_eq!(idle(4096), COPY_DEPTH);
        assert_eq!(idle(0), COPY_DEPTH);
        let busy = |average| copy_depth(average, BUSY_COPY_BYTES);
        assert_eq!(busy(1 << 20), 2, "a busy guest leaves two 1 MiB copies in flight");
        assert_eq!(busy(64 * 4096), 8, "or eight copies of 64 scattered blocks");
        assert_eq!(busy(4096), COPY_DEPTH, "and never more copies than when idle");
        assert_eq!(busy(4 << 20), 1, "at least one");
    }
}
