//! The bytes of the embedded store's two files: the log of batches and the snapshot.
//!
//! Both files start with an 8-byte magic naming the format, followed by frames:
//!
//! ```text
//! +-----------------+-----------------+------------------------+
//! | payload length  | CRC-32 (IEEE)   | payload                |
//! | u32 little-end. | of the payload  | (length bytes)         |
//! +-----------------+-----------------+------------------------+
//! ```
//!
//! A log frame's payload is one [`Batch`]: its sequence number and the operations that one
//! acknowledged change consists of (a put is one operation; a lease's end is the deletion of each
//! of its keys plus the end of the lease, so that it is on disk entirely or not at all). The
//! snapshot file holds a single frame with the whole state.
//!
//! Integers are little-endian; strings and byte strings are a `u32` length followed by the bytes;
//! an optional lease is a flag byte followed by the id. Decoding never trusts a length: every read
//! is checked against what is left, so damaged bytes give an error, never a panic.

use std::time::Duration;

use crate::store::{KeyValue, LeaseId, Revision};

/// The first bytes of a log file.
pub(super) const LOG_MAGIC: &[u8; 8] = b"BSLTLOG1";
/// The first bytes of a snapshot file.
pub(super) const SNAPSHOT_MAGIC: &[u8; 8] = b"BSLTSNP1";
/// Length and CRC in front of every payload.
const FRAME_HEADER: usize = 8;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_GRANT: u8 = 3;
const TAG_END_LEASE: u8 = 4;

/// One change to the state, as written in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Put {
        revision: Revision,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        revision: Revision,
        key: String,
    },
    /// A lease is granted; it outlives a restart (its keys are in the log with its id).
    Grant {
        lease: LeaseId,
        ttl: Duration,
    },
    /// A lease ends (revoked or expired); the deletions of its keys precede this in its batch.
    EndLease {
        lease: LeaseId,
    },
}

/// The operations of one acknowledged change, numbered so that a log entry already contained in
/// the snapshot is recognised and skipped at replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Batch {
    pub seq: u64,
    pub ops: Vec<Op>,
}

/// What a log file holds, as far as it is whole.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct LogContents {
    pub batches: Vec<Batch>,
    /// Bytes of whole frames (magic included); anything after is a torn tail to cut off.
    pub valid_len: usize,
}

/// The whole state at one point of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// The last batch the snapshot contains.
    pub seq: u64,
    pub revision: Revision,
    pub next_lease: i64,
    pub leases: Vec<(LeaseId, Duration)>,
    pub kvs: Vec<KeyValue>,
}

/// Frames `batch` for appending to the log.
pub(super) fn encode_batch(batch: &Batch) -> Result<Vec<u8>, String> {
    let mut w = Writer::framed();
    w.u64(batch.seq);
    w.len(batch.ops.len())?;
    for op in &batch.ops {
        match op {
            Op::Put {
                revision,
                key,
                value,
                lease,
            } => {
                w.u8(TAG_PUT);
                w.u64(*revision);
                w.bytes(key.as_bytes())?;
                w.bytes(value)?;
                w.lease(*lease);
            }
            Op::Delete { revision, key } => {
                w.u8(TAG_DELETE);
                w.u64(*revision);
                w.bytes(key.as_bytes())?;
            }
            Op::Grant { lease, ttl } => {
                w.u8(TAG_GRANT);
                w.i64(lease.0);
                w.u64(duration_millis(*ttl));
            }
            Op::EndLease { lease } => {
                w.u8(TAG_END_LEASE);
                w.i64(lease.0);
            }
        }
    }
    w.finish()
}

/// The magic and the snapshot's one frame: the whole file.
pub(super) fn encode_snapshot(snapshot: &Snapshot) -> Result<Vec<u8>, String> {
    let mut w = Writer::framed();
    w.u64(snapshot.seq);
    w.u64(snapshot.revision);
    w.i64(snapshot.next_lease);
    w.len(snapshot.leases.len())?;
    for (lease, ttl) in &snapshot.leases {
        w.i64(lease.0);
        w.u64(duration_millis(*ttl));
    }
    w.len(snapshot.kvs.len())?;
    for kv in &snapshot.kvs {
        w.bytes(kv.key.as_bytes())?;
        w.bytes(&kv.value)?;
        w.u64(kv.create_revision);
        w.u64(kv.mod_revision);
        w.lease(kv.lease);
    }
    let frame = w.finish()?;
    let mut file = Vec::with_capacity(SNAPSHOT_MAGIC.len() + frame.len());
    file.extend_from_slice(SNAPSHOT_MAGIC);
    file.extend_from_slice(&frame);
    Ok(file)
}

/// Reads a snapshot file. A snapshot is renamed into place only once it is on disk, so any
/// damage is corruption, never a torn write.
pub(super) fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, String> {
    let body = bytes
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .ok_or("it does not start with the snapshot magic: not a Basalt store snapshot")?;
    let payload = match next_frame(body) {
        FrameRead::Whole { payload, len } if len == body.len() => payload,
        FrameRead::Whole { .. } => return Err("there are bytes after the snapshot's frame".into()),
        FrameRead::BadCrc { .. } => return Err("its checksum does not match its contents".into()),
        FrameRead::Short => return Err("it is shorter than its frame says".into()),
    };
    let mut r = Reader::new(payload);
    let seq = r.u64()?;
    let revision = r.u64()?;
    let next_lease = r.i64()?;
    let mut leases = Vec::new();
    for _ in 0..r.u32()? {
        leases.push((LeaseId(r.i64()?), Duration::from_millis(r.u64()?)));
    }
    let mut kvs = Vec::new();
    for _ in 0..r.u32()? {
        kvs.push(KeyValue {
            key: r.string()?,
            value: r.bytes()?.to_vec(),
            create_revision: r.u64()?,
            mod_revision: r.u64()?,
            lease: r.lease()?,
        });
    }
    r.end()?;
    Ok(Snapshot {
        seq,
        revision,
        next_lease,
        leases,
        kvs,
    })
}

/// Reads a log file: the whole batches, and where the whole part ends.
///
/// A tail that is not a whole frame is what a crash during an append leaves (the append was not
/// acknowledged: every acknowledged batch was synced before the next was written), so it is
/// reported as the end of the valid part, to be cut off. Damage that cannot be such a tail (a
/// frame that fails its checksum with more frames after it, a whole frame that does not decode)
/// is an error: acknowledged changes would be lost by skipping it.
pub(super) fn decode_log(bytes: &[u8]) -> Result<LogContents, String> {
    let magic_len = LOG_MAGIC.len();
    // A crash while the file was being created (before its first sync) leaves a part of the
    // magic, or zeros: nothing acknowledged was ever in it.
    if LOG_MAGIC.starts_with(bytes) || bytes.iter().all(|&b| b == 0) {
        return Ok(LogContents {
            batches: Vec::new(),
            valid_len: 0,
        });
    }
    if bytes.get(..magic_len) != Some(LOG_MAGIC.as_slice()) {
        return Err("it does not start with the log magic: not a Basalt store log".into());
    }
    let mut batches = Vec::new();
    let mut pos = magic_len;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        // Zeros a file system left past the last sync (the size grew, the data never came): an
        // append that never completed. (A zero header would otherwise pass as an empty frame.)
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        match next_frame(rest) {
            FrameRead::Whole { payload, len } => {
                let batch = decode_batch(payload).map_err(|e| format!("the frame at byte {pos}: {e}"))?;
                batches.push(batch);
                pos += len;
            }
            FrameRead::Short | FrameRead::BadCrc { .. } => {
                // An append that never completed is the last thing in the file: it runs to the
                // end (short, or failing its checksum as the last frame) and holds no whole frame
                // after its start. Anything else is damage, and skipping it would lose what
                // follows.
                if let FrameRead::BadCrc { len } = next_frame(rest) {
                    if len < rest.len() {
                        return Err(format!(
                            "the frame at byte {pos} fails its checksum and {} bytes follow it",
                            rest.len() - len
                        ));
                    }
                }
                if let Some(at) = whole_batch_after_start(rest) {
                    return Err(format!(
                        "the frame at byte {pos} is damaged (its length or checksum is wrong) and a whole frame follows at byte {}",
                        pos + at
                    ));
                }
                break;
            }
        }
    }
    Ok(LogContents {
        batches,
        valid_len: pos,
    })
}

/// Where the first whole frame holding a batch starts in `bytes`, past its first byte. A torn
/// append is a prefix of one frame, so a whole frame inside it could only come from the bytes of a
/// value; the store's records are JSON text ([`crate::store::Store::put`]), which never holds the
/// NUL bytes every frame header has (the high bytes of its length), so none is found there by
/// chance. A binary value holding a frame could make a torn append read as damage.
fn whole_batch_after_start(bytes: &[u8]) -> Option<usize> {
    (1..bytes.len()).find(|&at| match next_frame(&bytes[at..]) {
        FrameRead::Whole { payload, .. } => decode_batch(payload).is_ok_and(|b| !b.ops.is_empty()),
        _ => false,
    })
}

fn decode_batch(payload: &[u8]) -> Result<Batch, String> {
    let mut r = Reader::new(payload);
    let seq = r.u64()?;
    let mut ops = Vec::new();
    for _ in 0..r.u32()? {
        let op = match r.u8()? {
            TAG_PUT => Op::Put {
                revision: r.u64()?,
                key: r.string()?,
                value: r.bytes()?.to_vec(),
                lease: r.lease()?,
            },
            TAG_DELETE => Op::Delete {
                revision: r.u64()?,
                key: r.string()?,
            },
            TAG_GRANT => Op::Grant {
                lease: LeaseId(r.i64()?),
                ttl: Duration::from_millis(r.u64()?),
            },
            TAG_END_LEASE => Op::EndLease {
                lease: LeaseId(r.i64()?),
            },
            tag => return Err(format!("unknown operation tag {tag}")),
        };
        ops.push(op);
    }
    r.end()?;
    Ok(Batch { seq, ops })
}

/// Lease lengths are kept in whole milliseconds, rounded up so that a lease never lives shorter
/// than asked.
fn duration_millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

enum FrameRead<'a> {
    /// A frame whose checksum matches; `len` counts its header too.
    Whole { payload: &'a [u8], len: usize },
    /// The header or the payload runs past the end of the bytes.
    Short,
    /// A frame of `len` bytes whose checksum does not match.
    BadCrc { len: usize },
}

fn next_frame(bytes: &[u8]) -> FrameRead<'_> {
    if bytes.len() < FRAME_HEADER {
        return FrameRead::Short;
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return FrameRead::Short;
    };
    if crc32fast::hash(payload) != crc {
        return FrameRead::BadCrc {
            len: FRAME_HEADER + len,
        };
    }
    FrameRead::Whole {
        payload,
        len: FRAME_HEADER + len,
    }
}

/// Builds one frame: the header is filled in by [`Writer::finish`].
struct Writer(Vec<u8>);

impl Writer {
    fn framed() -> Writer {
        Writer(vec![0; FRAME_HEADER])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) -> Result<(), String> {
        let n = u32::try_from(n).map_err(|_| format!("{n} items do not fit in one record"))?;
        self.0.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }
    fn bytes(&mut self, b: &[u8]) -> Result<(), String> {
        self.len(b.len())?;
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn lease(&mut self, lease: Option<LeaseId>) {
        match lease {
            None => self.u8(0),
            Some(id) => {
                self.u8(1);
                self.i64(id.0);
            }
        }
    }
    fn finish(mut self) -> Result<Vec<u8>, String> {
        let payload_len = self.0.len() - FRAME_HEADER;
        let len = u32::try_from(payload_len).map_err(|_| {
            format!("a record of {payload_len} bytes is larger than the store's limit of 4 GiB")
        })?;
        let crc = crc32fast::hash(&self.0[FRAME_HEADER..]);
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(self.0)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "a field of {n} bytes at byte {} runs past the end of its record ({} bytes)",
                self.pos,
                self.bytes.len()
            ));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| format!("the key at byte {at} is not UTF-8"))
    }
    fn lease(&mut self) -> Result<Option<LeaseId>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(LeaseId(self.i64()?))),
            flag => Err(format!("lease flag {flag} is neither 0 nor 1")),
        }
    }
    fn end(&self) -> Result<(), String> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes left over at the end of the record",
                self.bytes.len() - self.pos
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_batches() -> Vec<Batch> {
        vec![
            Batch {
                seq: 1,
                ops: vec![Op::Grant {
                    lease: LeaseId(1),
                    ttl: Duration::from_secs(10),
                }],
            },
            Batch {
                seq: 2,
                ops: vec![Op::Put {
                    revision: 1,
                    key: "/basalt/a".into(),
                    value: b"{\"x\":1}".to_vec(),
                    lease: Some(LeaseId(1)),
                }],
            },
            Batch {
                seq: 3,
                ops: vec![
                    Op::Delete {
                        revision: 2,
                        key: "/basalt/a".into(),
                    },
                    Op::EndLease { lease: LeaseId(1) },
                ],
            },
        ]
    }

    fn log_of(batches: &[Batch]) -> Vec<u8> {
        let mut log = LOG_MAGIC.to_vec();
        for b in batches {
            log.extend(encode_batch(b).unwrap());
        }
        log
    }

    #[test]
    fn a_log_reads_back_what_was_appended() {
        let batches = sample_batches();
        let log = log_of(&batches);
        let read = decode_log(&log).unwrap();
        assert_eq!(read.batches, batches);
        assert_eq!(read.valid_len, log.len());
    }

    #[test]
    fn every_cut_of_the_last_frame_is_a_torn_tail() {
        let batches = sample_batches();
        let whole = log_of(&batches[..2]);
        let log = log_of(&batches);
        for cut in whole.len()..log.len() {
            let read = decode_log(&log[..cut]).unwrap();
            assert_eq!(read.batches, batches[..2], "cut at {cut}");
            assert_eq!(read.valid_len, whole.len(), "cut at {cut}");
        }
    }

    #[test]
    fn a_damaged_last_frame_is_a_torn_tail_and_zeros_after_the_last_frame_too() {
        let batches = sample_batches();
        let whole = log_of(&batches[..2]);
        let mut log = log_of(&batches);
        let last = log.len() - 1;
        log[last] ^= 0xff;
        assert_eq!(decode_log(&log).unwrap().valid_len, whole.len());

        let mut zeros = whole.clone();
        zeros.extend([0u8; 100]);
        let read = decode_log(&zeros).unwrap();
        assert_eq!(read.batches, batches[..2]);
        assert_eq!(read.valid_len, whole.len());
    }

    #[test]
    fn a_damaged_frame_followed_by_others_is_corruption() {
        let mut log = log_of(&sample_batches());
        // The payload of the first frame, past its header.
        log[LOG_MAGIC.len() + FRAME_HEADER + 2] ^= 0x01;
        let err = decode_log(&log).unwrap_err();
        assert!(err.contains("fails its checksum"), "{err}");
    }

    #[test]
    fn a_damaged_length_in_the_middle_is_corruption_not_a_torn_tail() {
        let batches = sample_batches();
        let mut log = log_of(&batches);
        // The first frame's length now runs past the end of the file.
        log[LOG_MAGIC.len() + 3] = 0x7f;
        let err = decode_log(&log).unwrap_err();
        assert!(err.contains("a whole frame follows"), "{err}");
        // The same damage in the last frame is a torn tail.
        let whole = log_of(&batches[..2]);
        let mut log = log_of(&batches);
        log[whole.len() + 3] = 0x7f;
        assert_eq!(decode_log(&log).unwrap().valid_len, whole.len());
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_a_torn_magic_is_an_empty_log() {
        assert!(decode_log(b"hello world, not a log")
            .unwrap_err()
            .contains("magic"));
        assert_eq!(decode_log(b"BSLT").unwrap().valid_len, 0);
        assert_eq!(decode_log(b"").unwrap().valid_len, 0);
        assert!(decode_log(b"xyz").is_err());
    }

    #[test]
    fn a_whole_frame_that_does_not_decode_is_corruption() {
        let mut w = Writer::framed();
        w.u64(1);
        w.len(1).unwrap();
        w.u8(99);
        let mut log = LOG_MAGIC.to_vec();
        log.extend(w.finish().unwrap());
        assert!(decode_log(&log).unwrap_err().contains("unknown operation tag 99"));
    }

    #[test]
    fn a_snapshot_reads_back_and_any_damage_is_refused() {
        let snapshot = Snapshot {
            seq: 7,
            revision: 5,
            next_lease: 3,
            leases: vec![(LeaseId(2), Duration::from_millis(1500))],
            kvs: vec![KeyValue {
                key: "/basalt/k".into(),
                value: vec![0, 1, 2],
                create_revision: 2,
                mod_revision: 5,
                lease: Some(LeaseId(2)),
            }],
        };
        let bytes = encode_snapshot(&snapshot).unwrap();
        assert_eq!(decode_snapshot(&bytes).unwrap(), snapshot);
        for cut in 0..bytes.len() {
            assert!(decode_snapshot(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            assert!(decode_snapshot(&damaged).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn lease_lengths_round_up_to_whole_milliseconds() {
        assert_eq!(duration_millis(Duration::from_micros(1)), 1);
        assert_eq!(duration_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(duration_millis(Duration::from_micros(1500)), 2);
    }

    proptest! {
        /// Whatever the bytes, reading a log or a snapshot returns, never panics; and a
        /// successful read never claims more bytes than there are.
        #[test]
        fn reading_arbitrary_bytes_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut log = LOG_MAGIC.to_vec();
            log.extend(&tail);
            if let Ok(read) = decode_log(&log) {
                prop_assert!(read.valid_len <= log.len());
            }
            let mut snapshot = SNAPSHOT_MAGIC.to_vec();
            snapshot.extend(&tail);
            let _ = decode_snapshot(&snapshot);
        }

        #[test]
        fn batches_round_trip(
            seq in any::<u64>(),
            key in "[a-z/]{0,20}",
            value in proptest::collection::vec(any::<u8>(), 0..64),
            revision in any::<u64>(),
            lease in proptest::option::of(any::<i64>()),
        ) {
            let batch = Batch {
                seq,
                ops: vec![
                    Op::Put { revision, key: key.clone(), value, lease: lease.map(LeaseId) },
                    Op::Delete { revision, key },
                ],
            };
            let log = log_of(std::slice::from_ref(&batch));
            prop_assert_eq!(decode_log(&log).unwrap().batches, vec![batch]);
        }
    }
}
