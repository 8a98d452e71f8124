//! One replica connection: the handshake (Hello, the replica's proof checked,
//! our Auth: see `basalt_proto::auth`), then two tasks.
//!
//! ```text
//!   driver ──(JobId, ReplicaRequest)── one writev per turn ─────────────────► replica
//!            └─ what the socket did not take ─► flusher task ──writev──────►
//!   driver ◄──────── Event::Reply / Event::Lost ◄──── reader task ◄──frames──── replica
//! ```
//!
//! The driver writes everything it produced for a replica in one turn with
//! one vectored write on its own task (`basalt_proto::frame::FrameSender`), so
//! a burst of 32 writes costs one syscall and a single write no task hop;
//! payloads are the guest's `Bytes`, never copied. The reader maps each reply
//! to an [`Event`] for the volume core and reports [`Event::Lost`] the moment
//! the connection breaks, so a dead replica is dropped at once rather than
//! after a timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::auth::{ClientHandshake, HandshakeError, VolumeSecret};
use basalt_proto::frame::{
    frame_sender, payload_crc, Frame, FrameBatchWriter, FrameCodec, FrameSender, Message, ReplicaIdentity,
    ReplyError, RequestId,
};
use basalt_proto::{Epoch, VolumeId};
use futures::StreamExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use basalt_proto::pb::replica as pb;
use prost::Message as _;

use super::core::{ClientId, ControlOp, Event, JobId, ReplicaReply, ReplicaRequest};

/// Longest wait for the answer to one control or metadata request (a
/// checksum listing of 2^16 blocks, a page of a layer, a flush): far above
/// what a healthy replica needs, well below what an operator would wait.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a replica could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to replica {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("replica {addr} did not answer the handshake within {0:?}", timeout)]
    Timeout { addr: String, timeout: Duration },
    #[error("replica {addr} refused the handshake: {message}")]
    Refused {
        addr: String,
        error: ReplyError,
        message: String,
    },
    #[error("replica {addr} broke the protocol during the handshake: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("refusing replica {addr}: {source}")]
    NotProven {
        addr: String,
        #[source]
        source: HandshakeError,
    },
}

/// A connected replica whose identity is known, before its I/O tasks start.
pub struct Handshaken {
    pub identity: ReplicaIdentity,
    /// The membership the replica had recorded when it authenticated us.
    pub membership: Option<pb::Membership>,
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: FrameBatchWriter<OwnedWriteHalf>,
    next_id: u64,
}

impl Handshaken {
    /// Connect to `addr`, say Hello, and authenticate both ways with
    /// `secret`. `volume` may be nil (survey: the replica tells who it is);
    /// an `epoch` above the replica's raises it durably, which is how a new
    /// controller fences older ones.
    pub async fn connect(
        addr: &str,
        volume: VolumeId,
        epoch: Epoch,
        secret: &VolumeSecret,
        timeout: Duration,
    ) -> Result<Handshaken, LinkError> {
        Self::connect_as(addr, volume, epoch, secret, timeout, false).await
    }

    /// Like [`Handshaken::connect`], for a connection that will carry the
    /// volume's writes: it becomes the replica's only writer, so frames an
    /// older link of ours (or of a dead controller) left in flight can never
    /// change the replica after this one takes over.
    pub async fn connect_writer(
        addr: &str,
        volume: VolumeId,
        epoch: Epoch,
        secret: &VolumeSecret,
        timeout: Duration,
    ) -> Result<Handshaken, LinkError> {
        Self::connect_as(addr, volume, epoch, secret, timeout, true).await
    }

    async fn connect_as(
        addr: &str,
        volume: VolumeId,
        epoch: Epoch,
        secret: &VolumeSecret,
        timeout: Duration,
        writer: bool,
    ) -> Result<Handshaken, LinkError> {
        let fut = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| LinkError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            let _ = stream.set_nodelay(true);
            // A replica cut off the network never closes: fail within the bound, not after ~15 min.
            if let Err(e) = basalt_proto::peer::detect_dead_peer(&stream) {
                tracing::warn!(replica = %addr, error = %e, "cannot turn on dead-peer detection");
            }
            let (r, w) = stream.into_split();
            let mut conn = Handshaken {
                identity: ReplicaIdentity {
                    volume,
                    size_bytes: 0,
                    epoch,
                    revision: Default::default(),
                },
                membership: None,
                reader: FramedRead::new(r, FrameCodec),
                writer: FrameBatchWriter::new(w),
                next_id: 1,
            };
            let handshake = ClientHandshake::new(volume);
            let hello = conn.call(addr, epoch, handshake.hello(writer)).await?;
            let (_, auth) = handshake
                .answer(secret, hello)
                .map_err(|source| LinkError::NotProven {
                    addr: addr.to_string(),
                    source,
                })?;
            match conn.call(addr, epoch, auth).await? {
                Message::AuthOk { replica, membership } => {
                    conn.identity = replica;
                    conn.membership = membership;
                }
                other => return Err(unexpected(addr, &other)),
            }
            Ok(conn)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.to_string(),
                timeout,
            })?
    }

    /// Raise the replica's epoch durably (the fence against older
    /// controllers) and learn its identity again.
    pub async fn raise_epoch(&mut self, addr: &str, epoch: Epoch) -> Result<(), LinkError> {
        match self.call(addr, epoch, Message::SetEpoch).await? {
            Message::SetEpochOk => {
                self.identity.epoch = epoch;
                Ok(())
            }
            other => Err(unexpected(addr, &other)),
        }
    }

    /// One request, one reply (for control and metadata requests on a
    /// connection that has no I/O tasks).
    ///
    /// Bounded by [`REQUEST_TIMEOUT`]: a rebuild talking to a replica that
    /// went silent (cut off, paused) fails and is retried instead of hanging.
    pub async fn request(
        &mut self,
        addr: &str,
        epoch: Epoch,
        message: Message,
    ) -> Result<Message, LinkError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call(addr, epoch, message))
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.to_string(),
                timeout: REQUEST_TIMEOUT,
            })?
    }

    /// One request, one reply, before the I/O tasks take over the socket.
    async fn call(&mut self, addr: &str, epoch: Epoch, message: Message) -> Result<Message, LinkError> {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let frame = Frame::new(id, epoch, message)
            .encode()
            .map_err(|e| LinkError::Protocol {
                addr: addr.to_string(),
                detail: e.to_string(),
            })?;
        self.writer.push(frame);
        self.writer.flush().await.map_err(|source| LinkError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        match self.reader.next().await {
            Some(Ok(reply)) if reply.id == id => match reply.message {
                Message::Failed { error, message, .. } => Err(LinkError::Refused {
                    addr: addr.to_string(),
                    error,
                    message,
                }),
                m => Ok(m),
            },
            Some(Ok(reply)) => Err(LinkError::Protocol {
                addr: addr.to_string(),
                detail: format!("reply to {} while waiting for {id}", reply.id),
            }),
            Some(Err(e)) => Err(LinkError::Protocol {
                addr: addr.to_string(),
                detail: e.to_string(),
            }),
            None => Err(LinkError::Protocol {
                addr: addr.to_string(),
                detail: "connection closed during the handshake".into(),
            }),
        }
    }

    /// Start the I/O tasks. Requests sent on the returned channel go out in
    /// order; every reply, and the loss of the connection, arrive as events.
    pub fn start(
        self,
        client: ClientId,
        epoch: Epoch,
        events: mpsc::UnboundedSender<Event>,
        revision: Arc<AtomicU64>,
    ) -> Link {
        revision.store(self.identity.revision.0, Ordering::Relaxed);
        let (sender, flusher) = frame_sender(self.writer.into_inner());
        let lost = events.clone();
        let writer = tokio::spawn(async move {
            if let Err(e) = flusher.run().await {
                let _ = lost.send(Event::Lost {
                    client,
                    cause: format!("connection lost while sending: {e}"),
                });
            }
        });
        let reader = tokio::spawn(read_loop(client, self.reader, events.clone(), revision));
        Link {
            client,
            epoch,
            sender,
            broken: std::cell::Cell::new(false),
            events,
            writer,
            reader,
        }
    }
}

fn unexpected(addr: &str, m: &Message) -> LinkError {
    LinkError::Protocol {
        addr: addr.to_string(),
        detail: format!("unexpected reply {:?}", m.op()),
    }
}

/// A request for the writer task, with the payload CRC when the driver has
/// already computed it (one CRC for a write sent to three replicas).
pub struct Outgoing {
    pub job: JobId,
    pub request: ReplicaRequest,
    pub payload_crc: Option<u32>,
}

/// The running I/O tasks of one replica connection. Dropping it closes the
/// connection.
pub struct Link {
    client: ClientId,
    epoch: Epoch,
    /// Requests are written by the owner task itself, everything it produced
    /// for this replica in one turn in one vectored write; only what the
    /// socket does not take at once goes through the flusher task (`writer`).
    /// At queue depth 1 that saves a wake-up and a poll of a writer task per
    /// replica between the owner and the socket.
    sender: FrameSender,
    /// A request could not be encoded: nothing more is sent on this link
    /// (it would arrive with a gap), and the replica is being dropped.
    broken: std::cell::Cell<bool>,
    events: mpsc::UnboundedSender<Event>,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Send requests, in order after every request sent before. If the
    /// connection failed, the flusher has reported it (the replica is being
    /// dropped) and the requests go nowhere.
    pub fn send(&self, batch: Vec<Outgoing>) {
        if self.broken.get() {
            return;
        }
        let mut frames = Vec::with_capacity(batch.len());
        for out in batch {
            let frame = Frame::new(RequestId(out.job.0), self.epoch, to_message(out.request));
            let encoded = match out.payload_crc {
                Some(crc) => frame.encode_with_payload_crc(crc),
                None => frame.encode(),
            };
            match encoded {
                Ok(f) => frames.push(f),
                Err(e) => {
                    self.broken.set(true);
                    let _ = self.events.send(Event::Lost {
                        client: self.client,
                        cause: format!("cannot encode a request: {e}"),
                    });
                    return;
                }
            }
        }
        // An error means an earlier write failed; the flusher reports it.
        let _ = self.sender.send(frames);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}

/// CRC of a write payload, computed once and shared by every replica's frame.
/// A rebuild's `WriteV` goes to one replica only: its frame computes its own.
pub fn write_crc(request: &ReplicaRequest) -> Option<u32> {
    match request {
        ReplicaRequest::Write { data, .. } => Some(payload_crc(data)),
        _ => None,
    }
}

fn to_message(request: ReplicaRequest) -> Message {
    match request {
        ReplicaRequest::Read { offset, len } => Message::Read { offset, len },
        ReplicaRequest::Write { offset, data, fua } => Message::Write { offset, data, fua },
        ReplicaRequest::Flush => Message::Flush,
        ReplicaRequest::Unmap { offset, len } => Message::Unmap { offset, len },
        ReplicaRequest::Control(ControlOp::SnapshotCreate(name)) => Message::SnapshotCreate { name },
        ReplicaRequest::Control(ControlOp::SnapshotList) => Message::SnapshotList,
        ReplicaRequest::Control(ControlOp::SnapshotDelete(name)) => Message::SnapshotDelete { name },
        ReplicaRequest::Control(ControlOp::SnapshotRevert(name)) => Message::SnapshotRevert { name },
        ReplicaRequest::Control(ControlOp::HoldList) => Message::HoldList,
        ReplicaRequest::Control(ControlOp::SnapshotRelease { name, holder }) => Message::SnapshotRelease {
            snapshot: name,
            holder,
        },
        ReplicaRequest::Control(ControlOp::Info) => Message::Info,
        ReplicaRequest::Control(ControlOp::SetMembership(m)) => Message::SetMembership(m),
        ReplicaRequest::Control(ControlOp::Resize(size_bytes)) => Message::Resize {
            size_bytes,
            check_only: false,
        },
        ReplicaRequest::Control(ControlOp::ResizeCheck(size_bytes)) => Message::Resize {
            size_bytes,
            check_only: true,
        },
        ReplicaRequest::ReadV { extents } => Message::ReadV { extents },
        ReplicaRequest::WriteV { extents, data } => Message::WriteV { extents, data },
        ReplicaRequest::BlockCrcs { start_lba, count } => Message::BlockCrcs { start_lba, count },
    }
}

async fn read_loop(
    client: ClientId,
    mut reader: FramedRead<OwnedReadHalf, FrameCodec>,
    events: mpsc::UnboundedSender<Event>,
    revision: Arc<AtomicU64>,
) {
    let cause = loop {
        let frame = match reader.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => break format!("protocol error from replica: {e}"),
            None => break "connection closed by the replica".to_string(),
        };
        basalt_poll::activity();
        let reply = match frame.message {
            Message::ReadOk { data } | Message::ReadVOk { data } => ReplicaReply::Ok(data),
            Message::FlushOk { revision: r } => {
                revision.fetch_max(r.0, Ordering::Relaxed);
                // The revision this flush got, for a rebuild's drain (see `Volume::drain_revisions`).
                ReplicaReply::Ok(bytes::Bytes::copy_from_slice(&r.0.to_le_bytes()))
            }
            Message::WriteOk
            | Message::WriteVOk
            | Message::UnmapOk
            | Message::Pong
            | Message::SnapshotDeleteOk
            | Message::SnapshotRevertOk
            | Message::SnapshotReleaseOk
            | Message::SetMembershipOk => ReplicaReply::Ok(Default::default()),
            // The replica's size after a resize (or now, for a check).
            Message::ResizeOk { size_bytes } => {
                ReplicaReply::Ok(bytes::Bytes::copy_from_slice(&size_bytes.to_le_bytes()))
            }
            // Control answers travel to the management API as their
            // protobuf encoding.
            Message::SnapshotCreateOk(info) => ReplicaReply::Ok(info.encode_to_vec().into()),
            Message::SnapshotListOk(snapshots) => {
                ReplicaReply::Ok(pb::SnapshotList { snapshots }.encode_to_vec().into())
            }
            Message::HoldListOk(holds) => ReplicaReply::Ok(pb::HoldList { holds }.encode_to_vec().into()),
            Message::InfoOk(info) => ReplicaReply::Ok(info.encode_to_vec().into()),
            Message::BlockCrcsOk(blocks) => ReplicaReply::Ok(super::allocation::encode(&blocks)),
            Message::Failed {
                error: ReplyError::ChecksumMismatch { lba },
                ..
            } => ReplicaReply::ChecksumMismatch { lba },
            Message::Failed {
                error: ReplyError::StaleEpoch { current },
                ..
            } => {
                // A newer controller owns this replica: we are fenced out.
                break format!("fenced: the replica has accepted {current}, newer than ours");
            }
            Message::Failed { error, message, .. } => {
                ReplicaReply::Failed(format!("{}: {message}", error.name()))
            }
            other => break format!("unexpected message from replica: {:?}", other.op()),
        };
        if events
            .send(Event::Reply {
                client,
                job: JobId(frame.id.0),
                reply,
            })
            .is_err()
        {
            return;
        }
    };
    let _ = events.send(Event::Lost { client, cause });
}
