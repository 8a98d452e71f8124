//! The per-layer index log: which blocks a layer holds, with their CRC32, and flush markers.
//!
//! ```text
//!  record (24 bytes, little endian)
//!  +------+-----+-----------+---------------------+----------+------------+
//!  | kind | 0 0 0 | data crc32 | lba or revision (u64) | reserved | record crc32 |
//!  +------+-----+-----------+---------------------+----------+------------+
//!    kind: 1 = Data (block holds data with this crc), 2 = Tombstone (block reads as zeros),
//!          3 = Flush (everything before this marker is durable; carries the revision)
//! ```
//!
//! The log is append-only. A write appends its record *before* it writes the data, so after a crash
//! every block whose data reached the file also has its record. Records after the last flush marker are
//! not trusted: at open each one is checked against the data on disk ([`resolve`]), newest first, and
//! the block keeps the newest record whose CRC matches (a tombstone always matches), else whatever it
//! had before the marker. Under `kill -9` the page cache survives and a 4 KiB page write is never torn,
//! so this yields exactly "old or new content, with a valid checksum".
//!
//! Where the log ends: a log file may be longer than its records, zero-filled past them (the store
//! preallocates the file it appends to through a memory mapping), so an all-zero record with nothing
//! but zeros after it is the **clean end**: no record is ever all zeros (its kind and its own CRC are
//! not). Any other record whose own CRC does not match ends the log as a **torn tail** (a `kill -9`
//! inside a record's copy, or power loss), and the log is rewritten before anything is appended --
//! appending after junk would let a later crash read the junk as records. A flush marker found
//! after such a record means the log is damaged in the middle, which is reported as corruption.

use std::ops::Range;

use basalt_proto::Revision;

use super::backend::Object;
use super::types::{Lba, BLOCK};
use super::StoreError;

/// Size of one encoded record.
pub(crate) const RECORD_LEN: usize = 24;

const KIND_DATA: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
const KIND_FLUSH: u8 = 3;

/// What one layer says about one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// The layer's data object holds the block; its content has this CRC32.
    Data { crc: u32 },
    /// The block was discarded in this layer: it reads as zeros whatever older layers hold.
    Tombstone,
}

/// One entry of an index log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    Block { lba: Lba, state: BlockState },
    Flush { revision: Revision },
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        let (kind, crc, value) = match *self {
            Record::Block {
                lba,
                state: BlockState::Data { crc },
            } => (KIND_DATA, crc, lba.0),
            Record::Block {
                lba,
                state: BlockState::Tombstone,
            } => (KIND_TOMBSTONE, 0, lba.0),
            Record::Flush { revision } => (KIND_FLUSH, 0, revision.0),
        };
        out[0] = kind;
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        out[8..16].copy_from_slice(&value.to_le_bytes());
        let record_crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&record_crc.to_le_bytes());
        out
    }

    /// Decodes one record; `None` if it is torn, zeroed or otherwise not a record.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let bytes: &[u8; RECORD_LEN] = bytes.try_into().ok()?;
        let record_crc = u32::from_le_bytes(bytes[20..24].try_into().ok()?);
        if crc32fast::hash(&bytes[..20]) != record_crc || bytes[1..4] != [0, 0, 0] {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
        let value = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
        match bytes[0] {
            KIND_DATA => Some(Record::Block {
                lba: Lba(value),
                state: BlockState::Data { crc },
            }),
            KIND_TOMBSTONE => Some(Record::Block {
                lba: Lba(value),
                state: BlockState::Tombstone,
            }),
            KIND_FLUSH => Some(Record::Flush {
                revision: Revision(value),
            }),
            _ => None,
        }
    }
}

/// Appends the encoding of `records` to `out`.
pub(crate) fn encode_into(out: &mut Vec<u8>, records: impl IntoIterator<Item = Record>) {
    let records = records.into_iter();
    // A compacted head log is megabytes: grown by doubling, it was copied and faulted in several times.
    out.reserve(records.size_hint().0 * RECORD_LEN);
    for record in records {
        out.extend_from_slice(&record.encode());
    }
}

/// A log split at its last flush marker.
#[derive(Debug, Default)]
pub(crate) struct ParsedLog {
    /// Block records before the last flush marker, in log order: trusted.
    pub trusted: Vec<(Lba, BlockState)>,
    /// Block records after it, in log order: to be checked against the data.
    pub unverified: Vec<(Lba, BlockState)>,
    /// Revision of the last flush marker.
    pub last_revision: Option<Revision>,
    /// Whether the log ended in bytes that are not a record (a torn tail).
    pub torn_tail: bool,
}

/// Parses a whole log. `what` names it in errors.
pub(crate) fn parse(bytes: &[u8], what: &str, volume_blocks: u64) -> Result<ParsedLog, StoreError> {
    // One pass straight into the block list: a head log holds a record per block written (262,144
    // for 1 GiB), and an intermediate list of records would cost a copy of all of them at every open.
    let mut blocks = Vec::with_capacity(bytes.len() / RECORD_LEN);
    // Block records before the last flush marker seen so far.
    let mut trusted = 0;
    let mut last_revision = None;
    let mut records = 0;
    let mut torn_tail = false;
    let mut chunks = bytes.chunks(RECORD_LEN);
    for chunk in chunks.by_ref() {
        match Record::decode(chunk) {
            Some(Record::Block { lba, state }) => {
                if lba.0 >= volume_blocks {
                    return Err(StoreError::Corrupt {
                        what: what.to_string(),
                        detail: format!("{lba} is beyond the end of the volume"),
                    });
                }
                blocks.push((lba, state));
            }
            Some(Record::Flush { revision }) => {
                last_revision = Some(revision);
                trusted = blocks.len();
            }
            None => {
                torn_tail = !is_clean_end(&bytes[records * RECORD_LEN..]);
                break;
            }
        }
        records += 1;
    }
    if torn_tail && chunks.any(|c| matches!(Record::decode(c), Some(Record::Flush { .. }))) {
        return Err(StoreError::Corrupt {
            what: what.to_string(),
            detail: format!(
                "damaged record at byte {} before a later flush marker",
                records * RECORD_LEN
            ),
        });
    }
    // Split without copying the (large) trusted part; a log with no marker is all unverified.
    let unverified = match trusted {
        0 => std::mem::take(&mut blocks),
        _ => blocks.split_off(trusted),
    };
    Ok(ParsedLog {
        trusted: blocks,
        unverified,
        last_revision,
        torn_tail,
    })
}

/// Sorts `records` (given in the order they were written) by block and keeps only the last record of
/// each block: what replaying them one by one into a map would leave, in a stable sort (which
/// finds the runs already in order: a sequential write, or each layer of a chain) and one pass.
pub(crate) fn replay_in_place<T: Copy>(records: &mut Vec<(u64, T)>) {
    // Stable, so the records of one block stay in written order and the last of them survives
    // `dedup_by` (which hands over the later element first and removes it when told to).
    records.sort_by_key(|&(lba, _)| lba);
    records.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            *kept = *later;
        }
        same
    });
}

/// The blocks one layer holds, in block order, each once.
///
/// A sorted vector rather than a map: it is built once per open from the log (a stable sort of
/// records that are mostly in order already, then keeping the last record of each block, which is
/// exactly log replay) and then only read in order or by range, which a map would do no faster at
/// several times the cost to build.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LayerBlocks(Vec<(u64, BlockState)>);

impl LayerBlocks {
    /// Replays `records` in log order: the last record of each block wins.
    pub fn replay(mut records: Vec<(u64, BlockState)>) -> LayerBlocks {
        replay_in_place(&mut records);
        LayerBlocks(records)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// In block order.
    pub fn as_slice(&self) -> &[(u64, BlockState)] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<(u64, BlockState)> {
        self.0
    }

    /// The blocks among `lbas`, in block order.
    pub fn range(&self, lbas: Range<u64>) -> &[(u64, BlockState)] {
        let start = self.0.partition_point(|&(lba, _)| lba < lbas.start);
        let end = start + self.0[start..].partition_point(|&(lba, _)| lba < lbas.end);
        &self.0[start..end]
    }
}

/// Whether the bytes after a log's last record are its clean end (see the module doc): only zeros.
fn is_clean_end(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0)
}

/// The logical end of a log whose end is clean (every byte after its last record is zero): one past
/// its last record. Found from the end of the object backwards, so a preallocated tail costs one read
/// per 64 KiB of it, whatever the log's length.
pub(crate) fn logical_end(object: &dyn Object) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut end = object.len()?;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        object.read_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            // The last nonzero byte is inside the last record (a record may end in zero bytes).
            return Ok((start + i as u64 + 1).next_multiple_of(RECORD_LEN as u64));
        }
        end = start;
    }
    Ok(0)
}

/// The blocks one layer holds, after recovery.
#[derive(Debug, Default)]
pub(crate) struct LayerIndex {
    pub blocks: LayerBlocks,
    /// The log holds unverified records or a torn tail: it must be rewritten (after syncing the data)
    /// before anything is appended, or a later flush marker would vouch for records that were discarded.
    pub needs_rewrite: bool,
    pub last_revision: Option<Revision>,
}

impl LayerIndex {
    pub fn data_blocks(&self) -> u64 {
        self.blocks
            .as_slice()
            .iter()
            .filter(|(_, s)| matches!(s, BlockState::Data { .. }))
            .count() as u64
    }

    pub fn tombstones(&self) -> u64 {
        self.blocks.len() as u64 - self.data_blocks()
    }
}

/// Replays a parsed log against the layer's data: trusted records as they are, unverified ones only if
/// the data on disk matches them (see the module doc).
pub(crate) fn resolve(parsed: ParsedLog, data: &dyn Object, what: &str) -> Result<LayerIndex, StoreError> {
    let needs_rewrite = parsed.torn_tail || !parsed.unverified.is_empty();
    let last_revision = parsed.last_revision;
    // Each block named after the marker, with its records newest first (a stable sort by block of
    // the reversed tail): the first record that matches the data wins. Reading them in block order
    // also reads the data object front to back.
    let mut candidates: Vec<(u64, BlockState)> = parsed
        .unverified
        .iter()
        .rev()
        .map(|&(lba, state)| (lba.0, state))
        .collect();
    candidates.sort_by_key(|&(lba, _)| lba);
    // In place: `Lba` is a plain `u64`, so this reuses the trusted list's allocation, whose spare
    // room (sized for the whole log) takes the accepted tail records.
    let mut records: Vec<(u64, BlockState)> = parsed
        .trusted
        .into_iter()
        .map(|(lba, state)| (lba.0, state))
        .collect();
    let mut block = vec![0u8; BLOCK];
    for newest_first in candidates.chunk_by(|a, b| a.0 == b.0) {
        let lba = newest_first[0].0;
        let mut on_disk: Option<u32> = None;
        for &(_, state) in newest_first {
            let accept = match state {
                BlockState::Tombstone => true,
                BlockState::Data { crc } => {
                    let actual = match on_disk {
                        Some(c) => c,
                        None => {
                            data.read_at(&mut block, Lba(lba).byte_offset())
                                .map_err(|e| StoreError::Io {
                                    context: format!("verifying {} of {what}", Lba(lba)),
                                    source: e,
                                })?;
                            *on_disk.insert(crc32fast::hash(&block))
                        }
                    };
                    actual == crc
                }
            };
            if accept {
                // After every trusted record: it wins the replay.
                records.push((lba, state));
                break;
            }
        }
    }
    Ok(LayerIndex {
        blocks: LayerBlocks::replay(records),
        needs_rewrite,
        last_revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let records = [
            Record::Block {
                lba: Lba(7),
                state: BlockState::Data { crc: 0xdead_beef },
            },
            Record::Block {
                lba: Lba(u64::MAX >> 12),
                state: BlockState::Tombstone,
            },
            Record::Flush {
                revision: Revision(42),
            },
        ];
        for record in records {
            let mut bytes = record.encode();
            assert_eq!(Record::decode(&bytes), Some(record));
            bytes[9] ^= 1;
            assert_eq!(Record::decode(&bytes), None);
        }
        assert_eq!(Record::decode(&[0u8; RECORD_LEN]), None);
    }

    #[test]
    fn records_after_the_last_marker_are_unverified_and_a_torn_tail_is_dropped() {
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                Record::Block {
                    lba: Lba(1),
                    state: BlockState::Data { crc: 1 },
                },
                Record::Flush {
                    revision: Revision(5),
                },
                Record::Block {
                    lba: Lba(2),
                    state: BlockState::Tombstone,
                },
            ],
        );
        log.extend_from_slice(&[0xff; 10]);
        let parsed = parse(&log, "test log", 100).unwrap();
        assert_eq!(parsed.trusted, vec![(Lba(1), BlockState::Data { crc: 1 })]);
        assert_eq!(parsed.unverified, vec![(Lba(2), BlockState::Tombstone)]);
        assert_eq!(parsed.last_revision, Some(Revision(5)));
        assert!(parsed.torn_tail);
    }

    fn data(lba: u64) -> Record {
        Record::Block {
            lba: Lba(lba),
            state: BlockState::Data { crc: lba as u32 },
        }
    }

    fn flush(revision: u64) -> Record {
        Record::Flush {
            revision: Revision(revision),
        }
    }

    /// Two records, a marker and one record after it, then `tail`.
    fn log_with_tail(tail: &[u8]) -> Vec<u8> {
        let mut log = Vec::new();
        encode_into(&mut log, [data(1), flush(3), data(2)]);
        log.extend_from_slice(tail);
        log
    }

    #[test]
    fn zeros_after_the_last_record_are_the_clean_end_of_the_log() {
        // A preallocated tail: whole zero records, then a partial one (a file grown in MiB steps).
        for tail in [&[][..], &[0; RECORD_LEN], &[0; 10 * RECORD_LEN + 7]] {
            let parsed = parse(&log_with_tail(tail), "test log", 100).unwrap();
            assert!(!parsed.torn_tail, "{} zero bytes", tail.len());
            assert_eq!(parsed.trusted, vec![(Lba(1), BlockState::Data { crc: 1 })]);
            assert_eq!(parsed.unverified, vec![(Lba(2), BlockState::Data { crc: 2 })]);
            assert_eq!(parsed.last_revision, Some(Revision(3)));
        }
    }

    #[test]
    fn a_damaged_record_before_zeros_or_anything_after_zeros_is_a_torn_tail() {
        // A record half copied when the process was killed: some of its bytes, zeros after.
        let mut half = data(9).encode();
        half[12..].fill(0);
        let mut damaged_then_zeros = half.to_vec();
        damaged_then_zeros.extend_from_slice(&[0; 100]);
        // A zero record with bytes after it: appending there would later read them as records.
        let mut zeros_then_junk = vec![0u8; 2 * RECORD_LEN];
        zeros_then_junk[RECORD_LEN + 5] = 1;
        let mut zeros_then_record = vec![0u8; RECORD_LEN];
        zeros_then_record.extend_from_slice(&data(4).encode());
        for (what, tail) in [
            ("a half-copied record", damaged_then_zeros),
            ("a stray byte after zeros", zeros_then_junk),
            ("a record after zeros", zeros_then_record),
        ] {
            let parsed = parse(&log_with_tail(&tail), "test log", 100).unwrap();
            assert!(parsed.torn_tail, "{what}");
            assert_eq!(
                parsed.unverified,
                vec![(Lba(2), BlockState::Data { crc: 2 })],
                "{what}"
            );
        }
    }

    #[test]
    fn damage_or_zeros_before_a_later_flush_marker_are_corruption() {
        let mut damaged = data(9).encode();
        damaged[0] = 0x7f;
        for (what, gap) in [("a damaged record", damaged), ("a zero record", [0; RECORD_LEN])] {
            let mut tail = gap.to_vec();
            encode_into(&mut tail, [flush(4)]);
            tail.extend_from_slice(&[0; 3 * RECORD_LEN]);
            assert!(
                matches!(
                    parse(&log_with_tail(&tail), "test log", 100),
                    Err(StoreError::Corrupt { .. })
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn the_logical_end_of_a_clean_log_is_past_its_last_record_whatever_its_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::store::DirBackend::new(dir.path()).unwrap();
        let object = crate::store::Backend::create(&backend, "log", 0).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 0, "an empty log");
        // A record whose own CRC ends in a zero byte: the end is still after the whole record.
        let ends_in_zero = (0..).map(data).find(|r| r.encode()[RECORD_LEN - 1] == 0).unwrap();
        let mut log = Vec::new();
        encode_into(&mut log, [data(1), flush(2), ends_in_zero]);
        object.write_at(&log, 0).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 3 * RECORD_LEN as u64);
        // Followed by zeros over more than one of the backward reads.
        object.write_at(&vec![0; 300_000], log.len() as u64).unwrap();
        assert_eq!(logical_end(&*object).unwrap(), 3 * RECORD_LEN as u64);
    }

    #[test]
    fn damage_before_a_flush_marker_is_corruption() {
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                Record::Block {
                    lba: Lba(1),
                    state: BlockState::Data { crc: 1 },
                },
                Record::Flush {
                    revision: Revision(1),
                },
            ],
        );
        log[3] = 9;
        assert!(matches!(
            parse(&log, "test log", 100),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn replay_keeps_the_last_record_of_each_block_and_the_newest_tail_record_the_data_matches() {
        use crate::store::backend::{Backend, DirBackend};

        let dir = tempfile::tempdir().unwrap();
        let backend = DirBackend::new(dir.path()).unwrap();
        let data = backend.create("data", 1 << 20).unwrap();
        let block = |byte: u8| vec![byte; BLOCK];
        let crc = |byte: u8| crc32fast::hash(&block(byte));
        data.write_at(&block(0xa), Lba(3).byte_offset()).unwrap();
        let record = |lba, state| Record::Block { lba: Lba(lba), state };
        let data_of = |crc| BlockState::Data { crc };
        let mut log = Vec::new();
        encode_into(
            &mut log,
            [
                // Trusted, out of order, with overwrites: the last record of a block wins.
                record(7, data_of(4)),
                record(5, data_of(1)),
                record(3, data_of(2)),
                record(5, BlockState::Tombstone),
                record(7, data_of(5)),
                Record::Flush {
                    revision: Revision(1),
                },
                // Unverified: block 3 was written twice, and only the older write reached the data.
                record(3, data_of(crc(0xa))),
                record(3, data_of(crc(0xb))),
                // A tombstone needs no data; a write that never reached the data leaves the block
                // as the trusted records have it (block 7) or not held at all (block 9).
                record(5, data_of(crc(0xc))),
                record(5, BlockState::Tombstone),
                record(7, data_of(crc(0xd))),
                record(9, data_of(crc(0xe))),
            ],
        );
        let parsed = parse(&log, "test log", 256).unwrap();
        let index = resolve(parsed, &*data, "test log").unwrap();
        assert_eq!(
            index.blocks.as_slice(),
            [
                (3, data_of(crc(0xa))),
                (5, BlockState::Tombstone),
                (7, data_of(5)),
            ]
        );
        assert!(index.needs_rewrite);
        assert_eq!(index.last_revision, Some(Revision(1)));
        assert_eq!(index.blocks.range(4..8), &index.blocks.as_slice()[1..]);
        assert_eq!(index.blocks.range(8..100), []);
    }
}
