//! The codec's specification: every message survives a round trip, and no
//! input makes the decoder panic or allocate past the limit.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::header::{HEADER_LEN, MAGIC};
use super::*;
use crate::auth::{Nonce, Proof};

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_snapshot() -> impl Strategy<Value = pb::SnapshotInfo> {
    (".{0,20}", any::<i64>(), ".{0,20}", any::<u64>()).prop_map(
        |(name, created_unix, parent, allocated_bytes)| pb::SnapshotInfo {
            name,
            created_unix,
            parent,
            allocated_bytes,
        },
    )
}

fn arb_identity() -> impl Strategy<Value = ReplicaIdentity> {
    (any::<u128>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(uuid, size_bytes, epoch, revision)| ReplicaIdentity {
            volume: VolumeId(uuid::Uuid::from_u128(uuid)),
            size_bytes,
            epoch: Epoch(epoch),
            revision: Revision(revision),
        },
    )
}

fn arb_sync_point() -> impl Strategy<Value = SyncPoint> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(lineage, revision, epoch)| SyncPoint {
        lineage,
        revision: Revision(revision),
        epoch: Epoch(epoch),
    })
}

fn arb_written_answer() -> impl Strategy<Value = WrittenAnswer> {
    prop_oneof![
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20).prop_map(|v| WrittenAnswer::Regions(
            v.into_iter()
                .map(|(lba, blocks)| BlockRun { lba, blocks })
                .collect()
        )),
        ".{0,60}".prop_map(WrittenAnswer::Unknown),
    ]
}

/// A valid extent list: 1 to 12 extents in order, with gaps or touching.
fn arb_extents() -> impl Strategy<Value = Vec<Extent>> {
    (
        0u64..1 << 40,
        proptest::collection::vec((0u64..1 << 20, 1u32..=8192), 1..12),
    )
        .prop_map(|(start, pieces)| {
            let mut at = start;
            pieces
                .into_iter()
                .map(|(gap, len)| {
                    let extent = Extent {
                        offset: at + gap,
                        len,
                    };
                    at = extent.end().expect("far below 2^64");
                    extent
                })
                .collect()
        })
}

/// A vectored write: a valid extent list and data that fills it.
fn arb_write_v() -> impl Strategy<Value = Message> {
    arb_extents().prop_flat_map(|extents| {
        let total: usize = extents.iter().map(|e| e.len as usize).sum();
        proptest::collection::vec(any::<u8>(), total).prop_map(move |data| Message::WriteV {
            extents: extents.clone(),
            data: Bytes::from(data),
        })
    })
}

fn arb_membership() -> impl Strategy<Value = pb::Membership> {
    (
        any::<u64>(),
        proptest::collection::vec(".{0,24}", 0..5),
        any::<u64>(),
    )
        .prop_map(|(generation, members, epoch)| pb::Membership {
            generation,
            members,
            epoch,
        })
}

fn arb_error() -> impl Strategy<Value = ReplyError> {
    // Every status code, with any detail: from_wire defines the set.
    let codes: Vec<u16> = (1u16..=18).chain(20..=22).collect();
    (proptest::sample::select(codes), any::<u16>(), any::<u64>()).prop_map(|(code, small, detail)| {
        let detail = if code == 9 { u64::from(small) } else { detail };
        ReplyError::from_wire(code, detail).expect("codes 1..=18 and 20..=22 are defined")
    })
}

fn arb_message() -> impl Strategy<Value = Message> {
    use Message as M;
    let version = any::<u16>().prop_map(ProtocolVersion);
    prop_oneof![
        (
            any::<u128>(),
            version.clone(),
            version.clone(),
            any::<bool>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(u, min_version, max_version, writer, nonce)| M::Hello {
                volume: VolumeId(uuid::Uuid::from_u128(u)),
                min_version,
                max_version,
                writer,
                nonce: Nonce(nonce),
            }),
        (version, any::<u128>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(version, u, nonce, proof)| M::HelloOk {
                version,
                volume: VolumeId(uuid::Uuid::from_u128(u)),
                nonce: Nonce(nonce),
                proof: Proof(proof),
            }
        ),
        any::<[u8; 32]>().prop_map(|proof| M::Auth { proof: Proof(proof) }),
        (arb_identity(), proptest::option::of(arb_membership()))
            .prop_map(|(replica, membership)| M::AuthOk { replica, membership }),
        arb_membership().prop_map(M::SetMembership),
        Just(M::SetMembershipOk),
        (any::<u64>(), 0..=MAX_PAYLOAD).prop_map(|(offset, len)| M::Read { offset, len }),
        arb_bytes(9000).prop_map(|data| M::ReadOk { data }),
        (any::<u64>(), arb_bytes(9000), any::<bool>()).prop_map(|(offset, data, fua)| M::Write {
            offset,
            data,
            fua
        }),
        Just(M::WriteOk),
        Just(M::Flush),
        any::<u64>().prop_map(|r| M::FlushOk {
            revision: Revision(r)
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| M::Unmap { offset, len }),
        Just(M::UnmapOk),
        Just(M::Ping),
        Just(M::Pong),
        Just(M::Info),
        (
            arb_identity(),
            proptest::collection::vec(arb_snapshot(), 0..4),
            any::<u64>()
        )
            .prop_map(|(id, snapshots, head)| M::InfoOk(pb::ReplicaInfo {
                volume_uuid: id.volume.0.as_bytes().to_vec(),
                size_bytes: id.size_bytes,
                epoch: id.epoch.0,
                revision: id.revision.0,
                snapshots,
                head_allocated_bytes: head,
                clone: None,
            })),
        ".{0,40}".prop_map(|name| M::SnapshotCreate { name }),
        arb_snapshot().prop_map(M::SnapshotCreateOk),
        Just(M::SnapshotList),
        proptest::collection::vec(arb_snapshot(), 0..5).prop_map(M::SnapshotListOk),
        ".{0,40}".prop_map(|name| M::SnapshotDelete { name }),
        Just(M::SnapshotDeleteOk),
        ".{0,40}".prop_map(|name| M::SnapshotRevert { name }),
        Just(M::SnapshotRevertOk),
        Just(M::SetEpoch),
        (any::<u64>(), any::<u64>()).prop_map(|(start_lba, count)| M::BlockCrcs { start_lba, count }),
        proptest::collection::vec((any::<u64>(), any::<u32>()), 0..20)
            .prop_map(|v| M::BlockCrcsOk(v.into_iter().map(|(lba, crc)| BlockCrc { lba, crc }).collect())),
        Just(M::SetEpochOk),
        Just(M::Reset),
        Just(M::ResetOk),
        (".{0,40}", any::<u64>(), any::<u64>()).prop_map(|(snapshot, start_lba, count)| M::LayerBlocks {
            snapshot,
            start_lba,
            count
        }),
        (
            proptest::collection::vec((any::<u64>(), proptest::option::of(any::<u32>())), 0..20),
            any::<u64>()
        )
            .prop_map(|(v, end_lba)| M::LayerBlocksOk {
                blocks: v
                    .into_iter()
                    .map(|(lba, crc)| LayerBlock {
                        lba,
                        state: crc.map_or(LayerBlockState::Tombstone, |crc| LayerBlockState::Data { crc }),
                    })
                    .collect(),
                end_lba,
            }),
        (".{0,40}", any::<u64>(), 0..=MAX_PAYLOAD).prop_map(|(snapshot, offset, len)| M::ReadLayer {
            snapshot,
            offset,
            len
        }),
        arb_bytes(9000).prop_map(|data| M::ReadLayerOk { data }),
        (proptest::option::of(arb_sync_point()), any::<u64>())
            .prop_map(|(since, start_lba)| M::WrittenSince { since, start_lba }),
        (arb_sync_point(), arb_written_answer(), any::<u64>()).prop_map(|(position, answer, end_lba)| {
            M::WrittenSinceOk {
                position,
                answer,
                end_lba,
            }
        }),
        (proptest::option::of(arb_sync_point()), any::<u64>()).prop_map(|(point, r)| M::AdoptSyncPoint {
            point,
            own_revision: Revision(r)
        }),
        arb_sync_point().prop_map(|position| M::AdoptSyncPointOk { position }),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20).prop_map(|v| M::RunCrcs {
            runs: v
                .into_iter()
                .map(|(lba, blocks)| BlockRun { lba, blocks })
                .collect()
        }),
        (
            proptest::collection::vec((any::<u64>(), any::<u32>()), 0..20),
            any::<u64>()
        )
            .prop_map(|(v, end_lba)| M::RunCrcsOk {
                crcs: v.into_iter().map(|(lba, crc)| BlockCrc { lba, crc }).collect(),
                end_lba
            }),
        arb_extents().prop_map(|extents| M::ReadV { extents }),
        arb_bytes(9000).prop_map(|data| M::ReadVOk { data }),
        arb_write_v(),
        Just(M::WriteVOk),
        (any::<u64>(), any::<bool>()).prop_map(|(size_bytes, check_only)| M::Resize {
            size_bytes,
            check_only
        }),
        any::<u64>().prop_map(|size_bytes| M::ResizeOk { size_bytes }),
        (".{0,40}", any::<u64>(), any::<u64>()).prop_map(|(snapshot, start_lba, count)| M::SnapshotRuns {
            snapshot,
            start_lba,
            count
        }),
        (
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20),
            any::<u64>()
        )
            .prop_map(|(v, end_lba)| M::SnapshotRunsOk {
                runs: v
                    .into_iter()
                    .map(|(lba, blocks)| BlockRun { lba, blocks })
                    .collect(),
                end_lba
            }),
        (".{0,40}", any::<u64>(), 0..=MAX_PAYLOAD).prop_map(|(snapshot, offset, len)| M::ReadSnapshot {
            snapshot,
            offset,
            len
        }),
        arb_bytes(9000).prop_map(|data| M::ReadSnapshotOk { data }),
        (".{0,40}", ".{0,40}").prop_map(|(snapshot, holder)| M::SnapshotHold { snapshot, holder }),
        Just(M::SnapshotHoldOk),
        (".{0,40}", ".{0,40}").prop_map(|(snapshot, holder)| M::SnapshotRelease { snapshot, holder }),
        Just(M::SnapshotReleaseOk),
        Just(M::HoldList),
        proptest::collection::vec((".{0,20}", ".{0,20}", any::<i64>()), 0..4).prop_map(|v| M::HoldListOk(
            v.into_iter()
                .map(|(snapshot, holder, since_unix)| pb::SnapshotHold {
                    snapshot,
                    holder,
                    since_unix
                })
                .collect()
        )),
        (
            proptest::sample::select(Op::ALL.to_vec()),
            arb_error(),
            ".{0,200}"
        )
            .prop_map(|(op, error, message)| M::Failed { op, error, message }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (any::<u64>(), any::<u64>(), arb_message()).prop_map(|(id, epoch, message)| Frame {
        id: RequestId(id),
        epoch: Epoch(epoch),
        message,
    })
}

fn wire(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec
        .encode(frame.clone(), &mut buf)
        .expect("frame within limits encodes");
    buf
}

proptest! {
    #[test]
    fn every_frame_survives_a_round_trip(frame in arb_frame()) {
        let mut buf = wire(&frame);
        let decoded = FrameCodec.decode(&mut buf).expect("valid frame decodes");
        prop_assert_eq!(decoded, Some(frame));
        prop_assert!(buf.is_empty(), "decoder consumed exactly one frame");
    }

    #[test]
    fn frames_split_at_any_point_decode_once_complete(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let full = wire(&frame);
        let cut = cut.index(full.len());
        let mut buf = BytesMut::from(&full[..cut]);
        prop_assert!(FrameCodec.decode(&mut buf).expect("a prefix is not an error").is_none());
        buf.extend_from_slice(&full[cut..]);
        prop_assert_eq!(FrameCodec.decode(&mut buf).expect("complete frame decodes"), Some(frame));
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_all(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_corrupted_valid_frames(
        frame in arb_frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let original = wire(&frame).to_vec();
        let mut bytes = original.clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value.max(1);
        }
        // Two flips of the same byte by the same value cancel out: that frame is not corrupted.
        prop_assume!(bytes != original);
        // A corrupted frame must be rejected (the CRC catches payload and
        // header damage alike) unless the decoder is still waiting for bytes.
        let (frames, _err) = decode_all(&bytes);
        prop_assert!(frames.is_empty());
    }

    #[test]
    fn precomputed_payload_crc_encodes_identically(frame in arb_frame()) {
        let plain = frame.encode().expect("encodes");
        let crc = payload_crc(&[&plain.payload_head()[..], &plain.payload()[..]].concat());
        let fast = frame.encode_with_payload_crc(crc).expect("encodes");
        prop_assert_eq!(plain.header(), fast.header());
    }
}

#[test]
fn write_payload_is_not_copied_by_encode() {
    let data = Bytes::from(vec![7u8; 4096]);
    let frame = Frame::new(
        RequestId(1),
        Epoch(1),
        Message::Write {
            offset: 0,
            data: data.clone(),
            fua: true,
        },
    );
    let encoded = frame.encode().expect("encodes");
    assert_eq!(
        encoded.payload().as_ptr(),
        data.as_ptr(),
        "payload shares the caller's buffer"
    );
}

#[test]
fn decoded_payload_is_split_off_the_read_buffer_without_copy() {
    let frame = Frame::new(
        RequestId(9),
        Epoch(2),
        Message::ReadOk {
            data: Bytes::from(vec![1u8; 8192]),
        },
    );
    let mut buf = wire(&frame);
    let payload_addr = buf[HEADER_LEN..].as_ptr();
    let Some(Frame {
        message: Message::ReadOk { data },
        ..
    }) = FrameCodec.decode(&mut buf).expect("decodes")
    else {
        panic!("expected ReadOk");
    };
    assert_eq!(data.as_ptr(), payload_addr);
}

#[test]
fn bad_magic_is_rejected_from_the_first_byte() {
    let mut buf = BytesMut::from(&b"G"[..]);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadMagic { .. })
    ));
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    let err = FrameCodec.decode(&mut buf).unwrap_err();
    assert!(err.to_string().contains("not a Basalt frame"), "{err}");
}

#[test]
fn oversize_length_is_rejected_before_the_payload_arrives() {
    let mut head = wire(&Frame::new(RequestId(1), Epoch(1), Message::Ping));
    head[44..48].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    // Only the header is there: the decoder must not wait for (or reserve)
    // 16 MiB of payload before refusing.
    let capacity_before = head.capacity();
    assert!(matches!(
        FrameCodec.decode(&mut head),
        Err(DecodeError::Oversize { .. })
    ));
    assert_eq!(head.capacity(), capacity_before);
}

#[test]
fn oversize_read_request_is_rejected_both_ways() {
    let frame = Frame::new(
        RequestId(1),
        Epoch(1),
        Message::Read {
            offset: 0,
            len: MAX_PAYLOAD + 1,
        },
    );
    assert!(matches!(frame.encode(), Err(EncodeError::Oversize { .. })));
    let mut buf = wire(&Frame::new(
        RequestId(1),
        Epoch(1),
        Message::Read { offset: 0, len: 4096 },
    ));
    buf[32..40].copy_from_slice(&(u64::from(MAX_PAYLOAD) + 1).to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::Oversize { .. })
    ));
}

#[test]
fn unsupported_version_is_rejected() {
    for found in [99u16, 1] {
        let mut buf = wire(&Frame::new(RequestId(1), Epoch(1), Message::Ping));
        buf[4..6].copy_from_slice(&found.to_le_bytes());
        let err = FrameCodec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnsupportedVersion { found: f } if f == found),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade the older side"), "{err}");
    }
}

#[test]
fn flipped_payload_bit_fails_the_crc() {
    let mut buf = wire(&Frame::new(
        RequestId(1),
        Epoch(1),
        Message::Write {
            offset: 0,
            data: Bytes::from(vec![0u8; 4096]),
            fua: false,
        },
    ));
    buf[HEADER_LEN + 100] ^= 0x10;
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::Crc { .. })
    ));
}

#[test]
fn fua_flag_is_only_valid_on_writes() {
    let mut buf = wire(&Frame::new(RequestId(1), Epoch(1), Message::Flush));
    buf[7] = 0x01;
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadFlags { op: Op::Flush, .. })
    ));
}

#[test]
fn unknown_op_is_rejected() {
    let mut buf = wire(&Frame::new(RequestId(1), Epoch(1), Message::Ping));
    buf[6] = 0x7f;
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::UnknownOp { code: 0x7f })
    ));
}

#[test]
fn failed_reply_message_is_capped() {
    let long = "é".repeat(MAX_ERROR_MESSAGE);
    let frame = Frame::new(
        RequestId(3),
        Epoch(4),
        Message::Failed {
            op: Op::Write,
            error: ReplyError::Io,
            message: long,
        },
    );
    let mut buf = wire(&frame);
    let Some(Frame {
        message: Message::Failed { message, .. },
        ..
    }) = FrameCodec.decode(&mut buf).unwrap()
    else {
        panic!("expected Failed");
    };
    assert!(message.len() <= MAX_ERROR_MESSAGE && message.starts_with('é'));
}

#[test]
fn version_negotiation_picks_the_highest_common_version() {
    let v = ProtocolVersion;
    assert_eq!(
        ProtocolVersion::negotiate(v(1), v(7)),
        Some(ProtocolVersion::CURRENT)
    );
    assert_eq!(ProtocolVersion::negotiate(v(1), v(3)), Some(v(3)));
    // A peer that speaks only v1, before vectored I/O and run checksums: a rebuild could not run.
    assert_eq!(ProtocolVersion::negotiate(v(1), v(1)), None);
    // A v2 peer knows neither Resize nor the clone ops (an expansion or a hydration would close its
    // connection), and neither proves itself nor checks the other side.
    assert_eq!(ProtocolVersion::negotiate(v(1), v(2)), None);
    // A peer that only speaks versions newer than ours.
    let newer = v(ProtocolVersion::CURRENT.0 + 1);
    assert_eq!(ProtocolVersion::negotiate(newer, v(u16::MAX)), None);
    assert_eq!(ProtocolVersion::negotiate(v(0), v(0)), None);
}

#[tokio::test]
async fn batch_writer_writes_many_frames_that_decode_in_order() {
    let frames: Vec<Frame> = (0..100)
        .map(|i| {
            Frame::new(
                RequestId(i),
                Epoch(1),
                Message::Write {
                    offset: i * 4096,
                    data: Bytes::from(vec![i as u8; 4096]),
                    fua: false,
                },
            )
        })
        .collect();
    let mut writer = FrameBatchWriter::new(Vec::new());
    for f in &frames {
        writer.push(f.encode().unwrap());
    }
    assert_eq!(writer.pending_bytes(), 100 * (HEADER_LEN + 4096));
    writer.flush().await.unwrap();
    assert_eq!(writer.pending_bytes(), 0);
    let (decoded, err) = decode_all(writer.get_mut());
    assert!(err.is_none());
    assert_eq!(decoded, frames);
}

fn write_frame(i: u64, len: usize) -> Frame {
    Frame::new(
        RequestId(i),
        Epoch(1),
        Message::Write {
            offset: i * 4096,
            data: Bytes::from(vec![i as u8; len]),
            fua: false,
        },
    )
}

/// A [`FrameSender`] on a loopback connection, its flusher running, and the peer's stream.
async fn sender_and_peer() -> (
    FrameSender,
    tokio::task::JoinHandle<std::io::Result<()>>,
    tokio::net::TcpStream,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (_, write) = connected.unwrap().into_split();
    let (sender, flusher) = frame_sender(write);
    (sender, tokio::spawn(flusher.run()), accepted.unwrap().0)
}

/// Reads frames from `peer` until EOF.
async fn read_all(mut peer: tokio::net::TcpStream) -> Vec<Frame> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    peer.read_to_end(&mut bytes).await.unwrap();
    let (frames, err) = decode_all(&bytes);
    assert!(err.is_none(), "{err:?}");
    frames
}

#[tokio::test]
async fn frame_sender_keeps_order_when_the_socket_pushes_back() {
    let (sender, flusher, peer) = sender_and_peer().await;
    // 64 MiB while the peer reads nothing: far past any socket buffer, so most of it is queued for the
    // flusher while later sends keep arriving, from the sender and from a clone of it.
    let frames: Vec<Frame> = (0..256).map(|i| write_frame(i, 256 << 10)).collect();
    let clone = sender.clone();
    for (i, f) in frames.iter().enumerate() {
        let by = if i % 2 == 0 { &sender } else { &clone };
        by.send([f.encode().unwrap()]).unwrap();
    }
    let reader = tokio::spawn(read_all(peer));
    drop((sender, clone));
    flusher.await.unwrap().unwrap();
    assert_eq!(reader.await.unwrap(), frames);
}

#[tokio::test]
async fn frame_sender_bounded_send_waits_for_the_peer() {
    let (sender, flusher, peer) = sender_and_peer().await;
    let frames: Vec<Frame> = (0..64).map(|i| write_frame(i, 1 << 20)).collect();
    let producer = {
        let frames = frames.clone();
        tokio::spawn(async move {
            for f in &frames {
                sender.send_bounded([f.encode().unwrap()], 2 << 20).await.unwrap();
            }
        })
    };
    // The peer does not read: the producer must stop with a bounded queue, not finish.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !producer.is_finished(),
        "64 MiB were accepted while the peer read nothing"
    );
    let reader = tokio::spawn(read_all(peer));
    producer.await.unwrap();
    flusher.await.unwrap().unwrap();
    assert_eq!(reader.await.unwrap(), frames);
}

#[tokio::test]
async fn frame_sender_refuses_after_the_peer_is_gone() {
    let (sender, flusher, peer) = sender_and_peer().await;
    drop(peer);
    // The first writes may still land in the socket buffer before the reset comes back; within a few
    // sends the connection reports the failure, and the flusher returns it.
    let mut refused = false;
    for i in 0..1000 {
        if sender.send([write_frame(i, 64 << 10).encode().unwrap()]).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(refused, "sends to a closed peer kept succeeding");
    assert!(flusher.await.unwrap().is_err());
}

#[test]
fn magic_is_ascii_bslt() {
    assert_eq!(&MAGIC, b"BSLT");
}

/// Recomputes the CRC after a test edits header fields, so that the check
/// under test is the one that fires.
fn fix_crc(buf: &mut BytesMut) {
    let payload = payload_crc(&buf[HEADER_LEN..]);
    let crc = super::header::frame_crc(&buf[..HEADER_LEN], payload, (buf.len() - HEADER_LEN) as u64);
    buf[48..52].copy_from_slice(&crc.to_le_bytes());
}

/// Cuts the payload one byte short and makes the header agree (length and
/// CRC), so that only the payload's own shape is wrong.
fn drop_last_payload_byte(buf: &mut BytesMut) {
    buf.truncate(buf.len() - 1);
    let payload_len = (buf.len() - HEADER_LEN) as u32;
    buf[44..48].copy_from_slice(&payload_len.to_le_bytes());
    fix_crc(buf);
}

/// The fuzz target's body, run over its checked-in corpus on stable Rust.
/// The seeds are valid frames (all but `truncated` decode completely), so a
/// change that breaks the wire format also fails here.
#[test]
fn fuzz_corpus_decodes_without_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decoder");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus directory exists") {
        let path = entry.expect("readable corpus entry").path();
        let bytes = std::fs::read(&path).expect("readable corpus file");
        let (frames, err) = decode_all(&bytes);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        // libFuzzer adds its own inputs to the corpus; only the seeds have
        // known contents.
        match name.as_str() {
            "pipeline" => assert_eq!(frames.len(), 3, "{name}: {err:?}"),
            "truncated" => assert!(frames.is_empty() && err.is_none(), "{name}: {err:?}"),
            n if n.len() < 40 => assert_eq!((frames.len(), err.is_none()), (1, true), "{name}: {err:?}"),
            _ => {}
        }
        // A seed is what today's encoder writes: one encoded by an older layout (say, a Hello
        // without its nonce) would only exercise the decoder's error paths.
        if name != "truncated" && name.len() < 40 {
            let mut again = BytesMut::new();
            for frame in frames {
                FrameCodec
                    .encode(frame, &mut again)
                    .expect("a decoded frame encodes");
            }
            assert_eq!(
                &again[..],
                &bytes[..],
                "{name}: re-encode the seed with today's encoder"
            );
        }
        seen += 1;
    }
    assert!(seen >= 10, "the corpus holds the seeds");
}

#[test]
fn layer_block_list_with_an_unknown_kind_or_a_tombstone_crc_is_rejected() {
    let frame = Frame::new(
        RequestId(5),
        Epoch(1),
        Message::LayerBlocksOk {
            blocks: vec![LayerBlock {
                lba: 7,
                state: LayerBlockState::Tombstone,
            }],
            end_lba: 8,
        },
    );
    for (at, value) in [(HEADER_LEN + 8, 3u8), (HEADER_LEN + 9, 1u8)] {
        let mut buf = wire(&frame);
        buf[at] = value;
        fix_crc(&mut buf);
        let err = FrameCodec.decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::BadField {
                    op: Op::LayerBlocks,
                    ..
                }
            ),
            "byte {at} = {value}: {err}"
        );
    }
}

#[test]
fn oversize_read_layer_request_is_rejected_both_ways() {
    let frame = Frame::new(
        RequestId(1),
        Epoch(1),
        Message::ReadLayer {
            snapshot: "s".into(),
            offset: 0,
            len: MAX_PAYLOAD + 1,
        },
    );
    assert!(matches!(frame.encode(), Err(EncodeError::Oversize { .. })));
    let mut buf = wire(&Frame::new(
        RequestId(1),
        Epoch(1),
        Message::ReadLayer {
            snapshot: "s".into(),
            offset: 0,
            len: 4096,
        },
    ));
    buf[32..40].copy_from_slice(&(u64::from(MAX_PAYLOAD) + 1).to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::Oversize { .. })
    ));
}

#[test]
fn a_written_since_answer_with_a_short_sync_point_or_a_ragged_run_list_is_rejected() {
    let position = SyncPoint {
        lineage: 1,
        revision: Revision(2),
        epoch: Epoch(3),
    };
    let frame = Frame::new(
        RequestId(5),
        Epoch(1),
        Message::WrittenSinceOk {
            position,
            answer: WrittenAnswer::Regions(vec![BlockRun { lba: 16, blocks: 16 }]),
            end_lba: 64,
        },
    );
    // An unknown answer kind.
    let mut buf = wire(&frame);
    buf[HEADER_LEN + SyncPoint::WIRE_LEN] = 9;
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField {
            op: Op::WrittenSince,
            ..
        })
    ));
    // A run list that is not a whole number of 16-byte runs.
    let mut buf = wire(&frame);
    drop_last_payload_byte(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField {
            op: Op::WrittenSince,
            ..
        })
    ));
    // A request whose sync point is cut short.
    let mut buf = wire(&Frame::new(
        RequestId(6),
        Epoch(1),
        Message::AdoptSyncPoint {
            point: Some(position),
            own_revision: Revision(7),
        },
    ));
    buf.truncate(buf.len() - 8);
    let payload_len = (buf.len() - HEADER_LEN) as u32;
    buf[44..48].copy_from_slice(&payload_len.to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField {
            op: Op::AdoptSyncPoint,
            ..
        })
    ));
}

#[test]
fn a_run_checksum_listing_with_a_ragged_run_list_or_a_stray_field_is_rejected() {
    let runs = vec![BlockRun { lba: 0, blocks: 16 }, BlockRun { lba: 64, blocks: 16 }];
    let request = Frame::new(RequestId(7), Epoch(1), Message::RunCrcs { runs });
    // A run list that is not a whole number of 16-byte runs.
    let mut buf = wire(&request);
    drop_last_payload_byte(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField { op: Op::RunCrcs, .. })
    ));
    // The request has no offset of its own: a later version may give it one.
    let mut buf = wire(&request);
    buf[24..32].copy_from_slice(&5u64.to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField { op: Op::RunCrcs, .. })
    ));
    // An answer whose checksum list is ragged.
    let answer = Frame::new(
        RequestId(7),
        Epoch(1),
        Message::RunCrcsOk {
            crcs: vec![BlockCrc { lba: 3, crc: 9 }],
            end_lba: 80,
        },
    );
    let mut buf = wire(&answer);
    drop_last_payload_byte(&mut buf);
    assert!(matches!(
        FrameCodec.decode(&mut buf),
        Err(DecodeError::BadField { op: Op::RunCrcs, .. })
    ));
}

/// Replaces the payload and makes the header agree (payload length, CRC), so
/// that only the payload's content is wrong.
fn set_payload(buf: &mut BytesMut, payload: &[u8]) {
    buf.truncate(HEADER_LEN);
    buf.extend_from_slice(payload);
    buf[44..48].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    fix_crc(buf);
}

/// An extent list as it travels: offset (u64 LE), len (u32 LE) each.
fn extent_bytes(extents: &[(u64, u32)]) -> Vec<u8> {
    extents
        .iter()
        .flat_map(|(offset, len)| offset.to_le_bytes().into_iter().chain(len.to_le_bytes()))
        .collect()
}

fn decode_error(buf: &mut BytesMut) -> DecodeError {
    FrameCodec.decode(buf).expect_err("the frame must be refused")
}

#[test]
fn a_vectored_read_with_an_invalid_extent_list_is_rejected_with_the_reason() {
    let request = Frame::new(
        RequestId(8),
        Epoch(1),
        Message::ReadV {
            extents: vec![Extent { offset: 0, len: 4096 }],
        },
    );
    let refused = |extents: &[(u64, u32)]| {
        let mut buf = wire(&request);
        set_payload(&mut buf, &extent_bytes(extents));
        match decode_error(&mut buf) {
            DecodeError::BadExtents {
                op: Op::ReadV,
                source,
            } => source,
            other => panic!("{extents:?}: {other}"),
        }
    };
    assert_eq!(refused(&[]), ExtentsError::Empty);
    let many: Vec<(u64, u32)> = (0..=MAX_EXTENTS as u64).map(|i| (i * 8192, 4096)).collect();
    assert_eq!(
        refused(&many),
        ExtentsError::TooMany {
            count: MAX_EXTENTS + 1
        }
    );
    assert_eq!(
        refused(&[(0, 4096), (8192, 0)]),
        ExtentsError::EmptyExtent { index: 1 }
    );
    assert_eq!(
        refused(&[(8192, 4096), (4096, 4096)]),
        ExtentsError::OutOfOrder { index: 1 },
        "extents must come in order"
    );
    assert_eq!(
        refused(&[(0, 8192), (4096, 4096)]),
        ExtentsError::OutOfOrder { index: 1 },
        "and must not overlap"
    );
    assert_eq!(
        refused(&[(u64::MAX - 4095, 8192)]),
        ExtentsError::PastTheEnd { index: 0 }
    );
    assert_eq!(
        refused(&[(0, MAX_VECTORED_BYTES), (1 << 30, 4096)]),
        ExtentsError::TooLarge {
            total: u64::from(MAX_VECTORED_BYTES) + 4096
        }
    );
    // Touching extents are fine: in order, without overlap.
    let mut buf = wire(&request);
    set_payload(&mut buf, &extent_bytes(&[(0, 4096), (4096, 4096)]));
    assert!(FrameCodec.decode(&mut buf).expect("decodes").is_some());

    // A list that is not a whole number of 12-byte extents.
    let mut buf = wire(&request);
    drop_last_payload_byte(&mut buf);
    assert!(
        matches!(
            decode_error(&mut buf),
            DecodeError::BadField { op: Op::ReadV, .. }
        ),
        "ragged list"
    );
    // The request has no offset or length of its own.
    for field in [24..32, 32..40] {
        let mut buf = wire(&request);
        buf[field.clone()].copy_from_slice(&5u64.to_le_bytes());
        fix_crc(&mut buf);
        let err = decode_error(&mut buf);
        assert!(
            matches!(
                err,
                DecodeError::BadField { op: Op::ReadV, .. }
                    | DecodeError::LengthMismatch { op: Op::ReadV, .. }
            ),
            "{field:?}: {err}"
        );
    }
}

#[test]
fn a_vectored_write_whose_data_does_not_fill_its_extents_is_rejected() {
    let request = Frame::new(
        RequestId(9),
        Epoch(1),
        Message::WriteV {
            extents: vec![
                Extent { offset: 0, len: 4096 },
                Extent {
                    offset: 65536,
                    len: 4096,
                },
            ],
            data: Bytes::from(vec![5u8; 8192]),
        },
    );
    // One byte of data short: the extents hold more than the length field says.
    let mut buf = wire(&request);
    drop_last_payload_byte(&mut buf);
    buf[32..40].copy_from_slice(&8191u64.to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::BadField { op: Op::WriteV, .. }
    ));
    // A length field longer than the whole payload.
    let mut buf = wire(&request);
    buf[32..40].copy_from_slice(&(1u64 << 20).to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::LengthMismatch { op: Op::WriteV, .. }
    ));
    // A length field that cuts the extent list.
    let mut buf = wire(&request);
    buf[32..40].copy_from_slice(&8192u64.wrapping_add(1).to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::BadField { op: Op::WriteV, .. }
    ));
    // An invalid list is refused like a ReadV's.
    let mut buf = wire(&request);
    let mut payload = extent_bytes(&[(65536, 4096), (0, 4096)]);
    payload.extend_from_slice(&[5u8; 8192]);
    set_payload(&mut buf, &payload);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::BadExtents {
            op: Op::WriteV,
            source: ExtentsError::OutOfOrder { index: 1 }
        }
    ));
}

#[test]
fn a_sender_cannot_encode_a_vectored_request_the_replica_would_refuse() {
    let encode = |message| Frame::new(RequestId(1), Epoch(1), message).encode().err();
    assert!(matches!(
        encode(Message::ReadV { extents: vec![] }),
        Some(EncodeError::Extents(ExtentsError::Empty))
    ));
    assert!(matches!(
        encode(Message::WriteV {
            extents: vec![Extent { offset: 0, len: 4096 }],
            data: Bytes::from(vec![0u8; 4095]),
        }),
        Some(EncodeError::ExtentsMismatch {
            extents: 4096,
            data: 4095
        })
    ));
}

#[test]
fn vectored_write_data_is_not_copied_by_encode() {
    let data = Bytes::from(vec![7u8; 8192]);
    let frame = Frame::new(
        RequestId(1),
        Epoch(1),
        Message::WriteV {
            extents: vec![
                Extent { offset: 0, len: 4096 },
                Extent {
                    offset: 1 << 20,
                    len: 4096,
                },
            ],
            data: data.clone(),
        },
    );
    let encoded = frame.encode().expect("encodes");
    assert_eq!(encoded.payload().as_ptr(), data.as_ptr());
    assert_eq!(encoded.payload_head().len(), 2 * Extent::WIRE_LEN);
    assert_eq!(encoded.wire_len(), HEADER_LEN + 2 * Extent::WIRE_LEN + 8192);
}

proptest! {
    /// The writer hands frames to the socket through `Buf`: consumed in any
    /// steps (a socket takes what it takes), a frame yields exactly its wire
    /// bytes, a vectored write's three pieces included.
    #[test]
    fn an_encoded_frame_yields_its_wire_bytes_whatever_the_steps(
        frame in arb_frame(),
        steps in proptest::collection::vec(1usize..200, 1..50),
    ) {
        use bytes::Buf;
        let expected = wire(&frame);
        let mut encoded = frame.encode().expect("encodes");
        let mut got = Vec::new();
        for step in steps.into_iter().cycle() {
            if !encoded.has_remaining() {
                break;
            }
            let mut slices = [std::io::IoSlice::new(&[]); 3];
            let n = encoded.chunks_vectored(&mut slices);
            let gathered: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            prop_assert_eq!(gathered.len(), encoded.remaining());
            let take = step.min(encoded.remaining());
            got.extend_from_slice(&gathered[..take]);
            encoded.advance(take);
        }
        prop_assert_eq!(got, expected.to_vec());
    }
}

#[test]
fn a_resize_carries_its_size_and_check_flag_and_refuses_anything_else() {
    let resize = |check_only| {
        wire(&Frame::new(
            RequestId(5),
            Epoch(2),
            Message::Resize {
                size_bytes: 20 << 30,
                check_only,
            },
        ))
    };
    for check_only in [false, true] {
        let mut buf = resize(check_only);
        let frame = FrameCodec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            frame.message,
            Message::Resize {
                size_bytes: 20 << 30,
                check_only
            }
        );
    }
    // The FUA flag means nothing to a resize, and no other flag either.
    for flags in [0x01, 0x04, 0x80] {
        let mut buf = resize(false);
        buf[7] = flags;
        fix_crc(&mut buf);
        assert!(
            matches!(
                decode_error(&mut buf),
                DecodeError::BadFlags { op: Op::Resize, .. }
            ),
            "flags {flags:#x}"
        );
    }
    // The check flag is the request's: a reply may not carry it.
    let mut buf = wire(&Frame::new(
        RequestId(5),
        Epoch(2),
        Message::ResizeOk { size_bytes: 1 << 30 },
    ));
    buf[7] = 0x02;
    fix_crc(&mut buf);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::BadFlags { op: Op::Resize, .. }
    ));
    // A resize carries no data and no length.
    let mut buf = resize(false);
    set_payload(&mut buf, &[1, 2, 3]);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::UnexpectedPayload { op: Op::Resize, .. }
    ));
    let mut buf = resize(false);
    buf[32..40].copy_from_slice(&7u64.to_le_bytes());
    fix_crc(&mut buf);
    assert!(matches!(
        decode_error(&mut buf),
        DecodeError::UnexpectedPayload { op: Op::Resize, .. }
    ));
}

#[test]
fn the_refusals_of_a_resize_keep_their_detail_on_the_wire() {
    for error in [
        ReplyError::ShrinkRefused { size_bytes: 1 << 30 },
        ReplyError::TooLarge { max_bytes: 3 << 40 },
    ] {
        let frame = Frame::new(RequestId(1), Epoch(1), Message::failed(Op::Resize, error));
        let mut buf = wire(&frame);
        assert_eq!(FrameCodec.decode(&mut buf).unwrap().unwrap(), frame);
        assert_eq!(ReplyError::from_wire(error.code(), error.detail()), Some(error));
    }
    assert_eq!(ReplyError::ShrinkRefused { size_bytes: 0 }.code(), 14);
    assert_eq!(ReplyError::TooLarge { max_bytes: 0 }.code(), 15);
}
