//! # `ReplicaClient`: a pipelined client of one replica
//!
//! The base of a controller's per-replica I/O task, kept lean:
//!
//! ```text
//!   call() --(encode; id -> pending map)--> unbounded queue --> writer task --writev--> socket
//!   Reply future <--(oneshot, matched by id)-- reader task <--decode------------------- socket
//! ```
//!
//! * **Pipelined.** Any number of requests may be in flight; replies are
//!   matched by [`RequestId`] and may complete in any order.
//! * **Ordered at call time.** A request is queued for the socket when the
//!   method is *called*, not when its future is first polled, so the order
//!   of calls is the order on the wire, which is the order the replica
//!   applies writes in. The queue is unbounded on purpose: the controller
//!   already bounds its queue depth, and a bounded queue would force either
//!   `async` submission (order decided by polling) or dropped requests.
//! * **Zero copy.** A write's `Bytes` goes to the socket by reference
//!   ([`Frame::encode`] renders only the header); the writer task batches
//!   every queued frame into one vectored write.
//! * **Cancellation safe.** Dropping a [`Reply`] forgets the request: its
//!   entry is removed and a late reply is discarded. The request itself was
//!   already sent and may still execute on the replica (a dropped write may
//!   or may not have happened), exactly like a request whose connection
//!   broke: the controller must treat its outcome as unknown.
//! * **Failure is total.** When the connection breaks, every pending and
//!   every later request fails with [`ClientError::Disconnected`], with the
//!   reason; reconnecting is the caller's decision.
//!
//! It lives in `basalt-proto`, beside the frames and the handshake it
//! speaks, rather than in `basalt-replica` with the server: a controller
//! needs the client and nothing of the store, and the client needs nothing
//! but the frames, the handshake and [`crate::peer`]. A crate of its own
//! would cut no dependency (this one already builds on tokio for
//! [`FrameBatchWriter`]) and would split one protocol across two crates.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use crate::auth::{ClientHandshake, HandshakeError, VolumeSecret};
use crate::frame::{
    EncodeError, EncodedFrame, Frame, FrameBatchWriter, FrameCodec, Message, Op, ProtocolVersion,
    ReplicaIdentity, ReplyError, RequestId,
};
use crate::pb::replica as pb;
use crate::{Epoch, Revision, VolumeId};
use bytes::Bytes;
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

/// The writer task writes once this much is queued, even if more is ready.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Why a request to a replica did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to replica at {addr}: {source}; is `basalt replica` running there?")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the replica is lost ({reason}); requests in flight have an unknown outcome")]
    Disconnected { reason: String },
    #[error("request cannot be sent: {0}")]
    Encode(#[from] EncodeError),
    #[error("replica refused {op}: {message}")]
    Replica {
        op: Op,
        error: ReplyError,
        message: String,
    },
    #[error("replica answered {op} with an unexpected {got}; the replica is not speaking this protocol")]
    UnexpectedReply { op: Op, got: &'static str },
    #[error("refusing the replica: {0}")]
    Handshake(#[from] HandshakeError),
}

impl ClientError {
    /// The replica's status, if the replica refused the request.
    pub fn reply_error(&self) -> Option<ReplyError> {
        match self {
            ClientError::Replica { error, .. } => Some(*error),
            _ => None,
        }
    }
}

type Waiter = oneshot::Sender<Result<Message, ClientError>>;

/// Requests awaiting a reply, or why there will be none.
struct Pending {
    waiters: HashMap<RequestId, Waiter>,
    closed: Option<String>,
}

struct Inner {
    pending: Mutex<Pending>,
    outgoing: mpsc::UnboundedSender<EncodedFrame>,
    next_id: AtomicU64,
    epoch: AtomicU64,
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails every waiter and every later request with `reason`.
    fn close(&self, reason: String) {
        let waiters = {
            let mut pending = self.pending();
            pending.closed.get_or_insert(reason.clone());
            std::mem::take(&mut pending.waiters)
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(ClientError::Disconnected {
                reason: reason.clone(),
            }));
        }
    }
}

/// A connection to one replica, after a successful Hello.
pub struct ReplicaClient {
    inner: Arc<Inner>,
    identity: ReplicaIdentity,
    membership: Option<pb::Membership>,
    version: ProtocolVersion,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        // The writer ends by itself once `outgoing` is dropped; the reader
        // would wait for the replica to close, so stop it now.
        self.tasks[1].abort();
        self.inner.close("the client was dropped".into());
    }
}

impl ReplicaClient {
    /// Connects to `addr`, says Hello for `volume` at `epoch`, and
    /// authenticates both ways with `secret` (see `basalt_proto::auth`): a
    /// replica that cannot prove it knows the secret is refused
    /// ([`ClientError::Handshake`]), and one that finds our proof wrong
    /// refuses us. A nil `volume` (`VolumeId(Uuid::nil())`) asks the replica
    /// who it is instead of checking. An `epoch` higher than the replica's
    /// raises it durably (fencing older controllers); a lower one changes
    /// nothing, and [`ReplicaClient::identity`] shows the replica's epoch: a
    /// controller surveys replicas this way before it picks its epoch.
    ///
    /// The connection takes the replica's writer role; see
    /// [`ReplicaClient::connect_as`] for one that only reads.
    pub async fn connect(
        addr: SocketAddr,
        volume: VolumeId,
        epoch: Epoch,
        secret: &VolumeSecret,
    ) -> Result<ReplicaClient, ClientError> {
        Self::connect_as(addr, volume, epoch, true, secret).await
    }

    /// Like [`ReplicaClient::connect`]; with `as_writer: false` the connection
    /// leaves the replica's writer role where it is, so it can read and list
    /// (a rebuild reading its source) without shutting out the connection
    /// that carries the volume's writes.
    pub async fn connect_as(
        addr: SocketAddr,
        volume: VolumeId,
        epoch: Epoch,
        as_writer: bool,
        secret: &VolumeSecret,
    ) -> Result<ReplicaClient, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        // A replica cut off the network never closes: fail within the bound, not after ~15 min.
        if let Err(e) = crate::peer::detect_dead_peer(&stream) {
            tracing::warn!(%addr, error = %e, "cannot turn on dead-peer detection");
        }
        let (rx, tx) = stream.into_split();
        let (outgoing, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                closed: None,
            }),
            outgoing,
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(epoch.0),
        });
        // The writer holds `inner` weakly: `inner` owns the queue's sender,
        // so a strong reference would keep the queue (and the socket) open
        // after the client is dropped -- one leaked connection per client.
        let writer = tokio::spawn(write_frames(tx, queue, Arc::downgrade(&inner)));
        let reader = tokio::spawn(read_replies(FramedRead::new(rx, FrameCodec), inner.clone()));
        let mut client = ReplicaClient {
            inner,
            identity: ReplicaIdentity {
                volume,
                size_bytes: 0,
                epoch,
                revision: Revision(0),
            },
            membership: None,
            version: ProtocolVersion::CURRENT,
            tasks: [writer, reader],
        };
        let handshake = ClientHandshake::new(volume);
        let hello = client.call(handshake.hello(as_writer)).await?;
        let (version, auth) = handshake.answer(secret, hello)?;
        match client.call(auth).await? {
            Message::AuthOk { replica, membership } => {
                client.identity = replica;
                client.membership = membership;
                client.version = version;
                Ok(client)
            }
            other => Err(unexpected(Op::Auth, &other)),
        }
    }

    /// The membership the replica had recorded when it authenticated us.
    pub fn membership(&self) -> Option<&pb::Membership> {
        self.membership.as_ref()
    }

    /// Records the volume's membership on the replica, durably (this
    /// connection must be the replica's writer).
    pub fn set_membership(
        &self,
        membership: pb::Membership,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(
            self.call(Message::SetMembership(membership)),
            Op::SetMembership,
            |m| matches!(m, Message::SetMembershipOk).then_some(()),
        )
    }

    /// The replica as it introduced itself once authenticated (after the Hello's epoch took effect).
    pub fn identity(&self) -> ReplicaIdentity {
        self.identity
    }

    /// The protocol version agreed at Hello.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The epoch this client stamps on its requests.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.inner.epoch.load(Ordering::Acquire))
    }

    /// Sends any request; the returned [`Reply`] resolves to the replica's
    /// successful reply (a `Failed` reply becomes [`ClientError::Replica`]).
    /// The request is queued for the socket before this returns.
    pub fn call(&self, message: Message) -> Reply {
        self.call_at(self.epoch(), message)
    }

    fn call_at(&self, epoch: Epoch, message: Message) -> Reply {
        let op = message.op().0;
        let (tx, rx) = oneshot::channel();
        let id = RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let early = |e| Reply {
            op,
            state: ReplyState::Ready(Some(e)),
            guard: None,
        };
        let encoded = match Frame::new(id, epoch, message).encode() {
            Ok(encoded) => encoded,
            Err(e) => return early(ClientError::Encode(e)),
        };
        {
            let mut pending = self.inner.pending();
            if let Some(reason) = &pending.closed {
                return early(ClientError::Disconnected {
                    reason: reason.clone(),
                });
            }
            pending.waiters.insert(id, tx);
            // Queued under the lock so that `close` cannot slip between the
            // check and the send and leave this waiter behind.
            if self.inner.outgoing.send(encoded).is_err() {
                pending.waiters.remove(&id);
                return early(ClientError::Disconnected {
                    reason: "the writer task has stopped".into(),
                });
            }
        }
        Reply {
            op,
            state: ReplyState::Waiting(rx),
            guard: Some(Forget {
                inner: self.inner.clone(),
                id,
            }),
        }
    }

    /// Reads `len` bytes at byte `offset`.
    pub fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, ClientError>> + Send + 'static {
        let reply = self.call(Message::Read { offset, len });
        async move {
            match reply.await? {
                Message::ReadOk { data } => Ok(data),
                other => Err(unexpected(Op::Read, &other)),
            }
        }
    }

    /// Writes `data` at byte `offset`; with `fua` the reply means durable.
    /// `data` is sent without being copied.
    pub fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(self.call(Message::Write { offset, data, fua }), Op::Write, |m| {
            matches!(m, Message::WriteOk).then_some(())
        })
    }

    /// Makes every write sent before it durable; returns the new revision.
    pub fn flush(&self) -> impl Future<Output = Result<Revision, ClientError>> + Send + 'static {
        expect(self.call(Message::Flush), Op::Flush, |m| match m {
            Message::FlushOk { revision } => Some(revision),
            _ => None,
        })
    }

    /// Deallocates `len` bytes at `offset`.
    pub fn unmap(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(self.call(Message::Unmap { offset, len }), Op::Unmap, |m| {
            matches!(m, Message::UnmapOk).then_some(())
        })
    }

    /// Liveness probe, answered without touching the disk.
    pub fn ping(&self) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(self.call(Message::Ping), Op::Ping, |m| {
            matches!(m, Message::Pong).then_some(())
        })
    }

    /// The replica's identity, progress and snapshot chain.
    pub fn info(&self) -> impl Future<Output = Result<pb::ReplicaInfo, ClientError>> + Send + 'static {
        expect(self.call(Message::Info), Op::Info, |m| match m {
            Message::InfoOk(info) => Some(info),
            _ => None,
        })
    }

    /// Snapshots the volume, ordered after every write sent before it.
    pub fn snapshot_create(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<pb::SnapshotInfo, ClientError>> + Send + 'static {
        expect(
            self.call(Message::SnapshotCreate { name: name.into() }),
            Op::SnapshotCreate,
            |m| match m {
                Message::SnapshotCreateOk(info) => Some(info),
                _ => None,
            },
        )
    }

    /// The snapshot chain, oldest first.
    pub fn snapshot_list(
        &self,
    ) -> impl Future<Output = Result<Vec<pb::SnapshotInfo>, ClientError>> + Send + 'static {
        expect(self.call(Message::SnapshotList), Op::SnapshotList, |m| match m {
            Message::SnapshotListOk(list) => Some(list),
            _ => None,
        })
    }

    /// Deletes a snapshot (merging it into its child).
    pub fn snapshot_delete(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(
            self.call(Message::SnapshotDelete { name: name.into() }),
            Op::SnapshotDelete,
            |m| matches!(m, Message::SnapshotDeleteOk).then_some(()),
        )
    }

    /// Reverts the volume to a snapshot (newer snapshots are dropped).
    pub fn snapshot_revert(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        expect(
            self.call(Message::SnapshotRevert { name: name.into() }),
            Op::SnapshotRevert,
            |m| matches!(m, Message::SnapshotRevertOk).then_some(()),
        )
    }

    /// Raises the replica's epoch to `epoch`, durably; once it succeeds this
    /// client stamps `epoch` on its requests. Await it before sending I/O at
    /// the new epoch: a read is not ordered behind it and would be refused.
    pub fn set_epoch(&self, epoch: Epoch) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let reply = self.call_at(epoch, Message::SetEpoch);
        let inner = self.inner.clone();
        async move {
            match reply.await? {
                Message::SetEpochOk => {
                    inner.epoch.fetch_max(epoch.0, Ordering::AcqRel);
                    Ok(())
                }
                other => Err(unexpected(Op::SetEpoch, &other)),
            }
        }
    }
}

/// Awaits `reply` and maps the expected success message to its value.
async fn expect<T>(
    reply: Reply,
    op: Op,
    map: impl FnOnce(Message) -> Option<T> + Send + 'static,
) -> Result<T, ClientError> {
    let message = reply.await?;
    let got = variant_name(&message);
    map(message).ok_or(ClientError::UnexpectedReply { op, got })
}

fn unexpected(op: Op, got: &Message) -> ClientError {
    ClientError::UnexpectedReply {
        op,
        got: variant_name(got),
    }
}

fn variant_name(message: &Message) -> &'static str {
    let (op, is_reply) = message.op();
    if is_reply {
        "reply"
    } else {
        op.name()
    }
}

/// The future reply to one request. See the module doc for cancellation.
pub struct Reply {
    op: Op,
    state: ReplyState,
    guard: Option<Forget>,
}

enum ReplyState {
    Waiting(oneshot::Receiver<Result<Message, ClientError>>),
    Ready(Option<ClientError>),
}

/// Removes a dropped request's waiter.
struct Forget {
    inner: Arc<Inner>,
    id: RequestId,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.inner.pending().waiters.remove(&self.id);
    }
}

impl Future for Reply {
    type Output = Result<Message, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let op = self.op;
        let result = match &mut self.state {
            ReplyState::Ready(error) => Err(error.take().unwrap_or(ClientError::Disconnected {
                reason: "reply polled after completion".into(),
            })),
            ReplyState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(result)) => result,
                Poll::Ready(Err(_)) => Err(ClientError::Disconnected {
                    reason: "the connection's reader stopped".into(),
                }),
            },
        };
        self.guard = None;
        Poll::Ready(result.and_then(|message| match message {
            Message::Failed { error, message, .. } => Err(ClientError::Replica { op, error, message }),
            message => Ok(message),
        }))
    }
}

/// Writer task: batches queued frames into vectored writes.
async fn write_frames(
    tx: tokio::net::tcp::OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<EncodedFrame>,
    inner: Weak<Inner>,
) {
    let mut writer = FrameBatchWriter::new(tx);
    while let Some(first) = queue.recv().await {
        writer.push(first);
        while writer.pending_bytes() < WRITE_BATCH_BYTES {
            match queue.try_recv() {
                Ok(frame) => writer.push(frame),
                Err(_) => break,
            }
        }
        if let Err(e) = writer.flush().await {
            if let Some(inner) = inner.upgrade() {
                inner.close(format!("sending to the replica failed: {e}"));
            }
            return;
        }
    }
}

/// Reader task: hands each reply to its waiter.
async fn read_replies(mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>, inner: Arc<Inner>) {
    let reason = loop {
        match frames.next().await {
            None => break "the replica closed the connection".to_string(),
            Some(Err(e)) => break format!("undecodable frame from the replica: {e}"),
            Some(Ok(frame)) if !frame.message.is_reply() => {
                break format!(
                    "the replica sent a request ({}), not a reply",
                    frame.message.op().0
                );
            }
            Some(Ok(frame)) => {
                let waiter = inner.pending().waiters.remove(&frame.id);
                // No waiter: the request's Reply was dropped; discard.
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(frame.message));
                }
            }
        }
    };
    tracing::debug!(%reason, "replica connection ended");
    inner.close(reason);
}
