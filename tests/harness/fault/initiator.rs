//! A minimal iSCSI initiator for the fault harness: one session, one TCP connection, many commands in flight.
//!
//! Real initiators (libiscsi, qemu) hide what we need to know under fault injection: *which* write was
//! acknowledged and *which* flush completed before the controller died. This one exposes exactly that: every
//! command resolves to a [`CommandOutcome`] (GOOD, a SCSI status with sense, or "the connection died, the
//! outcome is unknown").
//!
//! ```text
//!   caller ─► Session::write/read/flush ─► writer (Mutex<OwnedWriteHalf>, assigns CmdSN in send order)
//!                    ▲                                │ SCSI Command PDU (write data as immediate data)
//!                    │ oneshot per ITT                ▼
//!   reader task ◄── SCSI Response / Data-In / NOP-In / Reject ◄── target
//! ```
//!
//! Login negotiates ImmediateData=Yes and InitialR2T=No with a FirstBurstLength large enough that every
//! write the harness issues travels whole inside its command PDU, so there is no R2T state to keep: an R2T
//! from the target is reported as a protocol error. No digests, ErrorRecoveryLevel 0, one connection: any
//! trouble drops the connection and every command still in flight becomes [`CommandOutcome::Disconnected`].
//! The reader answers the target's NOP-In pings so that an idle session (waiting for a rebuild) stays up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_target::iscsi::pdu::{self, Bhs, FrameDecoder, Itt, Lun, Opcode};
use basalt_target::iscsi::text;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The initiator's name in every login.
pub const INITIATOR_IQN: &str = "iqn.2026-11.io.basalt:fault-harness";

/// Bytes per logical block: the Basalt volume exposes 512-byte logical blocks (4 KiB physical).
pub const LOGICAL_BLOCK: u32 = 512;

/// Largest data segment we accept from the target, and the FirstBurstLength we propose: 256 KiB is what
/// Basalt declares as its own MaxRecvDataSegmentLength, so any write up to 256 KiB goes as immediate data.
pub const MAX_SEGMENT: u32 = 256 * 1024;

/// How long login may take. Generous: two shared cores, and a controller that just started may still be
/// surveying its replicas.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a session could not be set up or broke down.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    #[error("could not connect to the iSCSI portal {portal}: {source}; is the controller running?")]
    Connect {
        portal: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("login to {portal} failed: {reason}")]
    Login { portal: SocketAddr, reason: String },
    #[error("the target at {portal} broke the protocol: {reason}")]
    Protocol { portal: SocketAddr, reason: String },
    #[error(
        "{what} stayed in flight for more than {waited:?}: the volume stopped answering (a liveness bug)"
    )]
    Stuck { what: String, waited: Duration },
    #[error("the command to {portal} failed: {outcome}")]
    Command {
        portal: SocketAddr,
        outcome: CommandOutcome,
    },
}

/// How one SCSI command ended, as far as the initiator can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Status GOOD; for a read, the data.
    Good(Bytes),
    /// CHECK CONDITION with the sense key and additional sense code/qualifier.
    CheckCondition { key: u8, asc: u8, ascq: u8 },
    /// Any other SCSI status (BUSY, TASK SET FULL, ...) or an iSCSI response code other than "completed".
    Failed { status: u8, response: u8 },
    /// The target rejected the PDU (Reject reason code).
    Rejected { reason: u8 },
    /// The connection closed before the status arrived: the command may or may not have taken effect.
    Disconnected,
}

impl CommandOutcome {
    pub fn is_good(&self) -> bool {
        matches!(self, CommandOutcome::Good(_))
    }
}

impl std::fmt::Display for CommandOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandOutcome::Good(_) => f.write_str("GOOD"),
            CommandOutcome::CheckCondition { key, asc, ascq } => {
                write!(
                    f,
                    "CHECK CONDITION (sense key {key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x})"
                )
            }
            CommandOutcome::Failed { status, response } => {
                write!(f, "SCSI status {status:#04x}, iSCSI response {response:#04x}")
            }
            CommandOutcome::Rejected { reason } => write!(f, "rejected by the target (reason {reason:#04x})"),
            CommandOutcome::Disconnected => f.write_str("connection lost before the status arrived"),
        }
    }
}

/// Sense key UNIT ATTENTION: a new nexus is told once about the power-on reset (retried at login), every
/// nexus about a grown capacity (the workload retries).
pub const UNIT_ATTENTION: u8 = 0x6;

/// A command waiting for its status: the Data-In received so far and who to tell.
struct Pending {
    data: BytesMut,
    done: oneshot::Sender<CommandOutcome>,
}

/// State shared by callers and the reader task.
struct Shared {
    portal: SocketAddr,
    /// The write half, locked while a PDU is assembled and sent, so CmdSN order is send order.
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u32, Pending>>,
    exp_statsn: AtomicU32,
    /// Set once the connection is gone; later commands fail at once with `Disconnected`.
    dead: AtomicBool,
    /// Why the reader stopped, for the harness's report.
    death: Mutex<Option<String>>,
}

struct Writer {
    half: OwnedWriteHalf,
    cmdsn: u32,
    next_itt: u32,
}

/// One logged-in iSCSI session to LUN 0 of a target. Cheap to share (`Arc<Session>`); commands from many
/// tasks run concurrently. Dropping the last handle closes the connection.
pub struct Session {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    /// Connects to `portal`, logs in to `target_iqn` and clears the power-on UNIT ATTENTION.
    ///
    /// Cancellation safety: dropping the future drops the half-open connection; nothing is left behind.
    pub async fn login(portal: SocketAddr, target_iqn: &str) -> Result<Session, InitiatorError> {
        match tokio::time::timeout(LOGIN_TIMEOUT, Self::login_inner(portal, target_iqn)).await {
            Ok(result) => result,
            Err(_) => Err(InitiatorError::Login {
                portal,
                reason: format!("no login response within {LOGIN_TIMEOUT:?}"),
            }),
        }
    }

    async fn login_inner(portal: SocketAddr, target_iqn: &str) -> Result<Session, InitiatorError> {
        let mut stream = TcpStream::connect(portal)
            .await
            .map_err(|source| InitiatorError::Connect { portal, source })?;
        let _ = stream.set_nodelay(true);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let login_err = |reason: String| InitiatorError::Login { portal, reason };
        let security = [
            ("InitiatorName", INITIATOR_IQN),
            ("TargetName", target_iqn),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ];
        let max_segment = MAX_SEGMENT.to_string();
        let operational = [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", max_segment.as_str()),
            ("FirstBurstLength", max_segment.as_str()),
            ("MaxBurstLength", "1048576"),
            ("MaxConnections", "1"),
            ("ErrorRecoveryLevel", "0"),
        ];
        let mut exp_statsn = 0u32;
        let mut negotiated = Vec::new();
        for (csg, nsg, keys) in [(0u8, 1u8, &security[..]), (1, 3, &operational[..])] {
            let mut bhs = Bhs::new(Opcode::LoginRequest);
            bhs.set_immediate(true);
            bhs.0[1] = 0x80 | (csg << 2) | nsg;
            // ISID: type "random" (0x80) with a fixed qualifier; one session per harness connection.
            bhs.0[8..14].copy_from_slice(&[0x80, 0x00, 0x00, 0x00, 0xfa, 0x17]);
            bhs.set_itt(Itt(0));
            bhs.set_u32(24, 1);
            bhs.set_u32(28, exp_statsn);
            let data = text::encode(keys);
            let frame = encode_pdu(bhs, &data);
            stream
                .write_all(&frame)
                .await
                .map_err(|e| login_err(format!("sending a login PDU: {e}")))?;
            let response = read_frame(&mut stream, &mut buf)
                .await
                .map_err(|e| login_err(format!("reading the login response: {e}")))?
                .ok_or_else(|| login_err("the target closed the connection during login".into()))?;
            if response.bhs.opcode_value() != 0x23 {
                return Err(login_err(format!(
                    "expected a Login Response, got opcode {:#04x}",
                    response.bhs.opcode_value()
                )));
            }
            let (class, detail) = (response.bhs.0[36], response.bhs.0[37]);
            if (class, detail) != (0, 0) {
                return Err(login_err(format!(
                    "status class {class:#04x} detail {detail:#04x}"
                )));
            }
            if response.bhs.0[1] & 0x80 == 0 {
                return Err(login_err(format!(
                    "the target did not move on from login stage {csg} (it wants more negotiation)"
                )));
            }
            exp_statsn = response.bhs.u32_at(24).wrapping_add(1);
            negotiated = text::parse(&response.data).map_err(|e| login_err(e.to_string()))?;
        }
        let key = |k: &str| {
            negotiated
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        // The harness relies on writes travelling as immediate data without an R2T: say so if not agreed.
        if key("ImmediateData") != Some("Yes") || key("InitialR2T") != Some("No") {
            return Err(login_err(format!(
                "the target did not agree to ImmediateData=Yes / InitialR2T=No (answer: {negotiated:?})"
            )));
        }
        let first_burst: u32 = key("FirstBurstLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(65536);
        let target_mrdsl: u32 = key("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192);
        if first_burst.min(target_mrdsl) < MAX_WRITE_BYTES {
            return Err(login_err(format!(
                "the target takes only {} bytes of immediate data; the harness writes up to {MAX_WRITE_BYTES}",
                first_burst.min(target_mrdsl)
            )));
        }

        let (mut read_half, write_half) = stream.into_split();
        let shared = Arc::new(Shared {
            portal,
            writer: tokio::sync::Mutex::new(Writer {
                half: write_half,
                cmdsn: 1,
                next_itt: 1,
            }),
            pending: Mutex::new(HashMap::new()),
            exp_statsn: AtomicU32::new(exp_statsn),
            dead: AtomicBool::new(false),
            death: Mutex::new(None),
        });
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let why = read_loop(&reader_shared, &mut read_half, buf).await;
            reader_shared.die(why);
        });
        let session = Session { shared, reader };
        // Each new nexus gets one UNIT ATTENTION (power on / reset); consume it here.
        for _ in 0..4 {
            match session
                .command(&[0u8; 6], CommandKind::NoData, Bytes::new())
                .await
            {
                CommandOutcome::Good(_) => return Ok(session),
                CommandOutcome::CheckCondition {
                    key: UNIT_ATTENTION, ..
                } => continue,
                other => {
                    return Err(InitiatorError::Command {
                        portal,
                        outcome: other,
                    })
                }
            }
        }
        Err(login_err("TEST UNIT READY never returned GOOD".into()))
    }

    pub fn portal(&self) -> SocketAddr {
        self.shared.portal
    }

    /// Whether the connection is gone (every later command fails with `Disconnected`).
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Why the connection ended, if it has.
    pub fn death(&self) -> Option<String> {
        self.shared.death.lock().expect("death lock").clone()
    }

    /// WRITE(16) of `data` (a multiple of 512 bytes, at most [`MAX_WRITE_BYTES`]) at logical block `lba`.
    /// Cancellation safety: once sent, the write may land whether or not the future is polled to the end.
    pub async fn write(&self, lba: u64, data: Bytes) -> CommandOutcome {
        debug_assert!(
            data.len() as u32 <= MAX_WRITE_BYTES && data.len().is_multiple_of(LOGICAL_BLOCK as usize)
        );
        let cdb = rw16_cdb(0x8a, lba, data.len() as u32 / LOGICAL_BLOCK);
        self.command(&cdb, CommandKind::Write, data).await
    }

    /// READ(16) of `blocks` logical blocks at `lba`.
    pub async fn read(&self, lba: u64, blocks: u32) -> CommandOutcome {
        let cdb = rw16_cdb(0x88, lba, blocks);
        self.command(&cdb, CommandKind::Read(blocks * LOGICAL_BLOCK), Bytes::new())
            .await
    }

    /// READ CAPACITY(16): GOOD with the 32-byte parameter data (see [`capacity_blocks`]), or the unit
    /// attention a grown volume raises first (CAPACITY DATA HAS CHANGED).
    pub async fn read_capacity(&self) -> CommandOutcome {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        self.command(&cdb, CommandKind::Read(32), Bytes::new()).await
    }

    /// SYNCHRONIZE CACHE(10) of the whole LUN: GOOD means every write acknowledged before it was sent is
    /// durable on the replicas.
    pub async fn flush(&self) -> CommandOutcome {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x35;
        self.command(&cdb, CommandKind::NoData, Bytes::new()).await
    }

    async fn command(&self, cdb: &[u8], kind: CommandKind, data: Bytes) -> CommandOutcome {
        if self.is_dead() {
            return CommandOutcome::Disconnected;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut writer = self.shared.writer.lock().await;
            let itt = writer.next_itt;
            // ITT 0xffffffff is reserved; wrap before it.
            writer.next_itt = if itt >= 0x7fff_ffff { 1 } else { itt + 1 };
            let mut bhs = Bhs::new(Opcode::ScsiCommand);
            let (read, write, edtl) = match kind {
                CommandKind::NoData => (false, false, 0),
                CommandKind::Write => (false, true, data.len() as u32),
                CommandKind::Read(len) => (true, false, len),
            };
            // F, R/W and task attribute SIMPLE.
            bhs.0[1] = 0x80 | 0x01 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 };
            bhs.set_lun(Lun::from_number(0));
            bhs.set_itt(Itt(itt));
            bhs.set_u32(20, edtl);
            bhs.set_u32(24, writer.cmdsn);
            bhs.set_u32(28, self.shared.exp_statsn.load(Ordering::SeqCst));
            bhs.0[32..32 + cdb.len()].copy_from_slice(cdb);
            writer.cmdsn = writer.cmdsn.wrapping_add(1);
            self.shared.pending.lock().expect("pending lock").insert(
                itt,
                Pending {
                    data: BytesMut::new(),
                    done: tx,
                },
            );
            // Header and payload go out as two slices of one vectored write: the payload is not copied.
            bhs.set_data_segment_len(data.len() as u32);
            let pad = &pdu_padding()[..pad_len(data.len())];
            let sent = write_all_vectored(&mut writer.half, &[&bhs.0, &data, pad]).await;
            if let Err(e) = sent {
                drop(writer);
                self.shared.die(format!("send failed: {e}"));
            }
        }
        // The reader (or `die`) always resolves the sender; a dropped sender means the session died.
        rx.await.unwrap_or(CommandOutcome::Disconnected)
    }
}

/// The number of logical blocks a GOOD READ CAPACITY(16) reports (its last LBA plus one).
pub fn capacity_blocks(outcome: &CommandOutcome) -> Option<u64> {
    match outcome {
        CommandOutcome::Good(data) => data
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(|b| u64::from_be_bytes(b) + 1),
        _ => None,
    }
}

/// The largest write the harness issues through one command (bytes).
pub const MAX_WRITE_BYTES: u32 = 64 * 1024;

#[derive(Clone, Copy)]
enum CommandKind {
    NoData,
    Write,
    Read(u32),
}

impl Shared {
    /// Marks the session dead and fails every command still waiting.
    fn die(&self, why: String) {
        self.dead.store(true, Ordering::SeqCst);
        self.death.lock().expect("death lock").get_or_insert(why);
        let pending: Vec<Pending> = self
            .pending
            .lock()
            .expect("pending lock")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            let _ = p.done.send(CommandOutcome::Disconnected);
        }
    }

    fn finish(&self, itt: u32, outcome: impl FnOnce(BytesMut) -> CommandOutcome) {
        if let Some(p) = self.pending.lock().expect("pending lock").remove(&itt) {
            let _ = p.done.send(outcome(p.data));
        }
    }
}

/// Reads PDUs until the connection ends; returns why it ended.
async fn read_loop(
    shared: &Arc<Shared>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
) -> String {
    let decoder = FrameDecoder {
        header_digest: false,
        data_digest: false,
        max_data_segment: pdu::MAX_DATA_SEGMENT,
    };
    loop {
        let frame = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => break frame,
                Ok(None) => {}
                Err(e) => return format!("undecodable PDU from the target: {e}"),
            }
            if buf.capacity() - buf.len() < 64 * 1024 {
                buf.reserve(256 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => return "the target closed the connection".into(),
                Ok(_) => {}
                Err(e) => return format!("reading from the target: {e}"),
            }
        };
        let bhs = frame.bhs;
        let itt = bhs.u32_at(16);
        let opcode = bhs.opcode_value();
        // PDUs that carry a status advance ExpStatSN (Data-In only with the S bit; our pings' replies never).
        let carries_status = match opcode {
            0x25 => bhs.0[1] & 0x01 != 0,
            0x20 => itt != 0xffff_ffff,
            0x31 => false,
            _ => true,
        };
        if carries_status {
            shared
                .exp_statsn
                .store(bhs.u32_at(24).wrapping_add(1), Ordering::SeqCst);
        }
        match opcode {
            // SCSI Response.
            0x21 => {
                let (response, status) = (bhs.0[2], bhs.0[3]);
                let sense = frame.data.clone();
                shared.finish(itt, |data| scsi_outcome(response, status, &sense, data.freeze()));
            }
            // SCSI Data-In: accumulate; the last one may carry the status.
            0x25 => {
                let offset = bhs.u32_at(40) as usize;
                let mut order_error = None;
                if let Some(p) = shared.pending.lock().expect("pending lock").get_mut(&itt) {
                    if offset != p.data.len() {
                        order_error = Some(format!(
                            "Data-In for ITT {itt:#x} at offset {offset}, expected {}",
                            p.data.len()
                        ));
                    } else {
                        p.data.put_slice(&frame.data);
                    }
                }
                if let Some(reason) = order_error {
                    return reason;
                }
                if bhs.0[1] & 0x01 != 0 {
                    let status = bhs.0[3];
                    shared.finish(itt, |data| scsi_outcome(0, status, &Bytes::new(), data.freeze()));
                }
            }
            // NOP-In: a ping of the target's own (TTT set) must be answered, or it drops the connection.
            0x20 => {
                let ttt = bhs.u32_at(20);
                if ttt != 0xffff_ffff {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let mut writer = shared.writer.lock().await;
                        let mut out = Bhs::new(Opcode::NopOut);
                        out.set_immediate(true);
                        out.0[1] = 0x80;
                        out.set_itt(Itt(0xffff_ffff));
                        out.set_u32(20, ttt);
                        out.set_u32(24, writer.cmdsn);
                        out.set_u32(28, shared.exp_statsn.load(Ordering::SeqCst));
                        let frame = encode_pdu(out, &[]);
                        if let Err(e) = writer.half.write_all(&frame).await {
                            drop(writer);
                            shared.die(format!("answering a NOP-In: {e}"));
                        }
                    });
                }
            }
            // Reject: the rejected header is the data segment; its ITT names the command.
            0x3f => {
                let reason = bhs.0[2];
                if frame.data.len() >= 20 {
                    let rejected = u32::from_be_bytes(frame.data[16..20].try_into().expect("4 bytes"));
                    shared.finish(rejected, |_| CommandOutcome::Rejected { reason });
                }
            }
            // R2T: we only ever send writes whole as immediate data (see the module doc).
            0x31 => return format!("unexpected R2T for ITT {itt:#x}: the harness sends every write whole"),
            // Asynchronous Message (e.g. the target asks us to log out before it stops): the connection will
            // close; nothing to do until it does.
            0x32 => {}
            other => return format!("unexpected PDU opcode {other:#04x} from the target"),
        }
    }
}

fn scsi_outcome(response: u8, status: u8, sense_segment: &Bytes, data: Bytes) -> CommandOutcome {
    match (response, status) {
        (0, 0) => CommandOutcome::Good(data),
        (0, 0x02) => {
            // The data segment is SenseLength (2 bytes) + fixed-format sense data (SPC-4 §4.5.3).
            let sense = sense_segment.get(2..).unwrap_or(&[]);
            CommandOutcome::CheckCondition {
                key: sense.get(2).map_or(0, |k| k & 0x0f),
                asc: sense.get(12).copied().unwrap_or(0),
                ascq: sense.get(13).copied().unwrap_or(0),
            }
        }
        (response, status) => CommandOutcome::Failed { status, response },
    }
}

fn rw16_cdb(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn pdu_padding() -> &'static [u8; 4] {
    &[0; 4]
}

/// A whole PDU in one buffer (login and NOP-Out: small, off the data path).
fn encode_pdu(mut bhs: Bhs, data: &[u8]) -> BytesMut {
    bhs.set_data_segment_len(data.len() as u32);
    let mut out = BytesMut::with_capacity(pdu::BHS_LEN + data.len() + 3);
    out.put_slice(&bhs.0);
    out.put_slice(data);
    out.put_slice(&pdu_padding()[..pad_len(data.len())]);
    out
}

async fn write_all_vectored(half: &mut OwnedWriteHalf, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let slices: Vec<std::io::IoSlice<'_>> = parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut written = half.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            if written >= parts[0].len() {
                written -= parts[0].len();
                parts.remove(0);
            } else {
                parts[0] = &parts[0][written..];
                written = 0;
            }
        }
    }
    Ok(())
}

/// A received PDU during login.
struct RawPdu {
    bhs: Bhs,
    data: Bytes,
}

async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Option<RawPdu>> {
    let decoder = FrameDecoder {
        header_digest: false,
        data_digest: false,
        max_data_segment: pdu::MAX_DATA_SEGMENT,
    };
    loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                return Ok(Some(RawPdu {
                    bhs: frame.bhs,
                    data: frame.data,
                }))
            }
            Ok(None) => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}
