//! QoS: a volume's IOPS and bandwidth limits, enforced by token buckets on
//! admission to the volume core.
//!
//! ```text
//!  initiator ops ──► Throttle::offer ──► read lane  (FIFO) ─┐
//!                                  └──► write lane (FIFO) ─┼──► admitted ──► VolumeCore
//!  timer (Throttle::wake_at) ──► Throttle::release ─────────┘
//!
//!  buckets:  read-iops  read-bps   ─ read lane only
//!            write-iops write-bps  ─ write lane only
//!            iops       bps        ─ shared by both lanes
//! ```
//!
//! Each configured limit is a token bucket: it fills at `rate` tokens a
//! second up to `burst` tokens (one token is one I/O for an IOPS limit, one
//! byte for a bandwidth limit). An op is admitted when every bucket it draws
//! from holds its cost; otherwise it waits in its direction's lane, in
//! arrival order, and the owner task's timer wakes at [`Throttle::wake_at`],
//! the exact instant the oldest waiting op's buckets will hold enough.
//! Nothing here sleeps or reads a clock: every call takes the `Instant` it
//! happens at, so the whole policy is a unit and property test.
//!
//! Decisions, and why:
//! * **An op larger than the burst** (a 1 MiB write under a 256 KiB burst)
//!   is admitted once the bucket is full, and leaves the bucket in debt:
//!   the ops after it wait until the debt is paid. It never deadlocks, and the
//!   long-run rate holds. Over any window, a bucket admits at most
//!   `rate × window + max(burst, largest op)`.
//! * **What counts.** A read is one read op and its length in bytes; a write
//!   one write op and its length. UNMAP is one write op and no bytes: it moves
//!   no data (the replicas punch holes), and charging the range would make a
//!   discard of a whole disk under a bandwidth limit take hours. WRITE SAME
//!   counts as the writes the controller turns it into (one per 1 MiB chunk,
//!   with its bytes): each costs the replicas a real write. COMPARE AND WRITE
//!   is the read and the write it is made of. Flushes take no tokens.
//! * **Order.** Each direction's lane is FIFO, and a flush waits in the write
//!   lane behind every write queued before it: a flush completes only after
//!   the writes the initiator submitted before it, as it would without a
//!   limit (SCSI lets a target complete concurrent commands in any order,
//!   but an initiator that sends a SYNCHRONIZE CACHE with writes still in
//!   flight most likely means them too). A throttled volume pays for this only
//!   in flush latency. Reads do not wait behind throttled writes (nor writes
//!   behind reads): ops in flight together carry no order in SCSI, and a read
//!   limit must not slow writes down. The core keeps its own invariants for
//!   whatever is admitted: the lanes only decide *when* an op reaches it.
//! * **Shared buckets.** When the oldest waiting op lacks tokens of a shared
//!   bucket (`iops`, `bps`), the other lane may not take from that bucket
//!   until it is admitted: a stream of small reads cannot starve a large
//!   write. Each lane is FIFO, so nothing starves.
//! * **Not throttled:** rebuild copies, snapshot operations, drains and
//!   settles. They are the volume's own work, and holding them back would
//!   lengthen the window in which a replica is missing.
//! * **Default burst:** one second's worth of the rate: a short spike (a
//!   journal commit, a boot) runs at full speed, and no window of a second
//!   or more gets more than twice the limit. A smaller burst must still hold
//!   10 ms of the rate (see [`Limit::new`]).

use std::collections::VecDeque;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

/// Bucket levels are kept in token-nanoseconds, so that a refill (elapsed
/// nanoseconds × tokens per second) is exact integer arithmetic.
const NANOS: i128 = 1_000_000_000;

/// The highest IOPS limit accepted: two orders of magnitude above what one
/// controller serves, so any real limit fits and a typo (an extra zero or
/// three) does not silently mean "unlimited".
pub const MAX_IOPS: u64 = 10_000_000;

/// The highest bandwidth limit accepted, bytes per second: above any array
/// or 400 GbE link feeding one volume.
pub const MAX_BPS: u64 = 100 << 30;

/// The lowest bandwidth limit: one 4 KiB block (the replicas' block) a
/// second. Anything lower is a mistake rather than a limit.
pub const MIN_BPS: u64 = 4096;

/// The smallest bandwidth burst: one 4 KiB block, the smallest I/O that an
/// aligned initiator sends. (Larger I/Os than the burst still pass, in debt.)
pub const MIN_BPS_BURST: u64 = 4096;

/// The largest burst accepted: a minute at the highest rate. Bursts are
/// credit, and more than this is a typo, not a policy.
const MAX_BURST_SECS: u64 = 60;

/// A burst must hold at least this long at the rate. The owner task's timer
/// has a 1 ms granularity and, on a loaded host, wakes several milliseconds
/// late; a bucket that fills within that time overflows while the task
/// sleeps, and the volume gets less than its limit.
const MIN_BURST_DIVISOR: u64 = 100; // 1 s / 100 = 10 ms

/// The default burst, in seconds of the rate (see the module docs).
const DEFAULT_BURST_SECS: u64 = 1;

/// The direction an op is accounted (and queued) in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Read,
    Write,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Read, Direction::Write];

    /// For metrics labels and `volume info`.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }

    /// 0 for reads, 1 for writes: for per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::Read => 0,
            Direction::Write => 1,
        }
    }
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Ops,
    Bytes,
}

/// The six limits a volume can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    ReadIops,
    WriteIops,
    Iops,
    ReadBps,
    WriteBps,
    Bps,
}

impl LimitKind {
    pub const ALL: [LimitKind; 6] = [
        LimitKind::ReadIops,
        LimitKind::WriteIops,
        LimitKind::Iops,
        LimitKind::ReadBps,
        LimitKind::WriteBps,
        LimitKind::Bps,
    ];

    /// The name in flags (`--qos-read-iops`, `volume qos --read-iops`).
    pub fn flag(self) -> &'static str {
        match self {
            LimitKind::ReadIops => "read-iops",
            LimitKind::WriteIops => "write-iops",
            LimitKind::Iops => "iops",
            LimitKind::ReadBps => "read-bps",
            LimitKind::WriteBps => "write-bps",
            LimitKind::Bps => "bps",
        }
    }

    /// The name in the API, JSON and metrics labels.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::ReadIops => "read_iops",
            LimitKind::WriteIops => "write_iops",
            LimitKind::Iops => "iops",
            LimitKind::ReadBps => "read_bps",
            LimitKind::WriteBps => "write_bps",
            LimitKind::Bps => "bps",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            LimitKind::ReadIops | LimitKind::WriteIops | LimitKind::Iops => Unit::Ops,
            LimitKind::ReadBps | LimitKind::WriteBps | LimitKind::Bps => Unit::Bytes,
        }
    }

    /// The one direction this limit applies to; `None` for the totals,
    /// which both directions draw from.
    pub fn direction(self) -> Option<Direction> {
        match self {
            LimitKind::ReadIops | LimitKind::ReadBps => Some(Direction::Read),
            LimitKind::WriteIops | LimitKind::WriteBps => Some(Direction::Write),
            LimitKind::Iops | LimitKind::Bps => None,
        }
    }

    /// Accepted rates (per second).
    pub fn rate_range(self) -> RangeInclusive<u64> {
        match self.unit() {
            Unit::Ops => 1..=MAX_IOPS,
            Unit::Bytes => MIN_BPS..=MAX_BPS,
        }
    }

    /// Accepted bursts, whatever the rate (see also [`Limit::new`]).
    pub fn burst_range(self) -> RangeInclusive<u64> {
        match self.unit() {
            Unit::Ops => 1..=MAX_IOPS * MAX_BURST_SECS,
            Unit::Bytes => MIN_BPS_BURST..=MAX_BPS * MAX_BURST_SECS,
        }
    }

    /// `rate` if this limit accepts it.
    pub fn check_rate(self, rate: u64) -> Result<u64, QosError> {
        let range = self.rate_range();
        if range.contains(&rate) {
            return Ok(rate);
        }
        Err(QosError::Rate {
            kind: self,
            value: rate,
            unit: self.unit(),
            range,
        })
    }

    /// `burst` if it is in this limit's range (what it must be at a given
    /// rate is [`Limit::new`]'s to check).
    pub fn check_burst(self, burst: u64) -> Result<u64, QosError> {
        let range = self.burst_range();
        if range.contains(&burst) {
            return Ok(burst);
        }
        Err(QosError::Burst {
            kind: self,
            value: burst,
            unit: self.unit(),
            range,
        })
    }

    fn index(self) -> usize {
        self as usize
    }

    /// How much of this limit's tokens `cost` takes.
    fn amount(self, cost: &Cost) -> u64 {
        if self.direction().is_some_and(|d| d != cost.direction) {
            return 0;
        }
        match self.unit() {
            Unit::Ops => cost.ops,
            Unit::Bytes => cost.bytes,
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::ReadIops => "read IOPS",
            LimitKind::WriteIops => "write IOPS",
            LimitKind::Iops => "total IOPS",
            LimitKind::ReadBps => "read bandwidth",
            LimitKind::WriteBps => "write bandwidth",
            LimitKind::Bps => "total bandwidth",
        })
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Ops => "I/Os",
            Unit::Bytes => "bytes",
        })
    }
}

/// Which number of a limit was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Rate,
    Burst,
}

/// Why a limit was refused. Each names the limit and the accepted range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error(
        "{value} is not an accepted {kind} limit: use {} to {} {unit} per second (to have no limit, leave it out)",
        range.start(), range.end()
    )]
    Rate {
        kind: LimitKind,
        value: u64,
        unit: Unit,
        range: RangeInclusive<u64>,
    },
    #[error("{value} is not an accepted {kind} burst: use {} to {} {unit}", range.start(), range.end())]
    Burst {
        kind: LimitKind,
        value: u64,
        unit: Unit,
        range: RangeInclusive<u64>,
    },
    #[error(
        "a {kind} burst of {burst} {unit} is less than 10 ms at the limit of {rate} {unit} per second: the bucket \
         would overflow between two admissions and the volume would get less than its limit; use a burst of at \
         least {min} (or leave it out: the default is one second's worth)"
    )]
    BurstBelowRate {
        kind: LimitKind,
        rate: u64,
        burst: u64,
        min: u64,
        unit: Unit,
    },
}

impl QosError {
    pub fn kind(&self) -> LimitKind {
        match self {
            QosError::Rate { kind, .. }
            | QosError::Burst { kind, .. }
            | QosError::BurstBelowRate { kind, .. } => *kind,
        }
    }

    pub fn part(&self) -> Part {
        match self {
            QosError::Rate { .. } => Part::Rate,
            QosError::Burst { .. } | QosError::BurstBelowRate { .. } => Part::Burst,
        }
    }
}

/// One checked limit: a rate per second and a burst, both in range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    rate: u64,
    burst: u64,
}

impl Limit {
    /// A limit of `rate` per second with `burst` (default: one second's
    /// worth), checked against `kind`'s ranges.
    pub fn new(kind: LimitKind, rate: u64, burst: Option<u64>) -> Result<Limit, QosError> {
        let unit = kind.unit();
        kind.check_rate(rate)?;
        let burst = kind.check_burst(burst.unwrap_or(rate * DEFAULT_BURST_SECS))?;
        let min = rate.div_ceil(MIN_BURST_DIVISOR);
        if burst < min {
            return Err(QosError::BurstBelowRate {
                kind,
                rate,
                burst,
                min,
                unit,
            });
        }
        Ok(Limit { rate, burst })
    }

    pub fn rate(self) -> u64 {
        self.rate
    }

    pub fn burst(self) -> u64 {
        self.burst
    }
}

/// The limits of one volume: any of the six, or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits([Option<Limit>; 6]);

impl QosLimits {
    pub fn get(&self, kind: LimitKind) -> Option<Limit> {
        self.0[kind.index()]
    }

    pub fn set(&mut self, kind: LimitKind, limit: Option<Limit>) {
        self.0[kind.index()] = limit;
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The limits set, in [`LimitKind::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (LimitKind, Limit)> + '_ {
        LimitKind::ALL
            .into_iter()
            .filter_map(|k| self.get(k).map(|l| (k, l)))
    }

    /// These limits after `change`.
    pub fn changed(&self, change: &QosChange) -> QosLimits {
        let mut next = if change.clear { QosLimits::default() } else { *self };
        for (kind, limit) in change.set.iter() {
            next.set(kind, Some(limit));
        }
        next
    }
}

impl fmt::Display for QosLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .iter()
            .map(|(k, l)| format!("{} {} (burst {})", k.flag(), l.rate, l.burst))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// A change of limits at run time: the limits in `set` replace those of the
/// same kind; with `clear`, every other limit is removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosChange {
    pub clear: bool,
    pub set: QosLimits,
}

/// What one op takes from the buckets (see the module docs for why).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    pub direction: Direction,
    pub ops: u64,
    pub bytes: u64,
}

impl Cost {
    pub fn read(bytes: u64) -> Cost {
        Cost {
            direction: Direction::Read,
            ops: 1,
            bytes,
        }
    }

    pub fn write(bytes: u64) -> Cost {
        Cost {
            direction: Direction::Write,
            ops: 1,
            bytes,
        }
    }

    /// No tokens; ordered in the write lane.
    pub const FLUSH: Cost = Cost {
        direction: Direction::Write,
        ops: 0,
        bytes: 0,
    };

    /// One write op, no bytes: an unmap moves no data.
    pub const UNMAP: Cost = Cost {
        direction: Direction::Write,
        ops: 1,
        bytes: 0,
    };
}

/// One limit's token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    limit: Limit,
    /// Tokens × [`NANOS`]; negative while in debt.
    level: i128,
    /// When `level` was last brought up to date.
    at: Instant,
}

impl TokenBucket {
    /// A bucket holding its whole burst.
    pub fn full(limit: Limit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            level: i128::from(limit.burst) * NANOS,
            at: now,
        }
    }

    fn cap(&self) -> i128 {
        i128::from(self.limit.burst) * NANOS
    }

    fn refill(&mut self, now: Instant) {
        // Instants never go back, but a caller's may be older than ours: the
        // bucket then stays as it is.
        if now > self.at {
            let elapsed = (now - self.at).as_nanos() as i128;
            self.level = (self.level + elapsed * i128::from(self.limit.rate)).min(self.cap());
            self.at = now;
        }
    }

    /// What must be in the bucket before `amount` is taken: the amount, or a
    /// full bucket for an amount above the burst (which then leaves a debt).
    fn need(&self, amount: u64) -> i128 {
        i128::from(amount.min(self.limit.burst)) * NANOS
    }

    /// Whether `amount` may be taken at `now`.
    pub fn ready(&mut self, amount: u64, now: Instant) -> bool {
        self.refill(now);
        amount == 0 || self.level >= self.need(amount)
    }

    /// Take `amount` (after [`TokenBucket::ready`] said yes).
    pub fn take(&mut self, amount: u64) {
        self.level -= i128::from(amount) * NANOS;
    }

    /// When `amount` may be taken, as of the last refill.
    pub fn ready_at(&self, amount: u64) -> Instant {
        let deficit = self.need(amount) - self.level;
        if amount == 0 || deficit <= 0 {
            return self.at;
        }
        let rate = i128::from(self.limit.rate);
        let wait = u64::try_from((deficit + rate - 1) / rate).unwrap_or(u64::MAX);
        self.at
            .checked_add(Duration::from_nanos(wait))
            // Unreachable with checked limits (a debt is at most one op);
            // an hour still wakes the owner to look again.
            .unwrap_or(self.at + Duration::from_secs(3600))
    }

    /// Change the limit; the tokens (or debt) carry over, up to the new burst.
    fn relimit(&mut self, limit: Limit, now: Instant) {
        self.refill(now);
        self.limit = limit;
        self.level = self.level.min(self.cap());
    }
}

/// An op admitted by the throttle, and how long it waited.
#[derive(Debug)]
pub struct Admitted<T> {
    pub item: T,
    pub direction: Direction,
    pub waited: Duration,
}

struct Waiting<T> {
    seq: u64,
    cost: Cost,
    since: Instant,
    item: T,
}

/// Where a lane's oldest op stands.
enum Head {
    Ready,
    /// Waits until `until`; `shared` if a shared bucket is short.
    Blocked {
        until: Instant,
        shared: bool,
    },
    /// Waits for an older op of the other lane to take a shared bucket first.
    Held,
}

/// The admission queue: limits, their buckets, and the ops waiting for them
/// (`T` is whatever the caller needs back when an op is admitted).
pub struct Throttle<T> {
    limits: QosLimits,
    buckets: [Option<TokenBucket>; 6],
    lanes: [VecDeque<Waiting<T>>; 2],
    next_seq: u64,
    wake: Option<Instant>,
}

impl<T> Throttle<T> {
    pub fn new(limits: QosLimits, now: Instant) -> Throttle<T> {
        let mut t = Throttle {
            limits: QosLimits::default(),
            buckets: Default::default(),
            lanes: Default::default(),
            next_seq: 0,
            wake: None,
        };
        t.set_limits(limits, now, &mut Vec::new());
        t
    }

    pub fn limits(&self) -> QosLimits {
        self.limits
    }

    /// Ops waiting in `direction`'s lane.
    pub fn waiting(&self, direction: Direction) -> usize {
        self.lanes[direction.index()].len()
    }

    /// When the next waiting op can be admitted: call [`Throttle::release`]
    /// then. `None` while nothing waits.
    pub fn wake_at(&self) -> Option<Instant> {
        self.wake
    }

    /// Replace the limits. A limit kept keeps its tokens (up to its new
    /// burst); a new one starts full; ops a removed or raised limit held
    /// back are admitted into `out`.
    pub fn set_limits(&mut self, limits: QosLimits, now: Instant, out: &mut Vec<Admitted<T>>) {
        for kind in LimitKind::ALL {
            let slot = &mut self.buckets[kind.index()];
            *slot = match (slot.take(), limits.get(kind)) {
                (Some(mut bucket), Some(limit)) => {
                    bucket.relimit(limit, now);
                    Some(bucket)
                }
                (None, Some(limit)) => Some(TokenBucket::full(limit, now)),
                (_, None) => None,
            };
        }
        self.limits = limits;
        self.release(now, out);
    }

    /// An op arrives at `now`: admitted into `out` at once if its lane is
    /// empty and its buckets hold its cost, queued otherwise.
    pub fn offer(&mut self, cost: Cost, item: T, now: Instant, out: &mut Vec<Admitted<T>>) {
        let lanes_empty = self.lanes.iter().all(VecDeque::is_empty);
        if lanes_empty && self.limits.is_empty() {
            out.push(Admitted {
                item,
                direction: cost.direction,
                waited: Duration::ZERO,
            });
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.lanes[cost.direction.index()].push_back(Waiting {
            seq,
            cost,
            since: now,
            item,
        });
        self.release(now, out);
    }

    /// Admit into `out`, in order, every waiting op whose buckets hold its
    /// cost at `now`, and set the next wake-up.
    pub fn release(&mut self, now: Instant, out: &mut Vec<Admitted<T>>) {
        loop {
            let mut admitted = false;
            let mut shared_held = false;
            let mut wake: Option<Instant> = None;
            for lane in self.lanes_by_age() {
                let Some(head) = self.lanes[lane].front() else {
                    continue;
                };
                let cost = head.cost;
                match self.head(&cost, shared_held, now) {
                    Head::Ready => {
                        for kind in LimitKind::ALL {
                            if let Some(bucket) = &mut self.buckets[kind.index()] {
                                bucket.take(kind.amount(&cost));
                            }
                        }
                        let w = self.lanes[lane].pop_front().expect("a head exists");
                        out.push(Admitted {
                            item: w.item,
                            direction: cost.direction,
                            waited: now.saturating_duration_since(w.since),
                        });
                        admitted = true;
                        break;
                    }
                    Head::Blocked { until, shared } => {
                        shared_held |= shared;
                        wake = Some(wake.map_or(until, |w| w.min(until)));
                    }
                    Head::Held => {}
                }
            }
            if !admitted {
                self.wake = wake;
                return;
            }
        }
    }

    /// Lane indexes, the one with the oldest head first.
    fn lanes_by_age(&self) -> [usize; 2] {
        let seq = |i: usize| self.lanes[i].front().map_or(u64::MAX, |w| w.seq);
        if seq(0) <= seq(1) {
            [0, 1]
        } else {
            [1, 0]
        }
    }

    fn head(&mut self, cost: &Cost, shared_held: bool, now: Instant) -> Head {
        let mut until: Option<Instant> = None;
        let mut shared = false;
        for kind in LimitKind::ALL {
            let amount = kind.amount(cost);
            let Some(bucket) = &mut self.buckets[kind.index()] else {
                continue;
            };
            if amount == 0 {
                continue;
            }
            if shared_held && kind.direction().is_none() {
                return Head::Held;
            }
            if !bucket.ready(amount, now) {
                let at = bucket.ready_at(amount);
                until = Some(until.map_or(at, |u| u.max(at)));
                shared |= kind.direction().is_none();
            }
        }
        match until {
            None => Head::Ready,
            Some(until) => Head::Blocked { until, shared },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(kind: LimitKind, rate: u64, burst: u64) -> QosLimits {
        let mut l = QosLimits::default();
        l.set(kind, Some(Limit::new(kind, rate, Some(burst)).unwrap()));
        l
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn items<T>(out: &mut Vec<Admitted<T>>) -> Vec<T> {
        out.drain(..).map(|a| a.item).collect()
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_one_op_per_refill() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limit(LimitKind::WriteIops, 100, 3), t0);
        let mut out = Vec::new();
        for i in 0..5 {
            t.offer(Cost::write(4096), i, t0, &mut out);
        }
        assert_eq!(items(&mut out), vec![0, 1, 2]);
        assert_eq!(t.waiting(Direction::Write), 2);
        // One token every 10 ms: the timer is asked for exactly then.
        assert_eq!(t.wake_at(), Some(ms(t0, 10)));
        t.release(ms(t0, 9), &mut out);
        assert!(out.is_empty());
        t.release(ms(t0, 10), &mut out);
        assert_eq!(items(&mut out), vec![3]);
        assert_eq!(t.wake_at(), Some(ms(t0, 20)));
        t.release(ms(t0, 20), &mut out);
        assert_eq!(out[0].item, 4);
        assert_eq!(out[0].waited, Duration::from_millis(20));
        assert_eq!(t.wake_at(), None);
    }

    #[test]
    fn an_io_larger_than_the_burst_is_admitted_when_full_and_leaves_a_debt() {
        let t0 = Instant::now();
        // 1 MiB/s, 256 KiB burst; a 1 MiB write passes at once, in debt.
        let mut t = Throttle::new(limit(LimitKind::WriteBps, 1 << 20, 256 << 10), t0);
        let mut out = Vec::new();
        t.offer(Cost::write(1 << 20), "big", t0, &mut out);
        assert_eq!(items(&mut out), vec!["big"]);
        // The next 4 KiB waits for the 768 KiB debt and its own 4 KiB.
        t.offer(Cost::write(4096), "small", t0, &mut out);
        assert!(out.is_empty());
        let expected = Duration::from_nanos(((768u64 << 10) + 4096) * 1_000_000_000 / (1 << 20));
        assert_eq!(t.wake_at(), Some(t0 + expected));
        t.release(t0 + expected, &mut out);
        assert_eq!(items(&mut out), vec!["small"]);
    }

    #[test]
    fn a_flush_waits_behind_throttled_writes_and_takes_no_tokens() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limit(LimitKind::WriteIops, 10, 1), t0);
        let mut out = Vec::new();
        t.offer(Cost::write(4096), "w1", t0, &mut out);
        t.offer(Cost::write(4096), "w2", t0, &mut out);
        t.offer(Cost::FLUSH, "flush", t0, &mut out);
        assert_eq!(items(&mut out), vec!["w1"]);
        t.release(ms(t0, 100), &mut out);
        // The flush goes with the write before it: it needs no token.
        assert_eq!(items(&mut out), vec!["w2", "flush"]);
        // With the lane empty, a flush passes at once even with no tokens.
        t.offer(Cost::FLUSH, "flush2", ms(t0, 100), &mut out);
        assert_eq!(items(&mut out), vec!["flush2"]);
    }

    #[test]
    fn reads_are_not_held_behind_throttled_writes() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limit(LimitKind::WriteIops, 10, 1), t0);
        let mut out = Vec::new();
        t.offer(Cost::write(4096), "w1", t0, &mut out);
        t.offer(Cost::write(4096), "w2", t0, &mut out);
        t.offer(Cost::read(4096), "r", t0, &mut out);
        assert_eq!(items(&mut out), vec!["w1", "r"]);
        assert_eq!(t.waiting(Direction::Write), 1);
    }

    #[test]
    fn a_shared_limit_goes_to_the_oldest_waiter_so_small_reads_cannot_starve_a_big_write() {
        let t0 = Instant::now();
        // 1 MiB/s in total, 1 MiB burst. The bucket is emptied, then a 1 MiB
        // write waits for a full bucket while 4 KiB reads keep arriving.
        let mut t = Throttle::new(limit(LimitKind::Bps, 1 << 20, 1 << 20), t0);
        let mut out = Vec::new();
        t.offer(Cost::read(1 << 20), "drain", t0, &mut out);
        t.offer(Cost::write(1 << 20), "write", t0, &mut out);
        assert_eq!(items(&mut out), vec!["drain"]);
        for i in 1..=100 {
            t.offer(Cost::read(4096), "read", ms(t0, i * 5), &mut out);
            assert!(out.is_empty(), "a read took the tokens the older write waits for");
        }
        t.release(ms(t0, 1000), &mut out);
        let admitted = items(&mut out);
        assert_eq!(admitted[0], "write");
        // The reads after it wait their turn behind the debt it left.
        assert!(admitted.len() < 100);
    }

    #[test]
    fn without_limits_every_op_passes_at_once() {
        let t0 = Instant::now();
        let mut t = Throttle::new(QosLimits::default(), t0);
        let mut out = Vec::new();
        for i in 0..1000 {
            t.offer(Cost::write(1 << 20), i, t0, &mut out);
        }
        assert_eq!(out.len(), 1000);
        assert!(out.iter().all(|a| a.waited.is_zero()));
        assert_eq!(t.wake_at(), None);
    }

    #[test]
    fn raising_or_clearing_a_limit_releases_the_ops_it_held() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limit(LimitKind::Iops, 1, 1), t0);
        let mut out = Vec::new();
        for i in 0..4 {
            t.offer(Cost::read(512), i, t0, &mut out);
        }
        assert_eq!(items(&mut out), vec![0]);
        // A changed limit keeps the bucket's level (a thousandth of a token
        // after 1 ms at 1/s): the next op waits for the rest at the new rate.
        t.set_limits(limit(LimitKind::Iops, 1000, 1000), ms(t0, 1), &mut out);
        assert!(out.is_empty());
        assert_eq!(t.wake_at(), Some(t0 + Duration::from_micros(1999)));
        t.release(ms(t0, 2), &mut out);
        assert_eq!(items(&mut out), vec![1]);
        t.set_limits(QosLimits::default(), ms(t0, 2), &mut out);
        assert_eq!(items(&mut out), vec![2, 3]);
        assert_eq!(t.wake_at(), None);
    }

    #[test]
    fn unmap_counts_one_op_and_no_bytes() {
        let t0 = Instant::now();
        let mut limits = limit(LimitKind::WriteBps, MIN_BPS, MIN_BPS_BURST);
        limits.set(
            LimitKind::WriteIops,
            Some(Limit::new(LimitKind::WriteIops, 2, Some(2)).unwrap()),
        );
        let mut t = Throttle::new(limits, t0);
        let mut out = Vec::new();
        t.offer(Cost::UNMAP, "unmap 1", t0, &mut out);
        t.offer(Cost::UNMAP, "unmap 2", t0, &mut out);
        t.offer(Cost::UNMAP, "unmap 3", t0, &mut out);
        assert_eq!(items(&mut out), vec!["unmap 1", "unmap 2"]);
        assert_eq!(t.wake_at(), Some(ms(t0, 500)));
    }

    #[test]
    fn limits_of_zero_absurd_size_or_a_burst_under_10_ms_are_refused_with_the_range() {
        let e = Limit::new(LimitKind::WriteIops, 0, None).unwrap_err();
        assert_eq!((e.kind(), e.part()), (LimitKind::WriteIops, Part::Rate));
        assert!(e.to_string().contains("1 to 10000000"), "{e}");
        assert!(Limit::new(LimitKind::Iops, MAX_IOPS + 1, None).is_err());
        assert!(Limit::new(LimitKind::Bps, MAX_BPS + 1, None).is_err());
        assert!(Limit::new(LimitKind::ReadBps, 1000, None)
            .unwrap_err()
            .to_string()
            .contains("4096 to"));
        let e = Limit::new(LimitKind::ReadIops, 100_000, Some(10)).unwrap_err();
        assert_eq!(e.part(), Part::Burst);
        assert!(e.to_string().contains("at least 1000"), "{e}");
        assert!(Limit::new(LimitKind::Bps, 1 << 20, Some(1000)).is_err());
        assert!(Limit::new(LimitKind::Iops, 1, Some(MAX_IOPS * 61)).is_err());
        // The default burst is one second's worth.
        assert_eq!(
            Limit::new(LimitKind::Bps, 50 << 20, None).unwrap().burst(),
            50 << 20
        );
        assert_eq!(Limit::new(LimitKind::Iops, 1, None).unwrap().burst(), 1);
    }

    #[test]
    fn a_change_replaces_the_limits_it_names_and_clear_drops_the_others() {
        let read = limit(LimitKind::ReadIops, 100, 100);
        let write = limit(LimitKind::WriteIops, 200, 200);
        let both = read.changed(&QosChange {
            clear: false,
            set: write,
        });
        assert_eq!(both.iter().count(), 2);
        let only_write = both.changed(&QosChange {
            clear: true,
            set: write,
        });
        assert_eq!(only_write, write);
        assert!(both
            .changed(&QosChange {
                clear: true,
                set: QosLimits::default()
            })
            .is_empty());
        assert_eq!(write.to_string(), "write-iops 200 (burst 200)");
    }

    /// One op of a generated workload: a gap before it, and what it is.
    #[derive(Clone, Debug)]
    struct Op {
        gap_us: u64,
        cost: Cost,
    }

    fn op() -> impl Strategy<Value = Op> {
        (0..20_000u64, 0..4u8, 1..=2048u64).prop_map(|(gap_us, kind, sectors)| {
            let bytes = sectors * 512;
            let cost = match kind {
                0 => Cost::read(bytes),
                1 => Cost::write(bytes),
                2 => Cost::FLUSH,
                _ => Cost::UNMAP,
            };
            Op { gap_us, cost }
        })
    }

    fn limits() -> impl Strategy<Value = QosLimits> {
        let one = |kind: LimitKind| {
            let (rates, min_burst) = match kind.unit() {
                Unit::Ops => (1..=5_000u64, 1u64),
                Unit::Bytes => (MIN_BPS..=20 << 20, MIN_BPS_BURST),
            };
            proptest::option::of((rates, 0..=200u64).prop_map(move |(rate, pct)| {
                let burst = (rate * pct / 100)
                    .max(rate.div_ceil(MIN_BURST_DIVISOR))
                    .max(min_burst);
                Limit::new(kind, rate, Some(burst)).expect("generated in range")
            }))
        };
        LimitKind::ALL.map(one).prop_map(|limits| {
            let mut l = QosLimits::default();
            for (kind, limit) in LimitKind::ALL.into_iter().zip(limits) {
                l.set(kind, limit);
            }
            l
        })
    }

    proptest! {
        /// Whatever the limits and the workload: over any window, each bucket
        /// admits at most rate × window + max(burst, largest op); every op is
        /// admitted, in its lane's order; and the last one no later than the
        /// time all the work takes at the limits after the last arrival.
        #[test]
        fn admitted_work_stays_within_rate_and_burst_and_nothing_starves(
            limits in limits(),
            ops in proptest::collection::vec(op(), 1..150),
        ) {
            let t0 = Instant::now();
            let mut t = Throttle::new(limits, t0);
            let mut out = Vec::new();
            let mut admitted: Vec<(Instant, usize)> = Vec::new();
            let mut arrival = t0;
            let mut next = 0;
            let mut turns = 0;
            while next < ops.len() || t.wake_at().is_some() {
                turns += 1;
                prop_assert!(turns < 100_000, "the throttle does not make progress");
                let arrives = (next < ops.len()).then(|| arrival + Duration::from_micros(ops[next].gap_us));
                let now = match (arrives, t.wake_at()) {
                    (Some(a), Some(w)) if w < a => { t.release(w, &mut out); w }
                    (Some(a), _) => {
                        arrival = a;
                        t.offer(ops[next].cost, next, a, &mut out);
                        next += 1;
                        a
                    }
                    (None, Some(w)) => { t.release(w, &mut out); w }
                    (None, None) => unreachable!(),
                };
                admitted.extend(out.drain(..).map(|a| (now, a.item)));
            }
            prop_assert_eq!(admitted.len(), ops.len());
            for d in Direction::ALL {
                let order: Vec<usize> = admitted.iter().map(|a| a.1).filter(|&i| ops[i].cost.direction == d).collect();
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "{:?} lane out of order: {:?}", d, order);
            }
            let mut drain_ns: i128 = 0;
            for (kind, l) in limits.iter() {
                let amounts: Vec<(Instant, i128)> =
                    admitted.iter().map(|&(at, i)| (at, i128::from(kind.amount(&ops[i].cost)))).collect();
                let largest = amounts.iter().map(|a| a.1).max().unwrap_or(0);
                let allowance = i128::from(l.burst()).max(largest) * NANOS;
                for i in 0..amounts.len() {
                    let mut sum = 0;
                    for j in i..amounts.len() {
                        sum += amounts[j].1;
                        let window = (amounts[j].0 - amounts[i].0).as_nanos() as i128;
                        prop_assert!(
                            sum * NANOS <= i128::from(l.rate()) * window + allowance,
                            "{} admitted {} in {} ns at rate {} burst {}", kind, sum, window, l.rate(), l.burst()
                        );
                    }
                }
                let total: i128 = amounts.iter().map(|a| a.1).sum();
                let rate = i128::from(l.rate());
                drain_ns += (total * NANOS + rate - 1) / rate;
            }
            let last = admitted.iter().map(|a| a.0).max().expect("ops were admitted");
            // Each wake-up rounds up to the next nanosecond; a microsecond per op is ample.
            let bound = arrival + Duration::from_nanos(drain_ns as u64) + Duration::from_micros(ops.len() as u64);
            prop_assert!(last <= bound, "last admission {:?} after the bound {:?}", last - t0, bound - t0);
        }
    }
}
