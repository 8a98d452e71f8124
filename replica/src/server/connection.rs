//! One controller connection: the reader task, the ordered lane, the read
//! workers and the writer task drawn in the parent module's diagram.
//!
//! Connection state is an enum: before Hello only Hello is accepted, between
//! Hello and a valid Auth only Auth, so a client cannot send anything that is
//! executed without having proved it knows the volume's secret, checked that
//! it talks to the right volume, and agreed on a protocol version.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use basalt_proto::auth::{Challenge, Nonce, Prover};
use basalt_proto::frame::{
    frame_sender, BlockCrc, BlockRun, DecodeError, Extent, Frame, FrameCodec, FrameSender, Message, Op,
    ProtocolVersion, ReplicaIdentity, ReplyError, RequestId, MAX_CRC_RUNS,
};
use basalt_proto::pb::replica as pb;
use basalt_proto::Epoch;
use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConnId, Refusal, Shared, BUDGET_UNIT, MAX_IN_FLIGHT_BYTES};
use crate::store::{Growth, Membership, SnapshotInfo, Store, StoreError, BLOCK_SIZE as BLOCK, SECTOR_SIZE};

/// Most block checksums answered per request: the answer (12 bytes each)
/// stays well under the frame payload limit.
const MAX_BLOCK_CRCS: u64 = 1 << 20;

/// Most entries of one `LayerBlocks` answer: 2^16 at 13 bytes is 832 KiB,
/// far under the frame limit, and 256 MiB of snapshot data to copy per page.
const MAX_LAYER_BLOCKS: usize = 1 << 16;

/// Most blocks of a snapshot's view one `SnapshotRuns` answer covers: 256 MiB
/// of the volume, at most 2^15 runs (512 KiB) even where every other block
/// holds data, so the answer stays far under the frame limit.
const MAX_SNAPSHOT_RUN_BLOCKS: u64 = 1 << 16;

/// Requests queued on the ordered lane. The byte budget is the real bound;
/// this only has to be large enough never to be the one that stops a
/// pipelined controller (a queue depth of 1,024 small writes).
const ORDERED_QUEUE: usize = 1024;

/// Most writes the ordered lane hands to the store as one batch (one
/// index-log append): everything a controller keeps in flight at open-iscsi's
/// default queue depth of 128 commands, so a batch never waits to fill up.
const MAX_WRITE_BATCH: usize = 128;

/// Most payload bytes one such batch carries. A batch is answered when all of
/// it is written, so a rebuild's vectored copies (64 scattered blocks each),
/// gathered 14 at a time, held every reply for ~5 ms of scattered writes
/// while the sources, whose next reads wait for those replies, sat idle;
/// 1 MiB is answered in about a millisecond. Small guest writes never come
/// near it (128 writes of 4 KiB are 512 KiB), and large ones lose nothing by
/// it: the store writes at most 1 MiB under one log append anyway.
const MAX_WRITE_BATCH_BYTES: usize = 1 << 20;

/// Replies waiting for the writer task; bounded so that a controller that
/// stops reading stalls this connection instead of growing its memory.
const REPLY_QUEUE: usize = 1024;

/// The writer stops batching and writes once this much is queued: large
/// enough to coalesce many small replies in one `writev`, small enough that
/// the first reply of a batch is not held back long.
const WRITE_BATCH_BYTES: usize = 1 << 20;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Session {
    AwaitingHello,
    /// Hello answered; nothing it asked for takes effect until Auth proves the client.
    AwaitingAuth(PendingHello),
    Ready {
        version: ProtocolVersion,
    },
}

/// A Hello that was answered and waits for the client's proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingHello {
    version: ProtocolVersion,
    /// Both nonces of this connection and the volume: what the client's proof must cover.
    challenge: Challenge,
    /// What the Hello asked for, carried out after a valid Auth: its epoch (raised to if higher than
    /// the replica's) and whether it takes the writer role.
    epoch: Epoch,
    writer: bool,
}

/// A request accepted for execution, with what it costs and when it came.
struct Job {
    id: RequestId,
    epoch: Epoch,
    conn: ConnId,
    message: Message,
    received: Instant,
    _budget: OwnedSemaphorePermit,
}

/// Serves one connection until the peer leaves, a frame fails to decode, or
/// `stop` is cancelled; in every case what was accepted is finished and
/// answered before the socket closes.
pub(super) async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    // Replies are small and latency-bound; batching is done by the writer.
    let _ = stream.set_nodelay(true);
    // A controller whose network is cut never says goodbye; without this its
    // connection (and the tasks and buffers behind it) would stay forever.
    if let Err(e) = basalt_proto::peer::detect_dead_peer(&stream) {
        tracing::warn!(%peer, error = %e, "cannot turn on dead-peer detection; a cut controller may linger");
    }
    shared.metrics.connection_opened();
    tracing::info!(%peer, "controller connected");
    let (rx, tx) = stream.into_split();
    let (direct, flusher) = frame_sender(tx);
    let flusher = tokio::spawn(async move {
        if let Err(e) = flusher.run().await {
            tracing::info!(%peer, error = %e, "cannot send replies; the controller went away");
        }
    });
    let (reply_tx, reply_rx) = mpsc::channel::<Frame>(REPLY_QUEUE);
    let writer = tokio::spawn(write_replies(direct.clone(), reply_rx, peer));

    let (lane_tx, lane_rx) = mpsc::channel::<Job>(ORDERED_QUEUE);
    let lane_pending = Arc::new(AtomicUsize::new(0));
    let lane = {
        let (shared, reply_tx, pending) = (shared.clone(), reply_tx.clone(), lane_pending.clone());
        let side = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || run_ordered_lane(lane_rx, &shared, &reply_tx, &side, &pending))
    };
    let reads = TaskTracker::new();

    let outcome = read_requests(
        FramedRead::new(rx, FrameCodec),
        &Dispatch {
            peer,
            shared: &shared,
            reply_tx: &reply_tx,
            direct: &direct,
            lane_tx: &lane_tx,
            lane_pending: &lane_pending,
            reads: &reads,
        },
        &stop,
    )
    .await;
    match &outcome {
        Ok(()) => tracing::info!(%peer, "controller disconnected"),
        // ETIMEDOUT from dead-peer detection, or a reset: the peer is gone, the stream was fine.
        Err(DecodeError::Io(e)) => tracing::warn!(%peer, error = %e, "controller connection lost"),
        Err(e) => {
            shared.metrics.protocol_error();
            tracing::warn!(%peer, error = %e, "closing connection: frame did not decode");
        }
    }

    // Drain: the lane finishes its queue once its sender is gone, reads
    // finish on their own, and the writer ends when every reply sender is.
    drop(lane_tx);
    reads.close();
    reads.wait().await;
    if let Err(e) = lane.await {
        tracing::error!(%peer, error = %e, "ordered lane of the connection panicked");
    }
    drop(reply_tx);
    if let Err(e) = writer.await {
        tracing::error!(%peer, error = %e, "reply writer of the connection panicked");
    }
    // The socket closes once the last reply is written and every sender is gone.
    drop(direct);
    if let Err(e) = flusher.await {
        tracing::error!(%peer, error = %e, "reply flusher of the connection panicked");
    }
    shared.metrics.connection_closed();
}

/// What the reader needs to hand requests on.
struct Dispatch<'a> {
    peer: SocketAddr,
    shared: &'a Arc<Shared>,
    /// Replies from tasks and threads other than the reader: they go through
    /// the writer task.
    reply_tx: &'a mpsc::Sender<Frame>,
    /// Replies from the reader task itself: written on this task, without
    /// the hop to the writer task (see [`FrameSender`]).
    direct: &'a FrameSender,
    lane_tx: &'a mpsc::Sender<Job>,
    /// Jobs handed to the lane and not yet executed there. Zero means the
    /// lane is idle, so a plain write may run on the reader task (see
    /// [`read_requests`]) without overtaking anything queued before it.
    lane_pending: &'a AtomicUsize,
    reads: &'a TaskTracker,
}

/// Decodes requests and dispatches them; returns at EOF, on shutdown, or
/// with the decode error that ends the connection.
async fn read_requests(
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    dispatch: &Dispatch<'_>,
    stop: &CancellationToken,
) -> Result<(), DecodeError> {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES / BUDGET_UNIT));
    let mut session = Session::AwaitingHello;
    let mut conn = ConnId {
        id: dispatch.shared.new_conn(),
        writer: false,
    };
    // Plain writes decoded back to back while the lane is idle: executed on
    // this task, as one store batch, as soon as no further frame is ready.
    let mut writes: Vec<Job> = Vec::new();
    loop {
        let next = if writes.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = frames.next() => next,
            }
        } else {
            match frames.next().now_or_never() {
                Some(next) => next,
                None => {
                    dispatch.execute_writes_inline(std::mem::take(&mut writes)).await;
                    continue;
                }
            }
        };
        let frame = match next {
            Some(Ok(frame)) => {
                basalt_poll::activity();
                frame
            }
            end => {
                // Accepted writes are executed and answered whatever comes next.
                dispatch.execute_writes_inline(std::mem::take(&mut writes)).await;
                return match end {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                };
            }
        };
        let received = Instant::now();
        let Frame { id, epoch, message } = frame;
        let (op, is_reply) = message.op();
        dispatch.shared.metrics.request(op);
        let refuse = |refusal: Refusal| dispatch.answer(id, op, received, Err(refusal));

        if is_reply {
            refuse(Refusal::bad_request(format!(
                "a replica does not accept replies ({op} reply received)"
            )))
            .await;
            continue;
        }
        match (session, message) {
            (
                Session::AwaitingHello,
                Message::Hello {
                    volume,
                    min_version,
                    max_version,
                    writer,
                    nonce,
                },
            ) => {
                // Checks only: nothing changes before the client has proved itself.
                let result = hello(dispatch.shared, volume, min_version, max_version, nonce).map(|pending| {
                    session = Session::AwaitingAuth(PendingHello {
                        epoch,
                        writer,
                        ..pending
                    });
                    Message::HelloOk {
                        version: pending.version,
                        volume: pending.challenge.volume,
                        nonce: pending.challenge.replica,
                        proof: pending.challenge.prove(&dispatch.shared.secret, Prover::Replica),
                    }
                });
                dispatch.answer(id, op, received, result).await;
            }
            (Session::AwaitingAuth(pending), Message::Auth { proof }) => {
                if !pending
                    .challenge
                    .verify(&dispatch.shared.secret, Prover::Client, &proof)
                {
                    // Counted in request_errors_total{op="auth",status="auth_failed"}.
                    tracing::warn!(
                        peer = %dispatch.peer,
                        "refused a client that could not prove it knows the volume's secret (wrong or missing \
                         --secret-file on its side?); closing its connection"
                    );
                    refuse(Refusal::new(
                        ReplyError::AuthFailed,
                        "the controller could not prove it knows the volume's secret: check --secret-file (or \
                         BASALT_VOLUME_SECRET) on the controller and on this replica",
                    ))
                    .await;
                    return Ok(());
                }
                conn.writer = pending.writer;
                let result = authenticated(dispatch.shared, conn, pending.epoch).await;
                if result.is_ok() {
                    session = Session::Ready {
                        version: pending.version,
                    };
                }
                dispatch.answer(id, op, received, result).await;
            }
            (Session::AwaitingHello, _) => {
                refuse(Refusal::new(
                    ReplyError::NotAuthenticated,
                    format!("{op} before Hello: send Hello, then Auth, first"),
                ))
                .await;
            }
            (Session::AwaitingAuth(_), _) => {
                refuse(Refusal::new(
                    ReplyError::NotAuthenticated,
                    format!("{op} before Auth: prove the volume's secret with Auth first"),
                ))
                .await;
            }
            (Session::Ready { .. }, Message::Hello { .. } | Message::Auth { .. }) => {
                refuse(Refusal::bad_request(format!(
                    "{op} already done on this connection; use SetEpoch to raise the epoch"
                )))
                .await;
            }
            (Session::Ready { .. }, Message::Ping) => {
                let result = dispatch.shared.check_epoch(epoch).map(|()| Message::Pong);
                dispatch.answer(id, op, received, result).await;
            }
            (Session::Ready { .. }, message) => {
                let cost = match &message {
                    Message::Read { len, .. } | Message::ReadLayer { len, .. } => *len as usize,
                    Message::ReadV { extents } => extents.iter().map(|e| e.len as usize).sum(),
                    Message::Write { data, .. } | Message::WriteV { data, .. } => data.len(),
                    _ => 0,
                };
                let units = cost.div_ceil(BUDGET_UNIT).max(1) as u32;
                // The semaphore is never closed, so acquiring only waits.
                let Ok(permit) = budget.clone().acquire_many_owned(units).await else {
                    return Ok(());
                };
                let job = Job {
                    id,
                    epoch,
                    conn,
                    message,
                    received,
                    _budget: permit,
                };
                // A snapshot layer is immutable, so reading one needs no
                // ordering with the writes either.
                if let Message::Read { offset, len } = job.message {
                    let extent = Extent { offset, len };
                    match read_cached(dispatch.shared, epoch, std::slice::from_ref(&extent)) {
                        Some(result) => {
                            let result = result.map(|data| Message::ReadOk { data });
                            dispatch.answer(id, op, received, result).await;
                        }
                        None => dispatch.spawn_read(job),
                    }
                } else if let Message::ReadV { extents } = &job.message {
                    match read_cached(dispatch.shared, epoch, extents) {
                        Some(result) => {
                            let result = result.map(|data| Message::ReadVOk { data });
                            dispatch.answer(id, op, received, result).await;
                        }
                        None => dispatch.spawn_read(job),
                    }
                } else if let Message::ReadLayer { .. } | Message::ReadSnapshot { .. } = job.message {
                    dispatch.spawn_read(job);
                } else if is_plain_write(&job)
                    && dispatch.lane_pending.load(Ordering::Acquire) == 0
                    && (whole_blocks(&job) || !dispatch.shared.store.is_hydrating())
                {
                    writes.push(job);
                    if batch_full(&writes) {
                        dispatch.execute_writes_inline(std::mem::take(&mut writes)).await;
                    }
                } else {
                    // Everything before this job reaches the store first.
                    dispatch.execute_writes_inline(std::mem::take(&mut writes)).await;
                    dispatch.lane_pending.fetch_add(1, Ordering::AcqRel);
                    if let Err(mpsc::error::SendError(job)) = dispatch.lane_tx.send(job).await {
                        dispatch.lane_pending.fetch_sub(1, Ordering::AcqRel);
                        // The lane only ends after this loop; answer anyway.
                        let refusal = Refusal::new(ReplyError::ShuttingDown, "the connection is closing");
                        dispatch.answer(job.id, op, job.received, Err(refusal)).await;
                    }
                }
            }
        }
    }
}

impl Dispatch<'_> {
    /// Executes plain writes on this task: they only copy into the page
    /// cache and append to the index log (no fdatasync), which costs less
    /// than the hand-off to the lane thread and back (two wake-ups, two
    /// context switches: most of a 4 KiB write's budget on a small machine).
    /// The same trade-off as `basalt_target::file`: a buffered write can be
    /// throttled by dirty-page writeback, bounded by the kernel's dirty
    /// limits; anything that waits for the medium stays on the lane.
    async fn execute_writes_inline(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        // Fails only when the socket is gone; the writes are done anyway.
        self.send_direct(execute_writes(self.shared, jobs)).await;
    }

    /// Sends replies from the reader task: written at once when nothing is
    /// queued ahead of them; waits while the controller is not reading
    /// (more than [`WRITE_BATCH_BYTES`] queued), as the bounded reply
    /// channel makes the other producers wait.
    async fn send_direct(&self, replies: Vec<Frame>) {
        let peer = self.peer;
        let encoded = replies.into_iter().filter_map(|frame| match frame.encode() {
            Ok(encoded) => Some(encoded),
            // Replies are built here and are within limits; if one is not,
            // the controller will time the request out.
            Err(e) => {
                tracing::error!(%peer, request = frame.id.0, error = %e, "reply not encodable");
                None
            }
        });
        // Fails only when the socket broke: nobody can be told anything, and
        // the reader will see EOF shortly.
        let _ = self.direct.send_bounded(encoded, WRITE_BATCH_BYTES).await;
    }

    /// Queues the reply to request `id`.
    async fn answer(&self, id: RequestId, op: Op, received: Instant, result: Result<Message, Refusal>) {
        self.send_direct(vec![reply_frame(self.shared, id, op, received, result)])
            .await;
    }

    fn spawn_read(&self, job: Job) {
        let shared = self.shared.clone();
        let reply_tx = self.reply_tx.clone();
        self.reads.spawn(async move {
            let Job {
                id,
                epoch,
                conn,
                message,
                received,
                _budget,
            } = job;
            let worker = shared.clone();
            let op = message.op().0;
            let result = tokio::task::spawn_blocking(move || execute(&worker, epoch, conn, message))
                .await
                .unwrap_or_else(|e| Err(Refusal::new(ReplyError::Io, format!("read task failed: {e}"))));
            let _ = reply_tx
                .send(reply_frame(&shared, id, op, received, result))
                .await;
        });
    }
}

/// Largest read answered on the reader task when its blocks are in the page
/// cache: the copy stays under ~10 us, so frames behind it are not held up.
/// For a vectored read, what counts is all its extents together.
const INLINE_READ_MAX: usize = 64 << 10;

/// A read (of one extent, or of a `ReadV`'s many) answered on the reader
/// task, if it needs no wait for the disk: a cached 4 KiB read costs a few
/// microseconds, less than the hand-off to the blocking pool and back (two
/// wake-ups, two context switches). `None`: too large, or not all cached --
/// read it on the blocking pool instead.
fn read_cached(shared: &Shared, epoch: Epoch, extents: &[Extent]) -> Option<Result<Bytes, Refusal>> {
    if extents.iter().map(|e| e.len as usize).sum::<usize>() > INLINE_READ_MAX {
        return None;
    }
    let result = shared.fenced(epoch, |store| {
        read_extents(store, extents, Wait::No).map_err(Refusal::from)
    });
    match result {
        Ok(None) => None,
        Ok(Some(data)) => {
            shared.metrics.bytes_read(data.len());
            Some(Ok(data))
        }
        Err(refusal) => Some(Err(refusal)),
    }
}

/// Whether a read may wait for the disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    /// Only from the page cache (on the reader task).
    No,
}

/// The bytes of `extents`, concatenated in order, each read like a `Read`'s
/// range (inside the volume, sector-aligned, every block checked against its
/// CRC: a mismatch fails the whole read with that block's LBA). With
/// [`Wait::No`], `Ok(None)` as soon as one extent is not all in the page
/// cache.
fn read_extents(store: &Store, extents: &[Extent], wait: Wait) -> Result<Option<Bytes>, StoreError> {
    let mut buf = BytesMut::zeroed(extents.iter().map(|e| e.len as usize).sum());
    let mut at = 0;
    for extent in extents {
        let out = &mut buf[at..at + extent.len as usize];
        match wait {
            Wait::Yes => store.read(extent.offset, out)?,
            Wait::No => {
                if !store.read_cached(extent.offset, out)? {
                    return Ok(None);
                }
            }
        }
        at += out.len();
    }
    Ok(Some(buf.freeze()))
}

/// The ordered lane: executes jobs one at a time, in arrival order.
///
/// Two requests leave the lane once it reaches them, so that the writes
/// behind them are not held up: a Flush (its fdatasyncs cover every write
/// the lane executed before it, whatever runs next) and a snapshot delete
/// (the store merges in steps, with writes going on between them). A Flush
/// appends its marker on the lane first ([`Store::flush_begin`]), so every
/// replica places it between the same writes: the write-intent record of
/// one replica then speaks of the same flushes as another's.
///
/// Plain writes (not FUA) are taken together with every plain write queued
/// right behind them and executed as one store batch, which keeps their order
/// and costs one index-log append instead of one per write.
fn run_ordered_lane(
    mut jobs: mpsc::Receiver<Job>,
    shared: &Arc<Shared>,
    reply_tx: &mpsc::Sender<Frame>,
    side: &tokio::runtime::Handle,
    pending: &AtomicUsize,
) {
    // A job taken off the queue while gathering a batch, that is not part of it.
    let mut held: Option<Job> = None;
    loop {
        let Some(job) = held.take().or_else(|| jobs.blocking_recv()) else {
            break;
        };
        if is_plain_write(&job) {
            let mut batch = vec![job];
            while !batch_full(&batch) {
                match jobs.try_recv() {
                    Ok(next) if is_plain_write(&next) => batch.push(next),
                    Ok(next) => {
                        held = Some(next);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let executed = batch.len();
            let replies = execute_writes(shared, batch);
            pending.fetch_sub(executed, Ordering::AcqRel);
            for reply in replies {
                // A closed reply queue means the socket is gone; the lane goes on
                // executing what was accepted, as it does for single requests.
                let _ = reply_tx.blocking_send(reply);
            }
            continue;
        }
        // Once the job below has taken its place in the store's sequence, the
        // reader may run writes itself again.
        let _done = DoneOnDrop(pending);
        let Job {
            id,
            epoch,
            conn,
            message,
            received,
            _budget,
        } = job;
        let op = message.op().0;
        if let Message::Flush = message {
            let begun = shared.fenced(epoch, |store| store.flush_begin().map_err(Refusal::from));
            let (shared, reply_tx) = (shared.clone(), reply_tx.clone());
            side.spawn_blocking(move || {
                let _budget = _budget;
                let result = begun.and_then(|ticket| {
                    shared
                        .store
                        .flush_finish(ticket)
                        .map(|revision| Message::FlushOk { revision })
                        .map_err(Refusal::from)
                });
                let _ = reply_tx.blocking_send(reply_frame(&shared, id, op, received, result));
            });
            continue;
        }
        if matches!(message, Message::SnapshotDelete { .. }) {
            let (shared, reply_tx) = (shared.clone(), reply_tx.clone());
            side.spawn_blocking(move || {
                let _budget = _budget;
                let result = execute(&shared, epoch, conn, message);
                let _ = reply_tx.blocking_send(reply_frame(&shared, id, op, received, result));
            });
            continue;
        }
        let result = execute(shared, epoch, conn, message);
        if reply_tx
            .blocking_send(reply_frame(shared, id, op, received, result))
            .is_err()
        {
            // The socket is gone; keep executing what was accepted so that
            // the store sees the same sequence it would have otherwise.
            continue;
        }
    }
}

/// A write that only reaches the page cache and the index log (no flush):
/// batched with its neighbours (see [`execute_writes`]).
fn is_plain_write(job: &Job) -> bool {
    matches!(
        job.message,
        Message::Write { fua: false, .. } | Message::WriteV { .. }
    )
}

/// Whether a write covers whole blocks only. A hydrating clone's sub-block
/// write may have to fetch its block from the source first (see
/// `store::clone`), which waits for the network: it goes to the lane, never
/// on the reader task.
fn whole_blocks(job: &Job) -> bool {
    let aligned =
        |offset: u64, len: usize| offset.is_multiple_of(BLOCK) && (len as u64).is_multiple_of(BLOCK);
    match &job.message {
        Message::Write { offset, data, .. } => aligned(*offset, data.len()),
        Message::WriteV { extents, .. } => extents.iter().all(|e| aligned(e.offset, e.len as usize)),
        _ => false,
    }
}

/// Whether a batch of `jobs` plain writes is as large as one may be.
fn batch_full(jobs: &[Job]) -> bool {
    let bytes = jobs.iter().map(|job| match &job.message {
        Message::Write { data, .. } | Message::WriteV { data, .. } => data.len(),
        _ => 0,
    });
    jobs.len() >= MAX_WRITE_BATCH || bytes.sum::<usize>() >= MAX_WRITE_BATCH_BYTES
}

/// Counts a lane job as executed when dropped (on every path out of the
/// lane's loop body, `continue` included).
struct DoneOnDrop<'a>(&'a AtomicUsize);

impl Drop for DoneOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Executes plain writes as one store batch and returns the reply to each, in
/// order. Each is fenced by its own epoch, all under one hold of the fence,
/// as [`execute`] would do one at a time. A `WriteV` is as many writes of the
/// batch as it has extents (slices of its data, not copies), checked against
/// the volume before any of them is written, and answered once.
fn execute_writes(shared: &Shared, jobs: Vec<Job>) -> Vec<Frame> {
    let results: Vec<Result<Message, Refusal>> = {
        let _fence = shared.fence_shared();
        let size_bytes = shared.store.size_bytes();
        let mut writes: Vec<(u64, &[u8])> = Vec::with_capacity(jobs.len());
        // Each job's writes, as positions in `writes`.
        let fenced: Vec<Result<Range<usize>, Refusal>> = jobs
            .iter()
            .map(|job| {
                shared.check_epoch(job.epoch)?;
                shared.check_writer(job.conn)?;
                let first = writes.len();
                match &job.message {
                    Message::Write { offset, data, .. } => writes.push((*offset, &data[..])),
                    Message::WriteV { extents, data } => {
                        extents_in_volume(extents, size_bytes)?;
                        let mut at = 0;
                        for extent in extents {
                            let end = at + extent.len as usize;
                            writes.push((extent.offset, &data[at..end]));
                            at = end;
                        }
                    }
                    other => return Err(Refusal::bad_request(format!("{} is not a write", other.op().0))),
                }
                Ok(first..writes.len())
            })
            .collect();
        let mut outcomes = shared.store.write_batch(&writes).into_iter();
        fenced
            .into_iter()
            .zip(&jobs)
            .map(|(fenced, job)| {
                let pieces = fenced?;
                let mut result = Ok(());
                for _ in pieces.clone() {
                    let outcome = match outcomes.next() {
                        Some(outcome) => outcome.map_err(Refusal::from),
                        None => Err(Refusal::new(
                            ReplyError::Io,
                            "the store answered fewer writes than it was given",
                        )),
                    };
                    // The first failure is the answer; the rest are consumed.
                    if result.is_ok() {
                        result = outcome;
                    }
                }
                result?;
                shared.wrote(writes[pieces].iter().map(|(_, data)| data.len()).sum());
                Ok(match job.message {
                    Message::WriteV { .. } => Message::WriteVOk,
                    _ => Message::WriteOk,
                })
            })
            .collect()
    };
    jobs.iter()
        .zip(results)
        .map(|(job, result)| reply_frame(shared, job.id, job.message.op().0, job.received, result))
        .collect()
}

/// Refuses a vectored write unless every extent is sector-aligned and inside
/// a volume of `size_bytes`: checked before any extent is written, so that a
/// refused request changes nothing (the wire format already guarantees a
/// valid list: in order, non-empty, bounded).
fn extents_in_volume(extents: &[Extent], size_bytes: u64) -> Result<(), Refusal> {
    for (i, extent) in extents.iter().enumerate() {
        let (offset, len) = (extent.offset, u64::from(extent.len));
        if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Refusal::new(
                ReplyError::Unaligned {
                    alignment: SECTOR_SIZE,
                },
                format!("extent {i} ({len} bytes at {offset}) is not aligned to {SECTOR_SIZE} bytes"),
            ));
        }
        if extent.end().is_none_or(|end| end > size_bytes) {
            return Err(Refusal::new(
                ReplyError::OutOfRange { size_bytes },
                format!("extent {i} ({len} bytes at {offset}) ends past the volume's {size_bytes} bytes"),
            ));
        }
    }
    Ok(())
}

/// Executes one request (not Hello, not Ping) on a blocking thread.
fn execute(shared: &Shared, epoch: Epoch, conn: ConnId, message: Message) -> Result<Message, Refusal> {
    let metrics = &shared.metrics;
    match message {
        Message::SetEpoch => shared.raise_epoch(epoch).map(|()| {
            shared.take_writer(conn, epoch);
            Message::SetEpochOk
        }),
        Message::Read { offset, len } => shared.fenced(epoch, |store| {
            let mut buf = BytesMut::zeroed(len as usize);
            store.read(offset, &mut buf)?;
            metrics.bytes_read(buf.len());
            Ok(Message::ReadOk { data: buf.freeze() })
        }),
        Message::ReadV { extents } => shared.fenced(epoch, |store| {
            // Waiting for the disk, every extent is read: never `None`.
            let data = read_extents(store, &extents, Wait::Yes)?.unwrap_or_default();
            metrics.bytes_read(data.len());
            Ok(Message::ReadVOk { data })
        }),
        Message::Write { offset, data, fua } => shared.fenced_write(epoch, conn, |store| {
            store.write(offset, &data)?;
            shared.wrote(data.len());
            if fua {
                store.flush()?;
            }
            Ok(Message::WriteOk)
        }),
        Message::Unmap { offset, len } => shared.fenced_write(epoch, conn, |store| {
            store.unmap(offset, len)?;
            Ok(Message::UnmapOk)
        }),
        Message::Flush => shared.fenced(epoch, |store| {
            Ok(Message::FlushOk {
                revision: store.flush()?,
            })
        }),
        Message::Info => shared.fenced(epoch, |store| Ok(Message::InfoOk(info(store)))),
        Message::BlockCrcs { start_lba, count } => shared.fenced(epoch, |store| {
            let end = start_lba.saturating_add(count.min(MAX_BLOCK_CRCS));
            // A hydrating clone lists its whole view: what it has not copied yet is fetched first.
            store.fetch_absent(start_lba..end.min(store.size_bytes() / BLOCK))?;
            let list = store.block_crcs(start_lba..end);
            Ok(Message::BlockCrcsOk(
                list.into_iter().map(|(lba, crc)| BlockCrc { lba, crc }).collect(),
            ))
        }),
        Message::RunCrcs { runs } => shared.fenced(epoch, |store| {
            let ranges = run_ranges(&runs, store.size_bytes() / BLOCK)?;
            for range in &ranges {
                store.fetch_absent(range.clone())?;
            }
            let (list, end_lba) = store.block_crcs_in(&ranges, MAX_BLOCK_CRCS as usize);
            Ok(Message::RunCrcsOk {
                crcs: list.into_iter().map(|(lba, crc)| BlockCrc { lba, crc }).collect(),
                end_lba,
            })
        }),
        Message::Reset => shared.fenced_write(epoch, conn, |store| {
            store.reset()?;
            tracing::warn!("replica reset: every snapshot and the head dropped, for a rebuild");
            Ok(Message::ResetOk)
        }),
        Message::LayerBlocks {
            snapshot,
            start_lba,
            count,
        } => shared.fenced(epoch, |store| {
            let listing = store.layer_blocks(
                &snapshot,
                start_lba..start_lba.saturating_add(count),
                MAX_LAYER_BLOCKS,
            )?;
            Ok(Message::LayerBlocksOk {
                blocks: listing.blocks,
                end_lba: listing.end_lba,
            })
        }),
        Message::ReadLayer {
            snapshot,
            offset,
            len,
        } => shared.fenced(epoch, |store| {
            let mut buf = BytesMut::zeroed(len as usize);
            store.read_layer(&snapshot, offset, &mut buf)?;
            metrics.bytes_read(buf.len());
            Ok(Message::ReadLayerOk { data: buf.freeze() })
        }),
        Message::WrittenSince { since, start_lba } => shared.fenced(epoch, |store| {
            let (answer, end_lba) = store.written_since(since, start_lba);
            Ok(Message::WrittenSinceOk {
                position: store.sync_point(),
                answer,
                end_lba,
            })
        }),
        Message::AdoptSyncPoint { point, own_revision } => shared.fenced(epoch, |store| {
            let position = store.adopt_sync_point(point, own_revision)?;
            match point {
                Some(p) => tracing::info!(
                    lineage = format_args!("{:#x}", p.lineage), own = own_revision.0, revision = position.revision.0,
                    "flushes renumbered onto the rebuild source's: the write-intent record answers from here on"
                ),
                None => tracing::info!("off any shared flush numbering until rebuilt"),
            }
            Ok(Message::AdoptSyncPointOk { position })
        }),
        Message::SnapshotCreate { name } => shared.fenced_write(epoch, conn, |store| {
            let snapshot = store.snapshot_create(&name)?;
            tracing::info!(snapshot = %name, "snapshot created");
            Ok(Message::SnapshotCreateOk(snapshot_pb(&snapshot)))
        }),
        Message::SnapshotList => shared.fenced(epoch, |store| {
            Ok(Message::SnapshotListOk(
                store.snapshot_list().iter().map(snapshot_pb).collect(),
            ))
        }),
        Message::SnapshotDelete { name } => shared.fenced_write(epoch, conn, |store| {
            store.snapshot_delete(&name)?;
            tracing::info!(snapshot = %name, "snapshot deleted");
            Ok(Message::SnapshotDeleteOk)
        }),
        Message::SetMembership(m) => shared.fenced_write(epoch, conn, |store| {
            let generation = m.generation;
            store.set_membership(Membership {
                generation: m.generation,
                members: m.members,
                epoch: Epoch(m.epoch),
            })?;
            tracing::info!(generation, "volume membership recorded");
            Ok(Message::SetMembershipOk)
        }),
        Message::Resize {
            size_bytes,
            check_only: true,
        } => shared.fenced(epoch, |store| {
            store.check_grow(size_bytes)?;
            Ok(Message::ResizeOk {
                size_bytes: store.size_bytes(),
            })
        }),
        Message::Resize {
            size_bytes,
            check_only: false,
        } => shared.fenced_write(epoch, conn, |store| {
            if let Growth::From(before) = store.grow(size_bytes)? {
                tracing::info!(from = before, to = size_bytes, "volume grown");
            }
            Ok(Message::ResizeOk {
                size_bytes: store.size_bytes(),
            })
        }),
        Message::SnapshotRevert { name } => shared.fenced_write(epoch, conn, |store| {
            store.snapshot_revert(&name)?;
            tracing::info!(snapshot = %name, "volume reverted to snapshot");
            Ok(Message::SnapshotRevertOk)
        }),
        // A clone's requests: not fenced by the epoch (see `basalt_proto::frame`).
        Message::SnapshotRuns {
            snapshot,
            start_lba,
            count,
        } => {
            let store = &shared.store;
            let end = start_lba.saturating_add(count);
            let (runs, end_lba) = store.snapshot_runs(&snapshot, start_lba..end, MAX_SNAPSHOT_RUN_BLOCKS)?;
            Ok(Message::SnapshotRunsOk {
                runs: runs
                    .into_iter()
                    .map(|r| BlockRun {
                        lba: r.start,
                        blocks: r.end - r.start,
                    })
                    .collect(),
                end_lba,
            })
        }
        Message::ReadSnapshot {
            snapshot,
            offset,
            len,
        } => {
            let mut buf = BytesMut::zeroed(len as usize);
            shared.store.read_snapshot(&snapshot, offset, &mut buf)?;
            metrics.bytes_read(buf.len());
            Ok(Message::ReadSnapshotOk { data: buf.freeze() })
        }
        Message::SnapshotHold { snapshot, holder } => {
            check_holder(&holder)?;
            shared.store.snapshot_hold(&snapshot, &holder)?;
            tracing::info!(%snapshot, %holder, "snapshot held by a clone");
            Ok(Message::SnapshotHoldOk)
        }
        Message::SnapshotRelease { snapshot, holder } => {
            if shared.store.snapshot_release(&snapshot, &holder)? {
                tracing::info!(%snapshot, %holder, "hold on the snapshot released");
            }
            Ok(Message::SnapshotReleaseOk)
        }
        Message::HoldList => Ok(Message::HoldListOk(
            shared
                .store
                .holds()
                .into_iter()
                .map(|h| pb::SnapshotHold {
                    snapshot: h.snapshot,
                    holder: h.holder,
                    since_unix: unix_seconds(h.since),
                })
                .collect(),
        )),
        other => {
            let op = other.op().0;
            Err(Refusal::bad_request(format!("{op} is not executed on this path")))
        }
    }
}

/// The block ranges of a checksum listing's runs, refused with the reason
/// unless there are at most [`MAX_CRC_RUNS`], each non-empty, in block
/// order without overlap, and inside a volume of `volume_blocks` blocks.
fn run_ranges(runs: &[BlockRun], volume_blocks: u64) -> Result<Vec<Range<u64>>, Refusal> {
    if runs.len() > MAX_CRC_RUNS {
        return Err(Refusal::bad_request(format!(
            "{} runs in one checksum listing; at most {MAX_CRC_RUNS} per request",
            runs.len()
        )));
    }
    let mut ranges: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for (i, run) in runs.iter().enumerate() {
        let end = run
            .lba
            .checked_add(run.blocks)
            .filter(|&end| end <= volume_blocks);
        let Some(end) = end else {
            return Err(Refusal::new(
                ReplyError::OutOfRange {
                    size_bytes: volume_blocks * BLOCK,
                },
                format!(
                    "run {i} (blocks {}+{}) ends past the volume's {volume_blocks} blocks",
                    run.lba, run.blocks
                ),
            ));
        };
        if run.blocks == 0 {
            return Err(Refusal::bad_request(format!(
                "run {i} (at block {}) is empty",
                run.lba
            )));
        }
        if let Some(previous) = ranges.last().filter(|p| p.end > run.lba) {
            return Err(Refusal::bad_request(format!(
                "run {i} starts at block {}, before the previous run ends ({}): runs must be in block \
                 order without overlap",
                run.lba, previous.end
            )));
        }
        ranges.push(run.lba..end);
    }
    Ok(ranges)
}

/// The first half of the handshake: check the volume, agree on a version,
/// and pick this side's nonce. Changes nothing: the client has not proved
/// anything yet.
fn hello(
    shared: &Shared,
    volume: basalt_proto::VolumeId,
    min_version: ProtocolVersion,
    max_version: ProtocolVersion,
    client_nonce: Nonce,
) -> Result<PendingHello, Refusal> {
    let store = &shared.store;
    if !volume.0.is_nil() && volume != store.volume_id() {
        return Err(Refusal::new(
            ReplyError::VolumeMismatch,
            format!(
                "this replica serves volume {}, not {volume}; check the controller's replica list",
                store.volume_id()
            ),
        ));
    }
    let version = ProtocolVersion::negotiate(min_version, max_version).ok_or_else(|| {
        Refusal::new(
            ReplyError::VersionMismatch {
                newest: ProtocolVersion::CURRENT.0,
            },
            format!(
                "controller speaks {min_version}..={max_version}, this replica {}..={}; upgrade one side",
                ProtocolVersion::MIN_SUPPORTED,
                ProtocolVersion::CURRENT
            ),
        )
    })?;
    Ok(PendingHello {
        version,
        challenge: Challenge {
            volume: store.volume_id(),
            client: client_nonce,
            replica: Nonce::random(),
        },
        // Filled in by the caller from the Hello frame.
        epoch: Epoch::default(),
        writer: false,
    })
}

/// A holder's name is for an operator to read in an error message and to type
/// into `basalt snapshot release`: printable, and short.
fn check_holder(holder: &str) -> Result<(), Refusal> {
    if holder.is_empty() || holder.len() > 256 || holder.chars().any(char::is_control) {
        return Err(Refusal::bad_request(format!(
            "invalid holder name {holder:?}: 1-256 printable characters"
        )));
    }
    Ok(())
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The client proved itself: carry out what its Hello asked for (raise the
/// epoch if the Hello's is newer, take the writer role) and introduce the
/// replica as it now is.
async fn authenticated(shared: &Arc<Shared>, conn: ConnId, epoch: Epoch) -> Result<Message, Refusal> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        // A lower epoch is a survey, not an operation: report, change nothing.
        if epoch > shared.store.epoch() {
            shared.raise_epoch(epoch)?;
        }
        shared.take_writer(conn, epoch);
        let store = &shared.store;
        Ok(Message::AuthOk {
            replica: ReplicaIdentity {
                volume: store.volume_id(),
                size_bytes: store.size_bytes(),
                epoch: store.epoch(),
                revision: store.revision(),
            },
            membership: store.membership().map(membership_pb),
        })
    })
    .await
    .unwrap_or_else(|e| Err(Refusal::new(ReplyError::Io, format!("Auth task failed: {e}"))))
}

fn membership_pb(m: Membership) -> pb::Membership {
    pb::Membership {
        generation: m.generation,
        members: m.members,
        epoch: m.epoch.0,
    }
}

fn info(store: &Store) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        volume_uuid: store.volume_id().0.as_bytes().to_vec(),
        size_bytes: store.size_bytes(),
        epoch: store.epoch().0,
        revision: store.revision().0,
        snapshots: store.snapshot_list().iter().map(snapshot_pb).collect(),
        head_allocated_bytes: store.head_allocated_bytes(),
        clone: store.clone_status().map(|c| pb::CloneStatus {
            source_volume_uuid: c.origin.source_volume.0.as_bytes().to_vec(),
            snapshot: c.origin.snapshot,
            hydrated_bytes: c.hydrated_bytes,
            total_bytes: c.origin.source_size_bytes,
            hydrated: c.hydrated,
        }),
    }
}

fn snapshot_pb(s: &SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        name: s.name.clone(),
        created_unix: unix_seconds(s.created),
        parent: s.parent.clone().unwrap_or_default(),
        allocated_bytes: s.allocated_bytes,
    }
}

/// The reply frame for a request, recorded in the metrics.
fn reply_frame(
    shared: &Shared,
    id: RequestId,
    op: Op,
    received: Instant,
    result: Result<Message, Refusal>,
) -> Frame {
    let message = match result {
        Ok(message) => {
            shared.metrics.completed(op, received.elapsed(), None);
            message
        }
        Err(Refusal { error, message }) => {
            shared.metrics.completed(op, received.elapsed(), Some(&error));
            tracing::debug!(request = id.0, %op, status = error.name(), %message, "request failed");
            Message::Failed { op, error, message }
        }
    };
    Frame::new(id, shared.store.epoch(), message)
}

/// The writer task: batches the replies of the lane, the read tasks and the
/// blocking pool into vectored writes, in the order they were queued.
async fn write_replies(sender: FrameSender, mut replies: mpsc::Receiver<Frame>, peer: SocketAddr) {
    let mut batch = Vec::new();
    while let Some(first) = replies.recv().await {
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match frame.encode() {
                Ok(encoded) => {
                    bytes += encoded.remaining();
                    batch.push(encoded);
                }
                // Replies are built here and are within limits; if one is
                // not, the controller will time the request out.
                Err(e) => tracing::error!(%peer, request = frame.id.0, error = %e, "reply not encodable"),
            }
            if bytes < WRITE_BATCH_BYTES {
                next = replies.try_recv().ok();
            }
        }
        if sender
            .send_bounded(batch.drain(..), WRITE_BATCH_BYTES)
            .await
            .is_err()
        {
            // The flusher logs why. Keep draining so that producers never
            // block on a dead socket.
            while replies.recv().await.is_some() {}
            return;
        }
    }
}
