//! One TCP connection: login, then full feature phase.
//!
//! ```text
//!             ┌──────────── reader task (this fn) ─────────────┐
//!  socket ──► │ FrameDecoder ─► Request ─► CmdSnWindow ─► dispatch│
//!             │   Data-Out ─► PendingWrite (R2T bookkeeping)    │
//!             └─────┬───────────────────────────┬───────────────┘
//!                   │ spawn per command         │ R2T, NOP-In, TMF/Text/Reject
//!                   ▼                           ▼
//!            LogicalUnit::execute ──► mpsc<Outbound> ──► writer task ──► socket
//!                                     (stamps StatSN / ExpCmdSN / MaxCmdSN,
//!                                      batches PDUs into one writev)
//! ```
//!
//! Commands run concurrently, so a QD32 initiator gets 32 commands executing
//! at once: the reader polls each command once in place (one that completes
//! at once, like a page-cache hit, is answered without a task) and moves the
//! rest into a task of their own. The reader never waits for a command; the
//! writer never waits for the reader. Data payloads are never copied on the
//! way in (immediate data is a slice of the receive buffer) nor on the way out
//! (Data-In PDUs are slices of the command's result, written with writev);
//! the one copy is the reassembly of a write that arrives in several Data-Out
//! PDUs, because the command set takes one contiguous buffer.
//!
//! Error handling (ErrorRecoveryLevel 0): a PDU that is wrong but framed
//! correctly gets a Reject and the connection goes on; a stream we cannot
//! trust any more (bad header digest, oversized segment, junk, a silent
//! initiator) is closed with a log line. Closing aborts the connection's
//! commands and never affects other sessions.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::iscsi::login::{
    LoginEnv, LoginFailure, LoginMachine, LoginOutcome, LoginReply, LoginStep, SessionType, TargetPolicy,
};
use crate::iscsi::pdu::{
    self, Bhs, CmdSn, DataOutPdu, DataSn, FrameDecoder, Itt, LoginResponseFields, LoginStatus, LogoutPdu,
    LogoutReason, LogoutResponse, Lun, NopOutPdu, PduError, R2tSn, RejectReason, Request, ScsiCommandPdu,
    StatSn, StatSnUse, TargetPdu, TaskMgmtPdu, TextPdu, TmfFunction, TmfResponse, Ttt, BHS_LEN,
};
use crate::iscsi::portal::{Portal, SessionHandle, Target};
use crate::iscsi::session::{
    completion_pdus, Admission, CmdSnWindow, DataInLimits, InFlight, SeqState, TaskTable, QUEUE_DEPTH,
};
use crate::iscsi::text::{self, SessionParams};
use crate::lu::{DataDirection, ItNexus, ResetKind, ScsiCommand, TaskAttribute};

/// Login PDUs are limited to the default MaxRecvDataSegmentLength.
const LOGIN_MAX_SEGMENT: u32 = 8192;
/// Receive buffer growth step: big enough for a 256 KiB immediate-data
/// write plus its header in one read, so large writes are not reassembled
/// across many small reads.
const READ_CHUNK: usize = 512 * 1024;
/// The reader tops its buffer up to READ_CHUNK whenever less than this is
/// free, so one `read` takes in whatever the initiator has queued (a QD32
/// burst of 4 KiB writes is ~130 KiB) instead of a few PDUs at a time.
const MIN_READ_SPACE: usize = 64 * 1024;
/// The writer sends at most this many bytes per writev batch, so one
/// connection's large reads do not delay its small responses for long.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Linux IOV_MAX.
const MAX_IOVECS: usize = 1024;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU stream: {0}")]
    Pdu(#[from] PduError),
    #[error("{0}")]
    Login(#[from] LoginFailure),
    #[error("initiator sent opcode {opcode:#04x} before login completed; only Login Requests are allowed")]
    NotLogin { opcode: u8 },
    #[error("login did not complete within {0:?}")]
    LoginTimeout(std::time::Duration),
    #[error("no answer to a NOP-In ping within {0:?}; the initiator is gone")]
    NopTimeout(std::time::Duration),
    #[error("the initiator closed the connection")]
    PeerClosed,
    #[error("no free TSIH: 65535 sessions are logged in")]
    NoTsih,
}

/// Messages to the writer task.
#[derive(Debug)]
pub(crate) enum Outbound {
    Pdu(TargetPdu),
    Pdus(Vec<TargetPdu>),
    /// Flush what is queued, then shut the socket's write side down.
    Close,
}

/// Serve one connection until logout, error, or `cancel`.
pub(crate) async fn run(portal: Arc<Portal>, stream: TcpStream, peer: SocketAddr, cancel: CancellationToken) {
    // Responses are small and latency-bound; batching is done by the writer.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY; latency will suffer");
    }
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot read the local address; dropping the connection");
            return;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let timeout = portal.config.login_timeout;
    let logged_in = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(timeout, login(&portal, &mut rd, &mut wr, &mut buf)) => match r {
            Ok(r) => r,
            Err(_) => Err(ConnectionError::LoginTimeout(timeout)),
        },
    };
    let logged_in = match logged_in {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "login failed; closing the connection");
            return;
        }
    };
    let initiator = logged_in.outcome.initiator_name.clone();
    tracing::info!(%peer, %initiator, session_type = ?logged_in.outcome.session_type,
        target = ?logged_in.outcome.target.as_ref().map(|t| t.name.clone()), tsih = logged_in.tsih, "logged in");
    let tsih = logged_in.tsih;
    let end = full_feature(&portal, logged_in, rd, wr, buf, local, peer, cancel).await;
    portal.release_tsih(tsih);
    match end {
        Ok(reason) => tracing::info!(%peer, %initiator, tsih, "{reason}"),
        Err(e) => tracing::warn!(%peer, %initiator, tsih, error = %e, "connection closed"),
    }
}

/// Read one frame, reading more from the socket as needed.
async fn read_frame(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    decoder: &FrameDecoder,
) -> Result<pdu::Frame, ConnectionError> {
    loop {
        if let Some(frame) = decoder.decode(buf)? {
            return Ok(frame);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(ConnectionError::PeerClosed);
        }
    }
}

/// Write one PDU directly (login phase, before the writer task exists; the redirector).
pub(crate) async fn write_pdu<W: AsyncWrite + Unpin>(wr: &mut W, pdu: &TargetPdu) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(BHS_LEN + pdu.data.len() + 8);
    pdu.encode_header(false, &mut out);
    out.extend_from_slice(&pdu.data);
    pdu.encode_trailer(false, &mut out);
    wr.write_all(&out).await
}

struct PortalEnv<'a>(&'a Portal);

impl LoginEnv for PortalEnv<'_> {
    fn target(&self, name: &str) -> Option<Arc<TargetPolicy>> {
        self.0.target(name).map(|t| t.policy())
    }
    fn session_exists(&self, tsih: u16) -> bool {
        self.0.tsih_live(tsih)
    }
    fn tpgt(&self) -> u16 {
        self.0.config.tpgt
    }
    fn random(&mut self, buf: &mut [u8]) {
        rand::fill(buf);
    }
}

struct LoggedIn {
    outcome: LoginOutcome,
    tsih: u16,
    /// StatSN of the first full-feature-phase status.
    statsn: StatSn,
    /// ExpCmdSN at the start of full feature phase.
    exp_cmdsn: CmdSn,
}

/// The login phase: read Login Requests, answer them, until full feature
/// phase or failure.
///
/// Cancel safety: not cancel safe (a half-written response); the connection
/// is dropped when it is cancelled.
async fn login(
    portal: &Portal,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
) -> Result<LoggedIn, ConnectionError> {
    let decoder = FrameDecoder {
        header_digest: false,
        data_digest: false,
        max_data_segment: LOGIN_MAX_SEGMENT,
    };
    let mut machine = LoginMachine::new(portal.config.offer);
    let mut env = PortalEnv(portal);
    let mut statsn = StatSn(rand::random::<u32>() >> 1);
    loop {
        let frame = read_frame(rd, buf, &decoder).await?;
        let bhs = frame.bhs;
        let pdu = match Request::parse(frame) {
            Ok(Request::Login(pdu)) => pdu,
            other => {
                // RFC 7143 §6.2: anything else during login is an initiator error.
                let failure =
                    login_response_pdu(bhs.0[8..14].try_into().expect("6 bytes"), 0, bhs.itt(), &failed());
                let mut failure = failure;
                failure.stamp(statsn, CmdSn(0), CmdSn(0));
                let _ = write_pdu(wr, &failure).await;
                return Err(match other {
                    Err(e) => ConnectionError::Pdu(e),
                    Ok(_) => ConnectionError::NotLogin {
                        opcode: bhs.opcode_value(),
                    },
                });
            }
        };
        let exp_cmdsn = pdu.cmdsn;
        let max_cmdsn = exp_cmdsn.plus(QUEUE_DEPTH - 1);
        let step = machine.step(&pdu, &mut env);
        let (reply, status, outcome) = match step {
            LoginStep::Continue(reply) => (reply, LoginStatus::Success, None),
            LoginStep::Complete(reply, outcome) => (reply, LoginStatus::Success, Some(outcome)),
            LoginStep::Fail(failure) => {
                let reply = LoginReply {
                    transit: false,
                    current_stage: pdu.current_stage,
                    next_stage: pdu.current_stage,
                    keys: Vec::new(),
                };
                let mut response = login_response_pdu(pdu.isid, pdu.tsih, pdu.itt, &(reply, failure.status));
                response.stamp(statsn, exp_cmdsn, max_cmdsn);
                let _ = write_pdu(wr, &response).await;
                return Err(failure.into());
            }
        };
        let tsih = match &outcome {
            Some(_) => portal.allocate_tsih().ok_or(ConnectionError::NoTsih)?,
            None => 0,
        };
        let mut response = login_response_pdu(pdu.isid, tsih, pdu.itt, &(reply, status));
        response.stamp(statsn, exp_cmdsn, max_cmdsn);
        statsn = statsn.next();
        if let Err(e) = write_pdu(wr, &response).await {
            if tsih != 0 {
                portal.release_tsih(tsih);
            }
            return Err(e.into());
        }
        if let Some(outcome) = outcome {
            return Ok(LoggedIn {
                outcome,
                tsih,
                statsn,
                exp_cmdsn,
            });
        }
    }
}

fn failed() -> (LoginReply, LoginStatus) {
    use pdu::LoginStage::SecurityNegotiation as S;
    (
        LoginReply {
            transit: false,
            current_stage: S,
            next_stage: S,
            keys: Vec::new(),
        },
        LoginStatus::InitiatorError,
    )
}

fn login_response_pdu(
    isid: [u8; 6],
    tsih: u16,
    itt: Itt,
    (reply, status): &(LoginReply, LoginStatus),
) -> TargetPdu {
    pdu::login_response(LoginResponseFields {
        transit: reply.transit,
        current_stage: reply.current_stage,
        next_stage: reply.next_stage,
        isid,
        tsih,
        itt,
        status: *status,
        data: text::encode(&reply.keys),
    })
}

/// The writer task: stamps sequence numbers and sends PDUs in batches.
///
/// Cancel safety: cancelled via `cancel`; whatever is queued is dropped.
async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    seq: Arc<SeqState>,
    mut statsn: StatSn,
    params: SessionParams,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut scratch = BytesMut::with_capacity(64 * 1024);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(256);
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
        };
        let mut batch_bytes = 0usize;
        let mut close = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            let mut push = |mut pdu: TargetPdu| {
                let stamp_sn = statsn;
                if pdu.statsn == StatSnUse::Advance {
                    statsn = statsn.next();
                }
                let (exp, max) = seq.window();
                pdu.stamp(stamp_sn, exp, max);
                scratch.reserve(BHS_LEN + 16);
                pdu.encode_header(params.header_digest, &mut scratch);
                if pdu.data.is_empty() {
                    chunks.push(scratch.split().freeze());
                } else {
                    chunks.push(scratch.split().freeze());
                    batch_bytes += pdu.data.len();
                    pdu.encode_trailer(params.data_digest, &mut scratch);
                    chunks.push(pdu.data);
                    if !scratch.is_empty() {
                        chunks.push(scratch.split().freeze());
                    }
                }
                batch_bytes += BHS_LEN;
            };
            match message {
                Outbound::Pdu(pdu) => push(pdu),
                Outbound::Pdus(pdus) => pdus.into_iter().for_each(push),
                Outbound::Close => close = true,
            }
            if !close && batch_bytes < MAX_BATCH_BYTES && chunks.len() < MAX_IOVECS {
                next = rx.try_recv().ok();
            }
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = write_chunks(&mut wr, &mut chunks) => r?,
        }
        if close {
            return wr.shutdown().await;
        }
    }
}

/// Write every chunk with as few writev calls as possible.
async fn write_chunks(wr: &mut OwnedWriteHalf, chunks: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<IoSlice<'_>> = chunks[first..]
            .iter()
            .take(MAX_IOVECS)
            .map(|c| IoSlice::new(c))
            .collect();
        let mut written = wr.write_vectored(&slices).await?;
        drop(slices);
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let len = chunks[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                chunks[first].advance(written);
                written = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// The fixed part of a SCSI command, kept while its Data-Out arrives.
#[derive(Debug)]
struct CommandHeader {
    itt: Itt,
    lun: Lun,
    cmdsn: CmdSn,
    cdb: Bytes,
    direction: DataDirection,
    attribute: TaskAttribute,
    expected_len: u32,
}

/// One data sequence we expect: unsolicited data (TTT 0xffffffff) or the
/// answer to one R2T.
#[derive(Debug)]
struct Sequence {
    ttt: Ttt,
    end: u32,
    next_offset: u32,
    next_datasn: DataSn,
}

/// A write command waiting for its Data-Out.
#[derive(Debug)]
struct PendingWrite {
    header: CommandHeader,
    /// Reassembly buffer; grows only as data arrives, so a huge Expected
    /// Data Transfer Length costs nothing until data is actually sent.
    data: BytesMut,
    received: u32,
    unsolicited: Option<Sequence>,
    r2ts: Vec<Sequence>,
    /// Where the next R2T starts (`None` while unsolicited data flows).
    next_r2t_offset: Option<u32>,
    r2tsn: R2tSn,
    _in_flight: InFlight,
}

impl PendingWrite {
    fn put(&mut self, offset: u32, data: &[u8]) {
        let offset = offset as usize;
        if self.data.len() < offset {
            self.data.resize(offset, 0);
        }
        let overlap = (self.data.len() - offset).min(data.len());
        self.data[offset..offset + overlap].copy_from_slice(&data[..overlap]);
        self.data.extend_from_slice(&data[overlap..]);
        self.received += data.len() as u32;
    }

    /// Check one Data-Out against the sequence it belongs to and store it.
    fn accept(&mut self, d: &DataOutPdu) -> Result<(), String> {
        let len = d.data.len() as u32;
        let seq = if d.ttt == Ttt::RESERVED {
            self.unsolicited
                .as_mut()
                .ok_or("unsolicited Data-Out (TTT 0xffffffff) but no unsolicited burst")?
        } else {
            self.r2ts
                .iter_mut()
                .find(|s| s.ttt == d.ttt)
                .ok_or_else(|| format!("Data-Out TTT {:#x} names no outstanding R2T", d.ttt.0))?
        };
        if d.buffer_offset != seq.next_offset {
            return Err(format!(
                "Data-Out at offset {} where {} was expected",
                d.buffer_offset, seq.next_offset
            ));
        }
        if d.datasn != seq.next_datasn {
            return Err(format!(
                "Data-Out DataSN {} where {} was expected",
                d.datasn.0, seq.next_datasn.0
            ));
        }
        if u64::from(d.buffer_offset) + u64::from(len) > u64::from(seq.end) {
            return Err(format!(
                "Data-Out of {len} bytes at {} overruns the burst ending at {}",
                d.buffer_offset, seq.end
            ));
        }
        seq.next_offset += len;
        seq.next_datasn = seq.next_datasn.next();
        let done = seq.next_offset == seq.end;
        let ttt = seq.ttt;
        if d.final_bit && !done && ttt != Ttt::RESERVED {
            return Err(format!(
                "Data-Out F bit at {} before the R2T's end at {}",
                seq.next_offset, seq.end
            ));
        }
        self.put(d.buffer_offset, &d.data);
        if ttt == Ttt::RESERVED {
            if d.final_bit || done {
                let end = self.unsolicited.take().map_or(0, |s| s.next_offset);
                self.next_r2t_offset = Some(end);
            }
        } else if done {
            self.r2ts.retain(|s| s.ttt != ttt);
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.unsolicited.is_none() && self.r2ts.is_empty() && self.received >= self.header.expected_len
    }
}

/// What the reader does after a PDU.
enum Flow {
    Continue,
    Logout(LogoutPdu),
    /// Close after flushing what is queued (TARGET COLD RESET).
    Close(&'static str),
}

/// A text response too long for one PDU, sent in pieces.
struct TextContinuation {
    itt: Itt,
    ttt: Ttt,
    rest: Bytes,
}

/// The reader side of a logged-in connection.
struct Session<'a> {
    portal: &'a Portal,
    session_type: SessionType,
    target: Option<Arc<Target>>,
    nexus: Arc<ItNexus>,
    initiator_name: String,
    cid: u16,
    params: SessionParams,
    tx: mpsc::UnboundedSender<Outbound>,
    seq: Arc<SeqState>,
    tasks: Arc<TaskTable>,
    window: CmdSnWindow<Request>,
    pending: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    text_out: Option<TextContinuation>,
    text_in: Option<(Itt, BytesMut)>,
    local: SocketAddr,
    peer: SocketAddr,
    /// Another session reset the target cold (or shutdown/reinstatement).
    cancel: CancellationToken,
}

#[allow(clippy::too_many_arguments)]
async fn full_feature(
    portal: &Portal,
    logged_in: LoggedIn,
    mut rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    mut buf: BytesMut,
    local: SocketAddr,
    peer: SocketAddr,
    cancel: CancellationToken,
) -> Result<&'static str, ConnectionError> {
    let LoggedIn {
        outcome,
        tsih,
        statsn,
        exp_cmdsn,
    } = logged_in;
    let params = outcome.params;
    let seq = Arc::new(SeqState::new(exp_cmdsn));
    let tasks = Arc::new(TaskTable::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_cancel = cancel.child_token();
    let writer_task = tokio::spawn(writer(wr, rx, seq.clone(), statsn, params, writer_cancel.clone()));
    let nexus = Arc::new(ItNexus {
        initiator_name: outcome.initiator_name.clone(),
        isid: outcome.isid,
        tpgt: portal.config.tpgt,
    });
    let target = outcome
        .target
        .as_ref()
        .and_then(|t| portal.target(&t.name).cloned());
    if let Some(target) = &target {
        target.register(
            tsih,
            Arc::new(SessionHandle {
                nexus: nexus.clone(),
                tasks: tasks.clone(),
                cancel: cancel.clone(),
            }),
        );
        target.lun0.nexus_added(&nexus);
    }
    let mut session = Session {
        portal,
        session_type: outcome.session_type,
        target: target.clone(),
        nexus: nexus.clone(),
        initiator_name: outcome.initiator_name,
        cid: outcome.cid,
        params,
        tx,
        seq: seq.clone(),
        tasks: tasks.clone(),
        window: CmdSnWindow::new(exp_cmdsn),
        pending: HashMap::new(),
        next_ttt: 1,
        text_out: None,
        text_in: None,
        local,
        peer,
        cancel: cancel.clone(),
    };
    let result = session.read_loop(&mut rd, &mut buf).await;
    let graceful = matches!(result, Ok(Some(_)));
    // Whatever ended the connection, its commands end with it.
    session.pending.clear();
    if !graceful {
        tasks.abort_all(None);
    }
    if let Some(target) = &target {
        target.unregister(tsih);
        target.lun0.nexus_removed(&nexus);
    }
    drop(session);
    if graceful {
        // Let the writer flush the logout response (it got Close).
        let _ = writer_task.await;
    } else {
        writer_cancel.cancel();
        let _ = writer_task.await;
    }
    match result {
        Ok(Some(reason)) => Ok(reason),
        Ok(None) => Ok("connection closed by the target (shutdown, reset or session reinstatement)"),
        Err(e) => Err(e),
    }
}

impl Session<'_> {
    fn send(&self, pdu: TargetPdu) {
        // Fails only when the writer is gone, i.e. the connection is ending.
        let _ = self.tx.send(Outbound::Pdu(pdu));
    }

    fn reject(&self, reason: RejectReason, bhs: &Bhs, why: &str) {
        tracing::warn!(peer = %self.peer, initiator = %self.initiator_name, ?reason, "rejecting a PDU: {why}");
        self.send(pdu::reject(reason, bhs));
    }

    fn alloc_ttt(&mut self) -> Ttt {
        let ttt = Ttt(self.next_ttt);
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == Ttt::RESERVED.0 {
            self.next_ttt = 1;
        }
        ttt
    }

    /// Read and dispatch until the connection ends. `Ok(Some(reason))` is a
    /// clean end (logout) whose last PDUs are queued before a `Close`.
    async fn read_loop(
        &mut self,
        rd: &mut OwnedReadHalf,
        buf: &mut BytesMut,
    ) -> Result<Option<&'static str>, ConnectionError> {
        let decoder = FrameDecoder {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_data_segment: self.params.target_max_recv_data_segment_length,
        };
        let interval = self.portal.config.nop_in_interval;
        let timeout = self.portal.config.nop_in_timeout;
        let mut last_heard = Instant::now();
        let mut ping_deadline: Option<Instant> = None;
        loop {
            loop {
                let frame = match decoder.decode(buf) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(PduError::DataDigest { got, computed }) => {
                        // The header is sound, so the stream stays in step:
                        // drop this PDU, reject it, fail its command.
                        let bhs = Bhs(buf[..BHS_LEN].try_into().expect("48 bytes"));
                        buf.advance(decoder.frame_len(&bhs));
                        self.reject(
                            RejectReason::DataDigestError,
                            &bhs,
                            &format!("data digest {got:#010x} != {computed:#010x}"),
                        );
                        self.fail_pending(bhs.itt());
                        continue;
                    }
                    Err(e) => {
                        let bhs = Bhs(buf[..BHS_LEN].try_into().expect("48 bytes"));
                        if let PduError::DataSegmentTooLong { .. } = e {
                            self.send(pdu::reject(RejectReason::ProtocolError, &bhs));
                        }
                        return Err(e.into());
                    }
                };
                last_heard = Instant::now();
                ping_deadline = None;
                match self.on_frame(frame) {
                    Flow::Continue => {}
                    Flow::Logout(logout) => return Ok(self.logout(logout).await),
                    Flow::Close(reason) => {
                        let _ = self.tx.send(Outbound::Close);
                        return Ok(Some(reason));
                    }
                }
            }
            let wake = ping_deadline.unwrap_or(last_heard + interval);
            if buf.capacity() - buf.len() < MIN_READ_SPACE {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(None),
                n = rd.read_buf(buf) => {
                    if n? == 0 {
                        return Err(ConnectionError::PeerClosed);
                    }
                    basalt_poll::activity();
                }
                _ = tokio::time::sleep_until(wake) => {
                    if ping_deadline.is_some() {
                        return Err(ConnectionError::NopTimeout(timeout));
                    }
                    let ttt = self.alloc_ttt();
                    self.send(pdu::nop_in(Itt::RESERVED, ttt, Lun::default(), Bytes::new()));
                    ping_deadline = Some(Instant::now() + timeout);
                }
            }
        }
    }

    fn on_frame(&mut self, frame: pdu::Frame) -> Flow {
        let bhs = frame.bhs;
        let request = match Request::parse(frame) {
            Ok(r) => r,
            Err(e) => {
                let reason = match e {
                    PduError::UnknownOpcode(_) => RejectReason::CommandNotSupported,
                    PduError::InvalidField { .. } | PduError::UnexpectedData { .. } => {
                        RejectReason::InvalidPduField
                    }
                    _ => RejectReason::ProtocolError,
                };
                self.reject(reason, &bhs, &e.to_string());
                return Flow::Continue;
            }
        };
        let discovery = self.session_type == SessionType::Discovery;
        match request {
            Request::DataOut(_) | Request::ScsiCommand(_) | Request::TaskMgmt(_) if discovery => {
                self.reject(
                    RejectReason::ProtocolError,
                    &bhs,
                    "SCSI traffic on a discovery session",
                );
                Flow::Continue
            }
            Request::DataOut(d) => {
                self.on_data_out(d);
                Flow::Continue
            }
            Request::Snack(bhs) => {
                self.reject(
                    RejectReason::ProtocolError,
                    &bhs,
                    "SNACK needs ErrorRecoveryLevel > 0; we negotiate 0",
                );
                Flow::Continue
            }
            Request::Login(_) => {
                self.reject(
                    RejectReason::ProtocolError,
                    &bhs,
                    "Login Request in full feature phase",
                );
                Flow::Continue
            }
            request => {
                let (cmdsn, immediate) = request.cmdsn().expect("every other request carries a CmdSN");
                let max = self.seq.advertised_max();
                match self.window.admit(cmdsn, immediate, max, request) {
                    Admission::Run(ready) => {
                        self.seq.set_exp_cmdsn(self.window.exp_cmdsn());
                        for request in ready {
                            match self.dispatch(request) {
                                Flow::Continue => {}
                                other => return other,
                            }
                        }
                    }
                    Admission::Queued => {}
                    Admission::Dropped => {
                        tracing::warn!(peer = %self.peer, initiator = %self.initiator_name, cmdsn = cmdsn.0,
                            exp_cmdsn = self.window.exp_cmdsn().0, max_cmdsn = max.0,
                            "dropping a command outside the CmdSN window (RFC 7143 §4.2.2.1)");
                    }
                }
                Flow::Continue
            }
        }
    }

    fn dispatch(&mut self, request: Request) -> Flow {
        match request {
            Request::ScsiCommand(cmd) => self.on_command(cmd),
            Request::TaskMgmt(tmf) => return self.on_tmf(tmf),
            Request::Text(t) => self.on_text(t),
            Request::NopOut(n) => self.on_nop_out(n),
            Request::Logout(l) => {
                let refused = match l.reason {
                    // ErrorRecoveryLevel 0: no connection recovery.
                    LogoutReason::RemoveConnectionForRecovery => Some(LogoutResponse::RecoveryNotSupported),
                    LogoutReason::CloseConnection if l.cid != self.cid => Some(LogoutResponse::CidNotFound),
                    LogoutReason::CloseSession | LogoutReason::CloseConnection => None,
                };
                match refused {
                    Some(response) => self.send(pdu::logout_response(l.itt, response)),
                    None => return Flow::Logout(l),
                }
            }
            Request::DataOut(_) | Request::Login(_) | Request::Snack(_) => {}
        }
        Flow::Continue
    }

    fn limits(&self) -> DataInLimits {
        DataInLimits {
            max_segment: self.params.initiator_max_recv_data_segment_length,
            max_burst: self.params.max_burst_length,
        }
    }

    fn on_command(&mut self, cmd: ScsiCommandPdu) {
        let itt = cmd.itt;
        if self.pending.contains_key(&itt.0) || self.tasks.contains(itt) {
            return self.reject(
                RejectReason::ProtocolError,
                &cmd.bhs,
                "ITT already names a running task",
            );
        }
        if cmd.immediate && self.seq.in_flight() >= QUEUE_DEPTH {
            return self.reject(
                RejectReason::ImmediateCommandReject,
                &cmd.bhs,
                "too many commands in flight",
            );
        }
        let immediate_len = cmd.data.len() as u32;
        let edtl = cmd.expected_transfer_len;
        if immediate_len > 0 {
            let why = if !cmd.write {
                Some("immediate data on a command without the W bit")
            } else if !self.params.immediate_data {
                Some("immediate data but ImmediateData=No was negotiated")
            } else if immediate_len > edtl || immediate_len > self.params.first_burst_length {
                Some("immediate data longer than the Expected Data Transfer Length or FirstBurstLength")
            } else {
                None
            };
            if let Some(why) = why {
                return self.reject(RejectReason::ProtocolError, &cmd.bhs, why);
            }
        }
        let unsolicited_end = self.params.first_burst_length.min(edtl);
        if !cmd.final_bit && (!cmd.write || self.params.initial_r2t || immediate_len >= unsolicited_end) {
            return self.reject(
                RejectReason::ProtocolError,
                &cmd.bhs,
                "F bit clear (unsolicited data follows) but no unsolicited data is allowed",
            );
        }
        let direction = match (cmd.read, cmd.write) {
            (false, false) => DataDirection::None,
            (true, false) => DataDirection::Read,
            (false, true) => DataDirection::Write,
            (true, true) => DataDirection::Bidirectional,
        };
        let header = CommandHeader {
            itt,
            lun: cmd.lun,
            cmdsn: cmd.cmdsn,
            cdb: cmd.cdb,
            direction,
            attribute: cmd.attribute,
            expected_len: edtl,
        };
        let in_flight = self.seq.start();
        if !cmd.write || immediate_len >= edtl {
            return self.execute(header, cmd.data, in_flight);
        }
        let mut pending = PendingWrite {
            header,
            data: BytesMut::new(),
            received: 0,
            unsolicited: None,
            r2ts: Vec::new(),
            next_r2t_offset: Some(immediate_len),
            r2tsn: R2tSn(0),
            _in_flight: in_flight,
        };
        if immediate_len > 0 {
            pending
                .data
                .reserve(edtl.min(self.params.max_burst_length) as usize);
            pending.put(0, &cmd.data);
        }
        if !cmd.final_bit {
            pending.unsolicited = Some(Sequence {
                ttt: Ttt::RESERVED,
                end: unsolicited_end,
                next_offset: immediate_len,
                next_datasn: DataSn(0),
            });
            pending.next_r2t_offset = None;
        }
        self.issue_r2ts(&mut pending);
        self.pending.insert(itt.0, pending);
    }

    /// Send R2Ts up to MaxOutstandingR2T, each for at most MaxBurstLength.
    fn issue_r2ts(&mut self, pending: &mut PendingWrite) {
        let Some(mut offset) = pending.next_r2t_offset else {
            return;
        };
        let edtl = pending.header.expected_len;
        let mut r2ts = Vec::new();
        while pending.r2ts.len() < usize::from(self.params.max_outstanding_r2t) && offset < edtl {
            let len = self.params.max_burst_length.min(edtl - offset);
            let ttt = self.alloc_ttt();
            r2ts.push(pdu::r2t(
                pending.header.itt,
                pending.header.lun,
                ttt,
                pending.r2tsn,
                offset,
                len,
            ));
            pending.r2ts.push(Sequence {
                ttt,
                end: offset + len,
                next_offset: offset,
                next_datasn: DataSn(0),
            });
            pending.r2tsn = pending.r2tsn.next();
            offset += len;
        }
        pending.next_r2t_offset = Some(offset);
        if !r2ts.is_empty() {
            let _ = self.tx.send(Outbound::Pdus(r2ts));
        }
    }

    fn on_data_out(&mut self, d: DataOutPdu) {
        let Some(mut pending) = self.pending.remove(&d.itt.0) else {
            // Typically data still in flight for a task just aborted.
            tracing::debug!(peer = %self.peer, itt = d.itt.0, "Data-Out for no pending write; discarded");
            return;
        };
        if let Err(why) = pending.accept(&d) {
            self.reject(RejectReason::ProtocolError, &d.bhs, &why);
            self.send(pdu::scsi_target_failure(d.itt));
            return;
        }
        self.issue_r2ts(&mut pending);
        if pending.complete() {
            let PendingWrite {
                header,
                data,
                _in_flight,
                ..
            } = pending;
            self.execute(header, data.freeze(), _in_flight);
        } else {
            self.pending.insert(d.itt.0, pending);
        }
    }

    /// A Data-Out of this ITT was lost (bad digest): the write cannot finish.
    fn fail_pending(&mut self, itt: Itt) {
        if self.pending.remove(&itt.0).is_some() {
            self.send(pdu::scsi_target_failure(itt));
        }
    }

    /// Run the command: poll it once right here and answer at once if it is
    /// done (a page-cache read or write usually is, see `file.rs`), else
    /// spawn it; its task answers unless it is aborted first.
    ///
    /// Why poll in place: a task per command costs an allocation, a trip
    /// through the scheduler and two task-table locks, which for a 4 KiB
    /// command served from the page cache is more than the I/O itself. A
    /// command that completes in its first poll was never abortable anyway
    /// (ABORT TASK is read by this same loop, after it), so answering it
    /// from here changes nothing an initiator can observe. The first poll
    /// uses a no-op waker: a command that is not ready is moved into a task,
    /// whose first poll registers the task's waker (every future must honour
    /// the waker of its latest poll), so no wake-up is lost.
    fn execute(&mut self, header: CommandHeader, data_out: Bytes, in_flight: InFlight) {
        let Some(target) = &self.target else { return };
        let command = ScsiCommand {
            nexus: self.nexus.clone(),
            lun: header.lun.number(),
            cdb: header.cdb,
            direction: header.direction,
            attribute: header.attribute,
            expected_transfer_len: header.expected_len,
            data_out,
        };
        let limits = self.limits();
        let itt = header.itt;
        let (direction, expected_len) = (header.direction, header.expected_len);
        let mut running = target.lun0.clone().execute_owned(command);
        if let Poll::Ready(result) = running.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            let pdus = completion_pdus(itt, direction, expected_len, &result, limits);
            let _ = self.tx.send(Outbound::Pdus(pdus));
            drop(in_flight);
            return;
        }
        let tx = self.tx.clone();
        let tasks = self.tasks.clone();
        self.tasks
            .insert_with(itt, header.lun.number(), header.cmdsn, || {
                tokio::spawn(async move {
                    let result = running.await;
                    if tasks.complete(itt) {
                        let pdus = completion_pdus(itt, direction, expected_len, &result, limits);
                        let _ = tx.send(Outbound::Pdus(pdus));
                    }
                    // Freed after the response is queued, so a logout waiting for
                    // idleness is answered after every command's status.
                    drop(in_flight);
                })
                .abort_handle()
            });
    }

    fn on_tmf(&mut self, tmf: TaskMgmtPdu) -> Flow {
        let lun = tmf.lun.number();
        let lun_ok = lun == 0;
        let sessions = || self.target.as_ref().map(|t| t.sessions()).unwrap_or_default();
        let reset = |kind: ResetKind| {
            if let Some(target) = &self.target {
                target.lun0.reset(kind, &self.nexus);
            }
        };
        let mut flow = Flow::Continue;
        let response = match tmf.function {
            TmfFunction::AbortTask => {
                let referenced = tmf.referenced_itt;
                if self.pending.remove(&referenced.0).is_some() || self.tasks.abort(referenced) {
                    TmfResponse::FunctionComplete
                } else if self.window.exp_cmdsn().precedes_or_eq(tmf.ref_cmdsn)
                    && tmf.ref_cmdsn.precedes(tmf.cmdsn)
                {
                    // The command has not arrived: count it as received so it
                    // never runs (RFC 7143 §11.5.1).
                    self.window.skip(tmf.ref_cmdsn);
                    self.seq.set_exp_cmdsn(self.window.exp_cmdsn());
                    TmfResponse::FunctionComplete
                } else {
                    TmfResponse::TaskDoesNotExist
                }
            }
            TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet if !lun_ok => TmfResponse::LunDoesNotExist,
            TmfFunction::AbortTaskSet => {
                self.pending.clear();
                self.tasks.abort_all(Some(lun));
                TmfResponse::FunctionComplete
            }
            TmfFunction::ClearTaskSet => {
                // The task set of the LU spans every nexus.
                self.pending.clear();
                sessions().iter().for_each(|s| {
                    s.tasks.abort_all(Some(lun));
                });
                self.tasks.abort_all(Some(lun));
                TmfResponse::FunctionComplete
            }
            TmfFunction::LogicalUnitReset if !lun_ok => TmfResponse::LunDoesNotExist,
            TmfFunction::LogicalUnitReset => {
                self.pending.clear();
                sessions().iter().for_each(|s| {
                    s.tasks.abort_all(Some(lun));
                });
                reset(ResetKind::LogicalUnitReset);
                TmfResponse::FunctionComplete
            }
            TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
                self.pending.clear();
                let cold = tmf.function == TmfFunction::TargetColdReset;
                for s in sessions() {
                    s.tasks.abort_all(None);
                    // A cold reset also drops every other connection
                    // (RFC 7143 §11.5.1); ours closes after the response.
                    if cold && !Arc::ptr_eq(&s.tasks, &self.tasks) {
                        s.cancel.cancel();
                    }
                }
                reset(if cold {
                    ResetKind::TargetColdReset
                } else {
                    ResetKind::TargetWarmReset
                });
                if cold {
                    flow = Flow::Close("target cold reset");
                }
                TmfResponse::FunctionComplete
            }
            TmfFunction::TaskReassign => TmfResponse::ReassignmentNotSupported,
            TmfFunction::ClearAca | TmfFunction::Other(_) => TmfResponse::FunctionNotSupported,
        };
        tracing::info!(peer = %self.peer, initiator = %self.initiator_name, function = ?tmf.function,
            ?response, "task management");
        self.send(pdu::tmf_response(tmf.itt, response));
        flow
    }

    fn on_nop_out(&mut self, nop: NopOutPdu) {
        if nop.itt == Itt::RESERVED {
            // An answer to our ping, or a ping that wants no answer.
            return;
        }
        let max = self.params.initiator_max_recv_data_segment_length as usize;
        let echo = nop.data.slice(..nop.data.len().min(max));
        self.send(pdu::nop_in(nop.itt, Ttt::RESERVED, nop.lun, echo));
    }

    fn on_text(&mut self, t: TextPdu) {
        if t.ttt != Ttt::RESERVED {
            match self.text_out.take() {
                Some(c) if c.ttt == t.ttt && c.itt == t.itt => self.send_text(t.itt, c.rest),
                _ => self.reject(
                    RejectReason::ProtocolError,
                    &t.bhs,
                    "Text Request TTT names no continuation",
                ),
            }
            return;
        }
        self.text_out = None;
        let mut data = match self.text_in.take() {
            Some((itt, partial)) if itt == t.itt => partial,
            _ => BytesMut::new(),
        };
        data.extend_from_slice(&t.data);
        if data.len() > text::MAX_VALUE_LEN * 4 {
            return self.reject(
                RejectReason::ProtocolError,
                &t.bhs,
                "text request longer than 32 KiB",
            );
        }
        if t.continue_bit {
            self.text_in = Some((t.itt, data));
            let ttt = self.alloc_ttt();
            // An empty answer asks for the rest (RFC 7143 §11.10.2).
            let mut pdu = pdu::text_response(t.itt, ttt, false, Bytes::new());
            pdu.bhs.0[1] = 0;
            return self.send(pdu);
        }
        let pairs = match text::parse(&data) {
            Ok(p) => p,
            Err(e) => return self.reject(RejectReason::ProtocolError, &t.bhs, &e.to_string()),
        };
        let mut answer = Vec::new();
        for (key, value) in pairs {
            if key == "SendTargets" {
                answer.extend(self.send_targets(&value));
            } else if let Some(a) = text::full_feature_key(&mut self.params, &key, &value) {
                answer.push(a);
            }
        }
        self.send_text(t.itt, text::encode(&answer));
    }

    /// Send a text response, in pieces no longer than the initiator accepts.
    fn send_text(&mut self, itt: Itt, data: Bytes) {
        let max = self.params.initiator_max_recv_data_segment_length as usize;
        if data.len() <= max {
            return self.send(pdu::text_response(itt, Ttt::RESERVED, false, data));
        }
        let ttt = self.alloc_ttt();
        self.text_out = Some(TextContinuation {
            itt,
            ttt,
            rest: data.slice(max..),
        });
        self.send(pdu::text_response(itt, ttt, true, data.slice(..max)));
    }

    /// SendTargets (RFC 7143 §13.3): the targets this initiator may see, at
    /// the portal address it connected to.
    fn send_targets(&self, value: &str) -> Vec<(String, String)> {
        let visible = |t: &&Arc<Target>| t.policy().allow.allows(&self.initiator_name);
        let targets: Vec<&Arc<Target>> = match (value, self.session_type) {
            ("All", SessionType::Discovery) => {
                let mut all: Vec<_> = self.portal.targets.values().filter(visible).collect();
                all.sort_by(|a, b| a.name().cmp(b.name()));
                all
            }
            ("All" | "", SessionType::Normal) => self.target.iter().collect(),
            ("", SessionType::Discovery) => Vec::new(),
            (name, _) => self.portal.target(name).into_iter().filter(visible).collect(),
        };
        let address = format!("{},{}", self.local, self.portal.config.tpgt);
        targets
            .into_iter()
            .flat_map(|t| {
                [
                    ("TargetName".to_string(), t.name().to_string()),
                    ("TargetAddress".to_string(), address.clone()),
                ]
            })
            .collect()
    }

    /// Logout: let in-flight commands finish (up to the drain timeout), then
    /// answer and close.
    async fn logout(&mut self, logout: LogoutPdu) -> Option<&'static str> {
        self.pending.clear();
        let drain = self.portal.config.drain_timeout;
        if tokio::time::timeout(drain, self.seq.wait_idle()).await.is_err() {
            let aborted = self.tasks.abort_all(None);
            tracing::warn!(peer = %self.peer, aborted, "commands still running {drain:?} after logout; aborted");
        }
        self.send(pdu::logout_response(logout.itt, LogoutResponse::Success));
        let _ = self.tx.send(Outbound::Close);
        Some("logged out")
    }
}
