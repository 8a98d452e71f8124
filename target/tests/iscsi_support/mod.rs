//! Test harness for the iSCSI transport: a portal on 127.0.0.1:0, a raw
//! initiator that speaks PDUs (so tests can send exactly what they mean,
//! malformed or not), and a gated logical unit that holds commands until the
//! test releases them (to observe concurrency and aborts without timing luck).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_target::file::{FileDevice, FileDeviceOptions};
use basalt_target::iscsi::pdu::{self, Bhs, FrameDecoder, Itt, Lun, Opcode, BHS_LEN};
use basalt_target::iscsi::{digest, text, Portal, PortalConfig, Target, TargetConfig};
use basalt_target::lu::{ItNexus, LogicalUnit, ResetKind, ScsiCommand, ScsiResult, ScsiStatus};
use basalt_target::scsi::{LuConfig, ScsiLogicalUnit};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub const INITIATOR: &str = "iqn.2026-11.org.example:test-initiator";

/// A running portal; dropping it shuts the portal down.
pub struct TestPortal {
    pub addr: SocketAddr,
    pub portal: Arc<Portal>,
    pub shutdown: CancellationToken,
    pub served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for TestPortal {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start_portal(config: PortalConfig, targets: Vec<Arc<Target>>) -> TestPortal {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().unwrap();
    let portal = Portal::new(config, targets);
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(portal.clone().serve(listener, shutdown.clone()));
    TestPortal {
        addr,
        portal,
        shutdown,
        served,
    }
}

/// Longest wait for a session count to reach what a test expects: far above
/// the moment a connection task takes to unregister its session, on any
/// machine the tests run on.
pub const SESSION_WAIT: Duration = Duration::from_secs(10);

/// Wait until `count()` (a target's or a portal's session count) is `want`,
/// failing after [`SESSION_WAIT`]. A session leaves the registry when its
/// connection task ends, a moment after the initiator sees the logout answer
/// or the close: a test that sleeps first and asserts after passes or fails
/// depending on the machine's load.
pub async fn wait_for_sessions(what: &str, count: impl Fn() -> usize, want: usize) {
    let deadline = tokio::time::Instant::now() + SESSION_WAIT;
    loop {
        let now = count();
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {now} session(s) after {SESSION_WAIT:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A file-backed SCSI LU of `size` bytes in a temporary directory.
pub fn file_lu(dir: &tempfile::TempDir, size: u64) -> Arc<ScsiLogicalUnit<FileDevice>> {
    let device = FileDevice::open(
        dir.path().join("volume.img"),
        FileDeviceOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .expect("open file device");
    Arc::new(ScsiLogicalUnit::new(Arc::new(device), LuConfig::new("test")))
}

/// A logical unit that answers every command GOOD, returning
/// `expected_transfer_len` bytes of 0xab for reads, but only once the test
/// releases it. It records how many commands ran at once.
pub struct GatedLu {
    pub gate: Semaphore,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    pub resets: Mutex<Vec<ResetKind>>,
    pub writes: Mutex<Vec<Bytes>>,
}

impl Default for GatedLu {
    fn default() -> Self {
        GatedLu {
            gate: Semaphore::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            resets: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
        }
    }
}

impl GatedLu {
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    pub async fn wait_started(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.started.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} commands never reached the LU together"));
    }
}

impl LogicalUnit for GatedLu {
    async fn execute(&self, cmd: ScsiCommand) -> ScsiResult {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _leave = Leave(&self.running);
        self.gate.acquire().await.expect("gate open").forget();
        self.finished.fetch_add(1, Ordering::SeqCst);
        if !cmd.data_out.is_empty() {
            self.writes.lock().unwrap().push(cmd.data_out.clone());
        }
        let read = cmd.direction == basalt_target::lu::DataDirection::Read;
        ScsiResult {
            status: ScsiStatus::Good,
            sense: None,
            data_in: if read {
                Bytes::from(vec![0xab; cmd.expected_transfer_len as usize])
            } else {
                Bytes::new()
            },
            data_out_len: cmd.data_out.len() as u32,
        }
    }
    fn reset(&self, kind: ResetKind, _by: &ItNexus) {
        self.resets.lock().unwrap().push(kind);
    }
    fn nexus_added(&self, _nexus: &ItNexus) {}
    fn nexus_removed(&self, _nexus: &ItNexus) {}
}

pub fn target_with<L: LogicalUnit>(name: &str, lu: Arc<L>) -> Arc<Target> {
    Target::new(TargetConfig::new(basalt_target::iscsi::target_iqn(name), lu)).unwrap()
}

/// A PDU received from the target.
#[derive(Debug, Clone)]
pub struct Received {
    pub bhs: Bhs,
    pub data: Bytes,
}

impl Received {
    pub fn opcode(&self) -> u8 {
        self.bhs.opcode_value()
    }
    pub fn itt(&self) -> u32 {
        self.bhs.u32_at(16)
    }
    pub fn keys(&self) -> Vec<(String, String)> {
        text::parse(&self.data).expect("target sends valid text")
    }
    pub fn key(&self, k: &str) -> Option<String> {
        self.keys().into_iter().find(|(key, _)| key == k).map(|(_, v)| v)
    }
    pub fn login_status(&self) -> (u8, u8) {
        (self.bhs.0[36], self.bhs.0[37])
    }
}

/// A raw initiator over one TCP connection.
pub struct RawInitiator {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub cmdsn: u32,
    pub exp_statsn: u32,
    pub next_itt: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub isid: [u8; 6],
}

impl RawInitiator {
    pub async fn connect(addr: SocketAddr) -> RawInitiator {
        let stream = TcpStream::connect(addr).await.expect("connect to portal");
        stream.set_nodelay(true).unwrap();
        RawInitiator {
            stream,
            buf: BytesMut::new(),
            cmdsn: 1,
            exp_statsn: 0,
            next_itt: 1,
            header_digest: false,
            data_digest: false,
            isid: [0x80, 0, 0, 0, 0x12, 0x34],
        }
    }

    pub fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    /// Send a PDU (header + data, with digests as negotiated).
    pub async fn send(&mut self, mut bhs: Bhs, data: &[u8]) {
        bhs.set_data_segment_len(data.len() as u32);
        bhs.set_u32(28, self.exp_statsn);
        let mut out = BytesMut::new();
        out.put_slice(&bhs.0);
        if self.header_digest {
            out.put_slice(&digest::to_wire(digest::crc32c(&[&bhs.0])));
        }
        out.put_slice(data);
        out.put_slice(&digest::PADDING[..digest::pad_len(data.len())]);
        if self.data_digest && !data.is_empty() {
            out.put_slice(&digest::to_wire(digest::data_digest(data)));
        }
        self.stream.write_all(&out).await.expect("send PDU");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send bytes");
    }

    /// Receive the next PDU, or `None` if the target closed the connection.
    pub async fn recv_opt(&mut self) -> Option<Received> {
        let decoder = FrameDecoder {
            header_digest: self.header_digest,
            data_digest: self.data_digest,
            max_data_segment: pdu::MAX_DATA_SEGMENT,
        };
        loop {
            if let Some(frame) = decoder.decode(&mut self.buf).expect("target sends valid frames") {
                let statsn = frame.bhs.u32_at(24);
                let carries_status = match frame.bhs.opcode_value() {
                    0x25 => frame.bhs.0[1] & 0x01 != 0,
                    0x31 => false,
                    0x20 => frame.bhs.u32_at(16) != 0xffff_ffff,
                    _ => true,
                };
                if carries_status {
                    self.exp_statsn = statsn.wrapping_add(1);
                }
                return Some(Received {
                    bhs: frame.bhs,
                    data: frame.data,
                });
            }
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("no PDU from the target within 10 s"),
            }
        }
    }

    pub async fn recv(&mut self) -> Received {
        self.recv_opt()
            .await
            .expect("target closed the connection unexpectedly")
    }

    /// True if the target sends nothing (and keeps the connection open) for
    /// `window`; whatever it does send stays buffered for the next `recv`.
    /// For checking that something is *not* answered yet: the window bounds
    /// how long the test watches, it synchronises nothing.
    pub async fn quiet_for(&mut self, window: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        tokio::time::timeout(window, self.stream.read_buf(&mut self.buf))
            .await
            .is_err()
    }

    /// True if the target closes the connection within `within` (any PDUs
    /// before the close are skipped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let mut scratch = [0u8; 4096];
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// One Login Request.
    pub async fn login_pdu(&mut self, csg: u8, nsg: Option<u8>, keys: &[(&str, &str)]) -> Received {
        let mut bhs = Bhs::new(Opcode::LoginRequest);
        bhs.set_immediate(true);
        bhs.0[1] = (csg << 2) | nsg.map_or(0, |n| 0x80 | n);
        bhs.0[8..14].copy_from_slice(&self.isid);
        bhs.set_itt(Itt(0));
        bhs.set_u32(24, self.cmdsn);
        self.send(bhs, &text::encode(keys)).await;
        self.recv().await
    }

    /// Log in without authentication straight through operational
    /// negotiation with `op_keys`; returns the final response.
    pub async fn login(&mut self, target: &str, op_keys: &[(&str, &str)]) -> Received {
        let r = self
            .login_pdu(
                0,
                Some(1),
                &[
                    ("InitiatorName", INITIATOR),
                    ("TargetName", target),
                    ("SessionType", "Normal"),
                    ("AuthMethod", "None"),
                ],
            )
            .await;
        assert_eq!(r.login_status(), (0, 0), "security stage refused: {:?}", r.keys());
        let r = self.login_pdu(1, Some(3), op_keys).await;
        assert_eq!(
            r.login_status(),
            (0, 0),
            "operational stage refused: {:?}",
            r.keys()
        );
        assert!(
            r.bhs.0[1] & 0x80 != 0,
            "target did not move to full feature phase"
        );
        self.apply(&r);
        r
    }

    /// TEST UNIT READY until GOOD: a real LU reports the power-on UNIT
    /// ATTENTION to each new nexus once, as real initiators expect.
    pub async fn clear_unit_attention(&mut self) {
        for _ in 0..3 {
            let itt = self.itt();
            let bhs = self.command(itt, &[0; 6], 0, false, false, true);
            self.send(bhs, &[]).await;
            let r = self.recv().await;
            assert_eq!((r.opcode(), r.itt()), (0x21, itt));
            if r.bhs.0[3] == 0 {
                return;
            }
        }
        panic!("TEST UNIT READY never returned GOOD");
    }

    /// Take digests from the final login response.
    pub fn apply(&mut self, r: &Received) {
        self.header_digest = r.key("HeaderDigest").as_deref() == Some("CRC32C");
        self.data_digest = r.key("DataDigest").as_deref() == Some("CRC32C");
    }

    /// A SCSI Command PDU header.
    pub fn command(
        &mut self,
        itt: u32,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
        final_bit: bool,
    ) -> Bhs {
        let mut bhs = Bhs::new(Opcode::ScsiCommand);
        bhs.0[1] = 0x01
            | if final_bit { 0x80 } else { 0 }
            | if read { 0x40 } else { 0 }
            | if write { 0x20 } else { 0 };
        bhs.set_lun(Lun::from_number(0));
        bhs.set_itt(Itt(itt));
        bhs.set_u32(20, edtl);
        bhs.set_u32(24, self.cmdsn);
        self.cmdsn = self.cmdsn.wrapping_add(1);
        bhs.0[32..32 + cdb.len()].copy_from_slice(cdb);
        bhs
    }

    /// READ(10) of `blocks` 512-byte blocks at `lba`: collects Data-In
    /// until status; returns (data, status, pdus received).
    pub async fn read10(&mut self, lba: u32, blocks: u16) -> (Vec<u8>, u8, Vec<Received>) {
        let itt = self.itt();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let bhs = self.command(itt, &cdb, u32::from(blocks) * 512, true, false, true);
        self.send(bhs, &[]).await;
        self.collect(itt).await
    }

    /// Collect the Data-In and status of `itt`.
    pub async fn collect(&mut self, itt: u32) -> (Vec<u8>, u8, Vec<Received>) {
        let mut data = Vec::new();
        let mut pdus = Vec::new();
        loop {
            let r = self.recv().await;
            assert_eq!(r.itt(), itt, "unexpected PDU {:?}", r.bhs);
            pdus.push(r.clone());
            match r.opcode() {
                0x25 => {
                    assert_eq!(r.bhs.u32_at(40) as usize, data.len(), "Data-In out of order");
                    data.extend_from_slice(&r.data);
                    if r.bhs.0[1] & 0x01 != 0 {
                        return (data, r.bhs.0[3], pdus);
                    }
                }
                0x21 => return (data, r.bhs.0[3], pdus),
                other => panic!("unexpected opcode {other:#x} for a read"),
            }
        }
    }

    /// WRITE(10) with all of `data` as immediate data.
    pub async fn write10_immediate(&mut self, lba: u32, data: &[u8]) -> Received {
        let itt = self.itt();
        let bhs = self.command(
            itt,
            &write10_cdb(lba, data.len()),
            data.len() as u32,
            false,
            true,
            true,
        );
        self.send(bhs, data).await;
        let r = self.recv().await;
        assert_eq!(
            (r.opcode(), r.itt()),
            (0x21, itt),
            "expected the write's SCSI Response"
        );
        r
    }

    pub async fn nop_out(&mut self, itt: u32, ping: &[u8]) {
        let mut bhs = Bhs::new(Opcode::NopOut);
        bhs.set_immediate(true);
        bhs.0[1] = 0x80;
        bhs.set_itt(Itt(itt));
        bhs.set_u32(20, 0xffff_ffff);
        bhs.set_u32(24, self.cmdsn);
        self.send(bhs, ping).await;
    }

    pub async fn logout(&mut self) -> Received {
        let mut bhs = Bhs::new(Opcode::LogoutRequest);
        bhs.set_immediate(true);
        bhs.0[1] = 0x80;
        let itt = self.itt();
        bhs.set_itt(Itt(itt));
        bhs.set_u32(24, self.cmdsn);
        self.send(bhs, &[]).await;
        loop {
            let r = self.recv().await;
            if r.opcode() == 0x26 {
                return r;
            }
        }
    }
}

pub fn write10_cdb(lba: u32, len: usize) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&((len / 512) as u16).to_be_bytes());
    cdb
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub const BHS: usize = BHS_LEN;
