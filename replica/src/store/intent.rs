//! # The write-intent record: which regions were written, and at which flush
//!
//! A replica that returns after an outage needs only what was written while it was away. The replicas
//! that stayed answer that from this record, kept by every store (a source does not know in advance
//! which replica will come back, and a controller that fails over must still be able to ask it):
//!
//! ```text
//!   region (64 KiB)  ->  stamp: the revision of the first flush after its last write
//!   pending          ->  regions written since the last flush marker (stamped by the next flush)
//!   lineage          ->  which flush numbering the revisions belong to (shared after a rebuild)
//!   epochs           ->  under which controller epoch each run of flushes was made
//!   horizon          ->  the oldest revision the record can answer for
//! ```
//!
//! "Which regions may differ from a replica that was last in sync with me at revision X?" is then
//! every region stamped `> X` plus the pending ones. That is exact because revisions number only the
//! flushes of the controller's stream, which every replica places at the same point among the
//! writes: the flushes a replica makes on its own (a snapshot merge's end, a clean shutdown) take
//! no revision (`Store::flush_unnumbered`). Before they did, a merge's flush could number the
//! flushes around it one apart on two replicas, and the answer had to be `>= X`: a whole flush
//! interval of slack, the entire volume when the guest had written it all before flush X.
//!
//! ## Why 64 KiB regions
//!
//! The store's stripe granule: a 4 KiB random write costs one entry, a sequential 1 MiB write 16. A
//! rebuild compares block checksums inside the regions before it copies, so a coarse region costs a
//! 192-byte checksum listing, never extra data copied. With at most [`MAX_REGIONS`] entries (about
//! 48 MiB of memory) the record covers 64 GiB of distinct regions written since the oldest point it
//! answers for; past that it forgets its oldest stamps and raises its horizon, so memory and disk
//! follow what is written, not the volume size (a 64 TiB volume costs what its writes cost).
//!
//! ## Persistence: written with the flush, no fsync of its own
//!
//! The object `intent.log` holds a base frame (lineage, horizon, epochs, region stamps), replaced
//! atomically and synced only on rare events (create, open, rebuild alignment, revert, compaction),
//! followed by one appended frame per flush (its revision, epoch and regions), written while the flush
//! appends its marker and never synced on the flush path (Longhorn's synced per-write revision counter
//! halved its IOPS). A `kill -9` keeps it (the page cache survives). A power loss can lose the tail:
//! frames carry a CRC, the first bad one ends the log, and if the store's revision is then beyond what
//! the record holds, the record raises its horizon past it, so it answers "unknown" (the rebuild
//! compares checksums instead) rather than something too small. Regions written after the last flush
//! are recovered at open from the head log's unflushed tail, which is as durable as those writes, and
//! kept in the base the open writes (a pending frame after it): the open's recovery rewrites the head
//! log without that tail, so a second crash before a flush would otherwise forget them.
//!
//! A failed append never fails the flush: the record stops answering (horizon raised) instead.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use basalt_proto::frame::{BlockRun, SyncPoint, WrittenAnswer};
use basalt_proto::{Epoch, Revision};

use super::backend::{Backend, Object};
use super::StoreError;

/// Blocks per region: 16 blocks = 64 KiB (see the module docs).
pub(crate) const REGION_BLOCKS: u64 = 16;
/// Most region stamps kept; beyond it the oldest are forgotten (see the module docs).
pub(crate) const MAX_REGIONS: usize = 1 << 20;
/// Most runs in one answer: 2^16 runs of 16 bytes is 1 MiB, far below the frame limit.
pub(crate) const MAX_ANSWER_RUNS: usize = 1 << 16;
/// The appended frames are folded into a new base once they outgrow it by this much: replay at open
/// stays proportional to the record, not to the number of flushes ever made.
const COMPACT_SLACK_BYTES: u64 = 4 << 20;

pub(crate) const OBJECT: &str = "intent.log";
const KIND_BASE: u8 = 1;
const KIND_FLUSH: u8 = 2;
/// The regions pending when it was written: after a base (recovery at open rewrites the head log
/// without its unflushed tail) and at an unnumbered flush (its marker ends that tail). After a
/// `kill -9` before the next numbered flush, it is the only place that still says those regions
/// were written. The next flush frame covers them (a flush stamps every pending region), so
/// replaying one empties the pending set.
const KIND_PENDING: u8 = 3;

/// The in-memory record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    lineage: u64,
    /// Answers only for points at or after this revision.
    horizon: u64,
    /// Every flush up to this revision is in the record.
    through: u64,
    /// `(first revision, epoch)`, ascending: flushes from `first` on were made under `epoch`.
    epochs: Vec<(u64, u64)>,
    stamps: BTreeMap<u64, u64>,
    pending: BTreeSet<u64>,
}

impl State {
    fn epoch_at(&self, revision: u64) -> u64 {
        self.epochs
            .iter()
            .rev()
            .find(|(first, _)| *first <= revision)
            .map_or(0, |(_, e)| *e)
    }

    /// Forgets the oldest stamps until at most `MAX_REGIONS` remain.
    fn evict(&mut self) {
        if self.stamps.len() <= MAX_REGIONS {
            return;
        }
        let mut stamps: Vec<u64> = self.stamps.values().copied().collect();
        stamps.sort_unstable();
        // Keep only stamps above the cut: entries sharing the cut's stamp go too, so the record
        // never answers for a revision whose regions it dropped in part.
        let cut = stamps[stamps.len() - MAX_REGIONS];
        self.stamps.retain(|_, s| *s > cut);
        self.horizon = self.horizon.max(cut + 1);
    }

    fn encode_base(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(40 + self.epochs.len() * 16 + self.stamps.len() * 16);
        for v in [self.lineage, self.horizon, self.through, self.epochs.len() as u64] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for (first, epoch) in &self.epochs {
            p.extend_from_slice(&first.to_le_bytes());
            p.extend_from_slice(&epoch.to_le_bytes());
        }
        p.extend_from_slice(&(self.stamps.len() as u64).to_le_bytes());
        for (region, stamp) in &self.stamps {
            p.extend_from_slice(&region.to_le_bytes());
            p.extend_from_slice(&stamp.to_le_bytes());
        }
        frame(KIND_BASE, &p)
    }
}

/// Bytes of a frame besides its payload: length, kind and CRC.
const FRAME_OVERHEAD: usize = 9;

/// `[len u32][kind u8][payload][crc32 of kind + payload]`.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 9);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The frames of `bytes` until the first that is torn or damaged.
fn frames(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let body = bytes.get(at + 4..(at + 5).checked_add(len)?)?;
        let crc = u32::from_le_bytes(bytes.get(at + 5 + len..at + 9 + len)?.try_into().ok()?);
        if crc32fast::hash(body) != crc {
            return None;
        }
        at += 9 + len;
        Some((body[0], &body[1..]))
    })
}

/// Little-endian u64 words of a payload.
struct Words<'a>(&'a [u8]);

impl Words<'_> {
    fn next(&mut self) -> Option<u64> {
        let (w, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*w))
    }
}

fn decode_base(payload: &[u8]) -> Option<State> {
    let mut w = Words(payload);
    let mut state = State {
        lineage: w.next()?,
        horizon: w.next()?,
        through: w.next()?,
        ..State::default()
    };
    for _ in 0..w.next()? {
        state.epochs.push((w.next()?, w.next()?));
    }
    for _ in 0..w.next()? {
        state.stamps.insert(w.next()?, w.next()?);
    }
    w.0.is_empty().then_some(state)
}

/// Applies one flush frame; `None` if it does not decode.
fn apply_flush(state: &mut State, payload: &[u8]) -> Option<()> {
    let mut w = Words(payload);
    let (revision, epoch) = (w.next()?, w.next()?);
    let regions = decode_regions(w.0)?;
    stamp(state, revision, epoch, regions);
    // The flush stamped every region pending before it, those of a pending frame included.
    state.pending.clear();
    Some(())
}

/// The payload of a pending frame: a count and that many regions.
fn encode_regions(regions: &BTreeSet<u64>) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + regions.len() * 8);
    p.extend_from_slice(&(regions.len() as u64).to_le_bytes());
    for region in regions {
        p.extend_from_slice(&region.to_le_bytes());
    }
    p
}

/// A count and that many regions, and nothing after them; `None` otherwise.
fn decode_regions(payload: &[u8]) -> Option<Vec<u64>> {
    let mut w = Words(payload);
    let n = w.next()?;
    let mut regions = Vec::new();
    for _ in 0..n {
        regions.push(w.next()?);
    }
    w.0.is_empty().then_some(regions)
}

fn stamp(state: &mut State, revision: u64, epoch: u64, regions: impl IntoIterator<Item = u64>) {
    for region in regions {
        let s = state.stamps.entry(region).or_insert(revision);
        *s = (*s).max(revision);
    }
    if state.epochs.last().is_none_or(|&(_, e)| e != epoch) {
        state.epochs.push((revision, epoch));
    }
    state.through = state.through.max(revision);
}

fn random_lineage() -> u64 {
    let v = uuid::Uuid::new_v4().as_u64_pair().0;
    // Zero is never a lineage, so a zeroed sync point never matches one.
    v.max(1)
}

struct Inner {
    state: State,
    /// Where the next flush frame goes, `None` once an append failed (the record no longer answers).
    appender: Option<(Arc<dyn Object>, u64)>,
    /// Bytes of the last base frame, for the compaction decision.
    base_len: u64,
}

/// The record (see the module docs). Every method takes `&self`; the store calls the hooks under its
/// chain lock so that a write's region and a flush's marker are ordered alike in memory and on disk.
pub(crate) struct IntentRecord {
    backend: Arc<dyn Backend>,
    inner: std::sync::Mutex<Inner>,
}

impl IntentRecord {
    /// A new record for a new, empty volume: it answers for every point from revision 0 on.
    pub fn create(backend: Arc<dyn Backend>) -> Result<IntentRecord, StoreError> {
        let state = State {
            lineage: random_lineage(),
            ..State::default()
        };
        Self::install(backend, state)
    }

    /// Loads the record of a volume whose store opened at `revision`, with `tail` the blocks its head
    /// log held after its last flush marker. A volume from before this record existed, or one whose
    /// record lost flushes it made (power loss), gets a record that answers only from now on.
    pub fn open(
        backend: Arc<dyn Backend>,
        revision: Revision,
        tail: impl IntoIterator<Item = u64>,
    ) -> Result<IntentRecord, StoreError> {
        let bytes = backend
            .read_blob(OBJECT)
            .map_err(StoreError::io(format!("reading {}/{OBJECT}", backend.location())))?;
        let bytes = bytes.unwrap_or_default();
        let mut state = None;
        // Bytes of whole frames replayed, and of the base among them.
        let (mut replayed, mut base_len) = (0, 0);
        for (kind, payload) in frames(&bytes) {
            let applied = match (kind, state.as_mut()) {
                (KIND_BASE, None) => decode_base(payload).map(|s| {
                    state = Some(s);
                    base_len = FRAME_OVERHEAD + payload.len();
                }),
                (KIND_FLUSH, Some(s)) => apply_flush(s, payload),
                (KIND_PENDING, Some(s)) => decode_regions(payload).map(|regions| s.pending.extend(regions)),
                _ => None,
            };
            if applied.is_none() {
                break;
            }
            replayed += FRAME_OVERHEAD + payload.len();
        }
        let intact = state.is_some() && replayed == bytes.len();
        let mut state = state.unwrap_or_else(|| State {
            lineage: random_lineage(),
            horizon: u64::MAX,
            ..State::default()
        });
        let tail: BTreeSet<u64> = tail.into_iter().map(|lba| lba / REGION_BLOCKS).collect();
        if intact && revision.0 <= state.through && tail.is_empty() {
            // What is on disk is exactly what a rewrite would write: append after it instead of
            // replacing it (a rewrite is three fsyncs of every replica's start).
            return Self::reopen(backend, state, bytes.len() as u64, base_len as u64);
        }
        if revision.0 > state.through {
            tracing::info!(
                revision = revision.0,
                recorded = state.through,
                "write-intent record lacks recent flushes; it answers only for later points"
            );
            // Flushes up to `revision` are lost: points from `revision` on need only later ones.
            state.horizon = state.horizon.max(revision.0);
            state.through = revision.0;
        }
        state.pending.extend(tail);
        Self::install(backend, state)
    }

    /// Opens the record as it is on disk, `len` bytes of intact frames of which the base is
    /// `base_len`, appending after them.
    fn reopen(
        backend: Arc<dyn Backend>,
        state: State,
        len: u64,
        base_len: u64,
    ) -> Result<IntentRecord, StoreError> {
        let object = backend
            .open(OBJECT, 0)
            .map_err(StoreError::io(format!("opening {}/{OBJECT}", backend.location())))?;
        Ok(IntentRecord {
            backend,
            inner: std::sync::Mutex::new(Inner {
                state,
                appender: Some((Arc::from(object), len)),
                base_len,
            }),
        })
    }

    /// Writes `state` as the new base, durably, and opens the appender behind it.
    fn install(backend: Arc<dyn Backend>, state: State) -> Result<IntentRecord, StoreError> {
        let record = IntentRecord {
            backend,
            inner: std::sync::Mutex::new(Inner {
                state,
                appender: None,
                base_len: 0,
            }),
        };
        {
            let mut inner = super::lock(&record.inner);
            record.rewrite(&mut inner)?;
        }
        Ok(record)
    }

    fn rewrite(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let mut base = inner.state.encode_base();
        if !inner.state.pending.is_empty() {
            base.extend_from_slice(&frame(KIND_PENDING, &encode_regions(&inner.state.pending)));
        }
        let what = || format!("{}/{OBJECT}", self.backend.location());
        self.backend
            .replace_blob(OBJECT, &base)
            .map_err(StoreError::io(format!("replacing {}", what())))?;
        let object = self
            .backend
            .open(OBJECT, 0)
            .map_err(StoreError::io(format!("opening {}", what())))?;
        inner.appender = Some((Arc::from(object), base.len() as u64));
        inner.base_len = base.len() as u64;
        Ok(())
    }

    /// A write or discard touched these blocks (the store holds its chain lock shared).
    pub fn note(&self, lbas: impl IntoIterator<Item = u64>) {
        let mut inner = super::lock(&self.inner);
        let mut last = u64::MAX;
        for lba in lbas {
            let region = lba / REGION_BLOCKS;
            if region != last {
                inner.state.pending.insert(region);
                last = region;
            }
        }
    }

    /// An unnumbered flush is being marked (the store holds its chain lock exclusively): its marker
    /// ends the head log's unflushed tail, so the pending regions are appended in a frame of their
    /// own (not synced, like a flush frame) for a reopen to find; the next numbered flush stamps them.
    pub fn keep_pending(&self) {
        let mut inner = super::lock(&self.inner);
        if inner.state.pending.is_empty() {
            return;
        }
        let bytes = frame(KIND_PENDING, &encode_regions(&inner.state.pending));
        let appended = match inner.appender.as_mut() {
            Some((object, len)) => object.write_at(&bytes, *len).map(|()| *len += bytes.len() as u64),
            None => Err(io::Error::other("an earlier append failed")),
        };
        if let Err(e) = appended {
            self.give_up(&mut inner, &e.to_string());
        }
    }

    /// Flush `revision` is being marked under `epoch` (the store holds its chain lock exclusively):
    /// the pending regions get its stamp, and its frame is appended (not synced; see the module docs).
    pub fn commit(&self, revision: Revision, epoch: Epoch) {
        let mut inner = super::lock(&self.inner);
        let regions = std::mem::take(&mut inner.state.pending);
        let mut payload = Vec::with_capacity(24 + regions.len() * 8);
        for v in [revision.0, epoch.0, regions.len() as u64] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        for r in &regions {
            payload.extend_from_slice(&r.to_le_bytes());
        }
        stamp(&mut inner.state, revision.0, epoch.0, regions);
        inner.state.evict();
        let bytes = frame(KIND_FLUSH, &payload);
        let appended = match inner.appender.as_mut() {
            Some((object, len)) => object.write_at(&bytes, *len).map(|()| *len += bytes.len() as u64),
            None => Err(io::Error::other("an earlier append failed")),
        };
        match appended {
            Ok(()) => {
                let len = inner.appender.as_ref().map_or(0, |a| a.1);
                if len > 2 * inner.base_len + COMPACT_SLACK_BYTES {
                    if let Err(e) = self.rewrite(&mut inner) {
                        self.give_up(&mut inner, &e.to_string());
                    }
                }
            }
            Err(e) => self.give_up(&mut inner, &e.to_string()),
        }
    }

    /// The record can no longer be trusted to be complete on disk: it stops answering.
    fn give_up(&self, inner: &mut Inner, why: &str) {
        if inner.appender.take().is_some() {
            tracing::warn!(
                error = why,
                "write-intent record not persisted; rebuilds from this replica compare checksums"
            );
        }
        inner.state.horizon = u64::MAX;
    }

    /// This replica's sync point, at its durable `revision`.
    pub fn position(&self, revision: Revision) -> SyncPoint {
        let inner = super::lock(&self.inner);
        SyncPoint {
            lineage: inner.state.lineage,
            revision,
            epoch: Epoch(inner.state.epoch_at(revision.0)),
        }
    }

    /// The regions that may differ from a replica last in sync at `since` (`None`: at this replica's
    /// own `revision`), listed from block `start` up to `volume_blocks`, at most [`MAX_ANSWER_RUNS`]
    /// runs; also where the answer is complete.
    pub fn written_since(
        &self,
        since: Option<SyncPoint>,
        revision: Revision,
        start: u64,
        volume_blocks: u64,
    ) -> (WrittenAnswer, u64) {
        let inner = super::lock(&self.inner);
        let state = &inner.state;
        let point = since.unwrap_or(SyncPoint {
            lineage: state.lineage,
            revision,
            epoch: Epoch(state.epoch_at(revision.0)),
        });
        let x = point.revision.0;
        let refusal = if point.lineage != state.lineage {
            Some(format!(
                "the point is on flush numbering {:#x}, this replica on {:#x}",
                point.lineage, state.lineage
            ))
        } else if x < state.horizon {
            Some(format!(
                "the record starts at revision {}, the point is {x}",
                state.horizon
            ))
        } else if x > revision.0 {
            Some(format!(
                "the point (revision {x}) is ahead of this replica ({})",
                revision.0
            ))
        } else if state.epoch_at(x) != point.epoch.0 {
            Some(format!(
                "revision {x} was made here under epoch {}, there under epoch {}: the histories split",
                state.epoch_at(x),
                point.epoch.0
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            return (WrittenAnswer::Unknown(why), volume_blocks.max(start));
        }
        // Flush X is the same point of the stream on every replica (see the module docs): what was
        // stamped with X was written before it, on the replica at X too.
        let threshold = x.saturating_add(1);
        let first = start / REGION_BLOCKS;
        let stamped = state
            .stamps
            .range(first..)
            .filter(|(_, &s)| s >= threshold)
            .map(|(&r, _)| r);
        let pending = state.pending.range(first..).copied();
        let mut regions: Vec<u64> = stamped.chain(pending).collect();
        regions.sort_unstable();
        regions.dedup();
        let mut runs: Vec<BlockRun> = Vec::new();
        let mut end = volume_blocks.max(start);
        for region in regions {
            let lba = (region * REGION_BLOCKS).max(start);
            let stop = ((region + 1) * REGION_BLOCKS).min(volume_blocks);
            if lba >= stop {
                continue;
            }
            let full = runs.len() == MAX_ANSWER_RUNS;
            match runs.last_mut() {
                Some(r) if r.lba + r.blocks == lba => r.blocks += stop - lba,
                _ if full => {
                    end = lba;
                    break;
                }
                _ => runs.push(BlockRun {
                    lba,
                    blocks: stop - lba,
                }),
            }
        }
        (WrittenAnswer::Regions(runs), end)
    }

    /// Takes this replica off any shared numbering, durably: a fresh lineage nobody shares, so the
    /// record answers nobody. What it recorded is kept, for [`IntentRecord::adopt`].
    pub fn forget(&self) -> Result<(), StoreError> {
        let mut inner = super::lock(&self.inner);
        inner.state.lineage = random_lineage();
        inner.state.horizon = u64::MAX;
        self.rewrite(&mut inner)
    }

    /// Starts over empty (the store was reset): nothing is shared, revision 0.
    pub fn reset(&self) -> Result<(), StoreError> {
        let mut inner = super::lock(&self.inner);
        inner.state = State {
            lineage: random_lineage(),
            ..State::default()
        };
        self.rewrite(&mut inner)
    }

    /// The volume was reverted at `revision`: what it held before is gone, so the record answers only
    /// for points from that revision on.
    pub fn reverted(&self, revision: Revision, epoch: Epoch) -> Result<(), StoreError> {
        let mut inner = super::lock(&self.inner);
        inner.state.stamps.clear();
        inner.state.horizon = revision.0;
        stamp(&mut inner.state, revision.0, epoch.0, []);
        self.rewrite(&mut inner)
    }

    /// The store has moved its revisions by `delta` (its flush `own` is `point.revision` of
    /// `point.lineage`): adopt the lineage, keep what was stamped after `own` (renumbered), and answer
    /// from `point.revision` on. The store's revision is `revision` (new numbering) afterwards.
    pub fn adopt(&self, point: SyncPoint, own: Revision, revision: Revision) -> Result<(), StoreError> {
        let mut inner = super::lock(&self.inner);
        let delta = i128::from(point.revision.0) - i128::from(own.0);
        let shift = |r: u64| (i128::from(r) + delta).max(0) as u64;
        let old = std::mem::take(&mut inner.state);
        let mut epochs = vec![(point.revision.0, point.epoch.0)];
        epochs.extend(
            old.epochs
                .iter()
                .filter(|(first, _)| *first > own.0)
                .map(|&(first, e)| (shift(first), e)),
        );
        epochs.dedup_by(|b, a| a.1 == b.1);
        inner.state = State {
            lineage: point.lineage,
            horizon: point.revision.0,
            through: revision.0,
            epochs,
            stamps: old
                .stamps
                .into_iter()
                .filter(|(_, s)| *s > own.0)
                .map(|(r, s)| (r, shift(s)))
                .collect(),
            pending: old.pending,
        };
        self.rewrite(&mut inner)
    }
}
