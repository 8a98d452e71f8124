//! The replica server, driven over TCP through the wire protocol: what a
//! controller can rely on, and what a broken or stale controller cannot do.
//!
//! Every test runs its own in-process server on 127.0.0.1 port 0 over a
//! fresh temporary store, so the tests run concurrently without colliding.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use basalt_proto::auth::{Challenge, HandshakeError, Nonce, Prover, VolumeSecret};
use basalt_proto::client::{ClientError, ReplicaClient};
use basalt_proto::frame::{
    BlockCrc, BlockRun, Extent, Frame, FrameCodec, Message, Op, ProtocolVersion, ReplyError, RequestId,
    SyncPoint, WrittenAnswer, HEADER_LEN, MAX_CRC_RUNS, MAX_PAYLOAD,
};
use basalt_proto::{Epoch, VolumeId};
use basalt_replica::server::{Metrics, Server};
use basalt_replica::store::{Backend, DirBackend, Object, Store};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// The volume secret the test replicas and their clients share.
fn secret() -> VolumeSecret {
    VolumeSecret::new("server-protocol-test-secret").unwrap()
}

/// A secret that is not the volume's.
fn wrong_secret() -> VolumeSecret {
    VolumeSecret::new("not-the-volumes-secret").unwrap()
}

/// A running in-process replica.
struct Replica {
    addr: SocketAddr,
    volume: VolumeId,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), basalt_replica::server::ServerError>>,
    metrics: Metrics,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start() -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), VolumeId::random(), 64 * MIB).unwrap();
        Replica::serve(Arc::new(store), dir).await
    }

    async fn serve(store: Arc<Store>, dir: tempfile::TempDir) -> Replica {
        let volume = store.volume_id();
        let metrics = Metrics::new();
        let server = Server::bind("127.0.0.1:0".parse().unwrap(), store, metrics.clone(), secret())
            .await
            .unwrap();
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Replica {
            addr,
            volume,
            shutdown,
            task,
            metrics,
            _dir: dir,
        }
    }

    /// Controller connections the replica holds open (its `connections` gauge).
    fn open_connections(&self) -> i64 {
        let families = self.metrics.registry().gather();
        let gauge = families
            .iter()
            .find(|f| f.name() == "basalt_replica_connections")
            .expect("a connections gauge");
        gauge.get_metric()[0].get_gauge().value() as i64
    }

    async fn client(&self, epoch: u64) -> ReplicaClient {
        ReplicaClient::connect(self.addr, self.volume, Epoch(epoch), &secret())
            .await
            .unwrap()
    }

    /// A raw framed connection, for sending what the client never would.
    async fn raw(&self) -> Framed<TcpStream, FrameCodec> {
        Framed::new(TcpStream::connect(self.addr).await.unwrap(), FrameCodec)
    }

    /// A raw connection that said Hello at `epoch` (as a writer) and answered the replica's challenge
    /// with `secret`'s proof; the replica's answer to that Auth.
    async fn hello_and_auth(
        &self,
        epoch: u64,
        secret: &VolumeSecret,
    ) -> (Framed<TcpStream, FrameCodec>, Frame) {
        let mut raw = self.raw().await;
        let client = Nonce::random();
        let hello = Message::Hello {
            volume: self.volume,
            min_version: ProtocolVersion::MIN_SUPPORTED,
            max_version: ProtocolVersion::CURRENT,
            writer: true,
            nonce: client,
        };
        raw.send(Frame::new(RequestId(1), Epoch(epoch), hello))
            .await
            .unwrap();
        let reply = raw.next().await.unwrap().unwrap().message;
        let Message::HelloOk {
            volume, nonce, proof, ..
        } = reply
        else {
            panic!("expected HelloOk, got {reply:?}");
        };
        let challenge = Challenge {
            volume,
            client,
            replica: nonce,
        };
        assert!(
            challenge.verify(&self::secret(), Prover::Replica, &proof),
            "the replica proves the volume's secret"
        );
        let proof = challenge.prove(secret, Prover::Client);
        raw.send(Frame::new(RequestId(2), Epoch(epoch), Message::Auth { proof }))
            .await
            .unwrap();
        let reply = raw.next().await.unwrap().unwrap();
        (raw, reply)
    }

    /// A raw connection that said Hello at `epoch` and authenticated.
    async fn authenticated(&self, epoch: u64) -> Framed<TcpStream, FrameCodec> {
        let (raw, reply) = self.hello_and_auth(epoch, &secret()).await;
        assert!(matches!(reply.message, Message::AuthOk { .. }), "{reply:?}");
        raw
    }
}

fn block(byte: u8) -> Bytes {
    Bytes::from(vec![byte; 4096])
}

fn refusal(result: Result<impl std::fmt::Debug, ClientError>) -> ReplyError {
    match result {
        Err(e) => e
            .reply_error()
            .unwrap_or_else(|| panic!("expected a replica refusal, got {e}")),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

#[tokio::test]
async fn writes_read_back_and_flush_raises_the_revision() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    let id = client.identity();
    assert_eq!(
        (id.volume, id.size_bytes, id.epoch),
        (replica.volume, 64 * MIB, Epoch(1))
    );

    let writes: Vec<_> = (0..8u8)
        .map(|i| client.write(u64::from(i) * 4096, block(i + 1), false))
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    let data = client.read(0, 8 * 4096).await.unwrap();
    for i in 0..8 {
        assert!(
            data[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8 + 1),
            "block {i}"
        );
    }
    let before = client.info().await.unwrap().revision;
    let revision = client.flush().await.unwrap();
    assert!(
        revision.0 > before,
        "flush raised the revision from {before} to {revision}"
    );

    client.write(MIB, block(0xaa), true).await.unwrap();
    assert_eq!(client.read(MIB, 4096).await.unwrap(), block(0xaa));

    client.unmap(0, 2 * 4096).await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), block(0));
    assert_eq!(client.read(2 * 4096, 4096).await.unwrap(), block(3));
    client.ping().await.unwrap();
}

#[tokio::test]
async fn overlapping_pipelined_writes_apply_in_arrival_order() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    // 64 writes to the same block, none awaited before the next is sent.
    let writes: Vec<_> = (0..64u8).map(|i| client.write(0, block(i), false)).collect();
    let flush = client.flush();
    for w in writes {
        w.await.unwrap();
    }
    flush.await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), block(63));
}

/// Data objects whose reads wait while the gate is closed: a read that is
/// stuck for as long as the test wants, without timing luck.
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
    }
}

struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

struct GatedBackend {
    inner: DirBackend,
    gate: Arc<Gate>,
}

struct GatedObject {
    inner: Box<dyn Object>,
    gate: Option<Arc<Gate>>,
}

impl Object for GatedObject {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

impl GatedBackend {
    fn wrap(&self, name: &str, object: Box<dyn Object>) -> Box<dyn Object> {
        let gate = name.ends_with(".data").then(|| self.gate.clone());
        Box::new(GatedObject { inner: object, gate })
    }
}

impl Backend for GatedBackend {
    fn create(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        Ok(self.wrap(name, self.inner.create(name, capacity)?))
    }
    fn open(&self, name: &str, capacity: u64) -> io::Result<Box<dyn Object>> {
        Ok(self.wrap(name, self.inner.open(name, capacity)?))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn read_blob(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read_blob(name)
    }
    fn replace_blob(&self, name: &str, content: &[u8]) -> io::Result<()> {
        self.inner.replace_blob(name, content)
    }
    fn sync_namespace(&self) -> io::Result<()> {
        self.inner.sync_namespace()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[tokio::test]
async fn replies_complete_out_of_order_a_stuck_read_does_not_hold_up_a_ping() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate {
        closed: Mutex::new(false),
        opened: Condvar::new(),
    });
    let backend = GatedBackend {
        inner: DirBackend::new(dir.path()).unwrap(),
        gate: gate.clone(),
    };
    let store = Store::create_with_backend(Arc::new(backend), VolumeId::random(), 16 * MIB).unwrap();
    let replica = Replica::serve(Arc::new(store), dir).await;
    let client = replica.client(1).await;
    client.write(0, block(7), false).await.unwrap();

    gate.set(true);
    // Whatever happens below, never leave a blocking thread stuck.
    let _reopen = OpenOnDrop(gate.clone());
    let slow_read = tokio::spawn(client.read(0, 4096));
    // Sent after the read, answered before it: replies are matched by id.
    client.ping().await.unwrap();
    // A write elsewhere (another stripe lock of the store than the read's)
    // is not held up either.
    client.write(8 * MIB, block(9), false).await.unwrap();
    assert!(!slow_read.is_finished(), "the read is still held at the gate");
    gate.set(false);
    assert_eq!(slow_read.await.unwrap().unwrap(), block(7));
}

#[tokio::test]
async fn stale_epoch_write_is_refused_and_never_applied() {
    let replica = Replica::start().await;
    let old = replica.client(1).await;
    old.write(0, block(1), true).await.unwrap();

    // A new controller takes over with a higher epoch.
    let new = replica.client(2).await;
    assert_eq!(new.identity().epoch, Epoch(2));

    let refused = old.write(0, block(0xee), false).await;
    assert_eq!(refusal(refused), ReplyError::StaleEpoch { current: Epoch(2) });
    assert_eq!(
        refusal(old.ping().await),
        ReplyError::StaleEpoch { current: Epoch(2) }
    );
    assert_eq!(
        refusal(old.flush().await),
        ReplyError::StaleEpoch { current: Epoch(2) }
    );
    assert_eq!(
        new.read(0, 4096).await.unwrap(),
        block(1),
        "the stale write did not happen"
    );

    // Data requests cannot raise the epoch: only Hello and SetEpoch do.
    let mut raw = replica.authenticated(2).await;
    let ahead = Frame::new(
        RequestId(2),
        Epoch(3),
        Message::Write {
            offset: 0,
            data: block(0xdd),
            fua: false,
        },
    );
    raw.send(ahead).await.unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Failed {
                error: ReplyError::EpochNotRaised { current: Epoch(2) },
                ..
            }
        ),
        "{reply:?}"
    );
    assert_eq!(new.read(0, 4096).await.unwrap(), block(1));

    // SetEpoch raises it; the client then speaks the new epoch.
    new.set_epoch(Epoch(5)).await.unwrap();
    assert_eq!(new.epoch(), Epoch(5));
    new.write(0, block(5), false).await.unwrap();
    assert_eq!(
        refusal(new.set_epoch(Epoch(4)).await),
        ReplyError::StaleEpoch { current: Epoch(5) }
    );
}

#[tokio::test]
async fn hello_checks_the_volume_and_a_nil_volume_discovers_it() {
    let replica = Replica::start().await;
    let wrong = ReplicaClient::connect(replica.addr, VolumeId::random(), Epoch(1), &secret()).await;
    assert_eq!(refusal(wrong.map(|_| ())), ReplyError::VolumeMismatch);

    let probe = ReplicaClient::connect(replica.addr, VolumeId(uuid::Uuid::nil()), Epoch(0), &secret())
        .await
        .unwrap();
    assert_eq!(probe.identity().volume, replica.volume);
    assert_eq!(probe.identity().size_bytes, 64 * MIB);
    // The probe's lower epoch changed nothing and is reported as such.
    let controller = replica.client(3).await;
    let probe2 = ReplicaClient::connect(replica.addr, VolumeId(uuid::Uuid::nil()), Epoch(1), &secret())
        .await
        .unwrap();
    assert_eq!(probe2.identity().epoch, Epoch(3));
    controller.ping().await.unwrap();
}

#[tokio::test]
async fn requests_before_hello_and_unknown_versions_are_refused() {
    let replica = Replica::start().await;
    let mut raw = replica.raw().await;
    raw.send(Frame::new(
        RequestId(7),
        Epoch(0),
        Message::Write {
            offset: 0,
            data: block(1),
            fua: false,
        },
    ))
    .await
    .unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert_eq!(reply.id, RequestId(7));
    assert!(matches!(
        reply.message,
        Message::Failed {
            op: Op::Write,
            error: ReplyError::NotAuthenticated,
            ..
        }
    ));

    let future_only = Frame::new(
        RequestId(8),
        Epoch(1),
        Message::Hello {
            volume: replica.volume,
            min_version: ProtocolVersion(ProtocolVersion::CURRENT.0 + 1),
            max_version: ProtocolVersion(u16::MAX),
            writer: false,
            nonce: Nonce::random(),
        },
    );
    raw.send(future_only).await.unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert!(matches!(
        reply.message,
        Message::Failed {
            error: ReplyError::VersionMismatch { .. },
            ..
        }
    ));

    let client = replica.client(1).await;
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(0),
        "the refused write did not happen"
    );
}

#[tokio::test]
async fn out_of_range_and_unaligned_requests_get_error_replies() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    assert_eq!(
        refusal(client.read(64 * MIB, 4096).await),
        ReplyError::OutOfRange { size_bytes: 64 * MIB }
    );
    assert_eq!(
        refusal(
            client
                .write(64 * MIB - 4096, Bytes::from(vec![1; 8192]), false)
                .await
        ),
        ReplyError::OutOfRange { size_bytes: 64 * MIB }
    );
    assert_eq!(
        refusal(client.read(100, 512).await),
        ReplyError::Unaligned { alignment: 512 }
    );
    assert_eq!(
        refusal(client.unmap(0, 1000).await),
        ReplyError::Unaligned { alignment: 512 }
    );
    // The connection is still in service after refusals.
    client.write(0, block(3), false).await.unwrap();
}

/// Writes raw bytes on a fresh Hello'd connection and returns whether the
/// server closed it (EOF) as it should.
async fn server_closes_after(replica: &Replica, garbage: &[u8]) -> bool {
    let raw = replica.authenticated(1).await;
    let mut stream = raw.into_inner();
    stream.write_all(garbage).await.unwrap();
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn encoded(frame: Frame) -> Vec<u8> {
    let e = frame.encode().unwrap();
    [e.header().as_slice(), e.payload_head(), e.payload()].concat()
}

#[tokio::test]
async fn malformed_frames_close_their_connection_and_the_server_keeps_serving() {
    let replica = Replica::start().await;
    let survivor = replica.client(1).await;
    survivor.write(0, block(1), true).await.unwrap();

    let write = encoded(Frame::new(
        RequestId(2),
        Epoch(1),
        Message::Write {
            offset: 0,
            data: block(0xee),
            fua: true,
        },
    ));
    let mut bad_magic = write.clone();
    bad_magic[0] = b'X';
    let mut bad_crc = write.clone();
    bad_crc[HEADER_LEN + 10] ^= 0xff;
    let mut bad_version = write.clone();
    bad_version[4] = 0x42;
    let mut oversize = write[..HEADER_LEN].to_vec();
    oversize[44..48].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let http = b"GET /metrics HTTP/1.1\r\n\r\n".to_vec();

    for (what, garbage) in [
        ("bad magic", bad_magic),
        ("bad crc", bad_crc),
        ("bad version", bad_version),
        ("oversize", oversize),
        ("http", http),
    ] {
        assert!(
            server_closes_after(&replica, &garbage).await,
            "{what}: connection closed"
        );
        survivor
            .ping()
            .await
            .unwrap_or_else(|e| panic!("{what}: other connection still served: {e}"));
    }
    assert_eq!(
        survivor.read(0, 4096).await.unwrap(),
        block(1),
        "no malformed write was applied"
    );
    let fresh = replica.client(1).await;
    fresh.ping().await.unwrap();
}

#[tokio::test]
async fn a_reply_sent_to_the_replica_is_refused() {
    let replica = Replica::start().await;
    let mut raw = replica.authenticated(1).await;
    raw.send(Frame::new(RequestId(5), Epoch(1), Message::WriteOk))
        .await
        .unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Failed {
                error: ReplyError::BadRequest,
                ..
            }
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn snapshots_are_ordered_exactly_between_the_writes_around_them() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    // Pipelined, nothing awaited: the snapshot must see A and not B.
    let a = client.write(0, block(0xa), false);
    let snap = client.snapshot_create("before-b");
    let b = client.write(0, block(0xb), false);
    a.await.unwrap();
    let info = snap.await.unwrap();
    b.await.unwrap();
    assert_eq!(info.name, "before-b");
    assert_eq!(client.read(0, 4096).await.unwrap(), block(0xb));

    let list = client.snapshot_list().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["before-b"]
    );
    assert_eq!(client.info().await.unwrap().snapshots, list);
    assert_eq!(
        refusal(client.snapshot_create("before-b").await),
        ReplyError::SnapshotExists
    );
    assert_eq!(
        refusal(client.snapshot_revert("nope").await),
        ReplyError::NoSuchSnapshot
    );

    client.snapshot_revert("before-b").await.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), block(0xa));
    client.snapshot_delete("before-b").await.unwrap();
    assert!(client.snapshot_list().await.unwrap().is_empty());
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(0xa),
        "delete merged the data into the head"
    );
    assert_eq!(
        refusal(client.snapshot_delete("before-b").await),
        ReplyError::NoSuchSnapshot
    );
}

#[tokio::test]
async fn shutdown_answers_accepted_writes_then_flushes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = Arc::new(Store::create(&path, VolumeId::random(), 16 * MIB).unwrap());
    let revision_before = store.revision();
    let replica = Replica::serve(store, dir).await;
    let client = replica.client(1).await;
    for i in 0..32u8 {
        client.write(u64::from(i) * 4096, block(i), false).await.unwrap();
    }
    replica.shutdown.cancel();
    replica.task.await.unwrap().unwrap();
    // The server is gone: its connections are closed.
    let after = client.ping().await;
    assert!(
        matches!(after, Err(ClientError::Disconnected { .. })),
        "{after:?}"
    );
    drop(client);

    // The shutdown's flush is the replica's own: it takes no revision (only the controller's
    // flushes are numbered), but it leaves nothing unflushed for the reopen to check.
    let reopened = Store::open(Path::new(&path)).unwrap();
    assert_eq!(reopened.recovered_unflushed(), 0, "the shutdown flushed");
    assert_eq!(reopened.revision(), revision_before, "an unnumbered flush");
    let mut buf = vec![0u8; 4096];
    reopened.read(31 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 31));
    drop(replica._dir);
}

#[tokio::test]
async fn dropping_a_reply_forgets_it_and_the_connection_stays_usable() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    for i in 0..100u64 {
        // Sent, never awaited.
        drop(client.write(i * 4096, block(1), false));
    }
    client.flush().await.unwrap();
    assert_eq!(
        client.read(99 * 4096, 4096).await.unwrap(),
        block(1),
        "dropped writes were still sent"
    );
}

#[tokio::test]
async fn metrics_endpoint_serves_counters_and_latency_histograms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap());
    let metrics = Metrics::new();
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        store.clone(),
        metrics.clone(),
        secret(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let listener = basalt_replica::server::bind_metrics("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    tokio::spawn(basalt_replica::server::serve_metrics(
        listener,
        metrics,
        store.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(server.run(shutdown.clone()));

    let client = ReplicaClient::connect(addr, store.volume_id(), Epoch(1), &secret())
        .await
        .unwrap();
    client.write(0, block(1), false).await.unwrap();
    let _ = client.read(16 * MIB, 4096).await;

    let mut http = TcpStream::connect(metrics_addr).await.unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    http.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("basalt_replica_requests_total{op=\"write\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("basalt_replica_bytes_total{direction=\"write\"} 4096"),
        "{page}"
    );
    assert!(
        page.contains("basalt_replica_request_errors_total{op=\"read\",status=\"out_of_range\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("basalt_replica_request_duration_seconds_bucket{op=\"write\""),
        "{page}"
    );
    assert!(page.contains("basalt_replica_epoch 1"), "{page}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_newer_writer_connection_shuts_out_the_older_one_at_the_same_epoch() {
    // A controller drops a hung link and opens a new one (for a rebuild):
    // frames the old link left in flight must not land afterwards.
    let replica = Replica::start().await;
    let old = replica.client(1).await;
    old.write(0, block(1), false).await.unwrap();
    let new = replica.client(1).await;
    let refused = old.write(0, block(0xee), false).await;
    assert_eq!(refusal(refused), ReplyError::Superseded);
    assert_eq!(refusal(old.unmap(0, 4096).await), ReplyError::Superseded);
    assert_eq!(
        new.read(0, 4096).await.unwrap(),
        block(1),
        "the superseded write did not happen"
    );
    new.write(0, block(2), false).await.unwrap();
    assert_eq!(
        new.read(0, 4096).await.unwrap(),
        block(2),
        "the new writer writes"
    );
}

/// Runs `test` on a thread of its own in a private network namespace whose only interface, `lo`, is up. There
/// [`set_loopback`]`(false)` cuts the network the way `docker network disconnect` cuts a container's: packets are
/// dropped, and neither side gets a FIN or a RST. Each test has its own namespace, so they run concurrently.
/// Creating one needs CAP_SYS_ADMIN (root, as for the container tests); without it the test fails, loudly.
fn in_private_network<F>(test: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        // A network namespace belongs to a thread: this one, and the sockets it creates, are in it.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "cannot create a network namespace ({}): this test needs CAP_SYS_ADMIN; run it as root",
                io::Error::last_os_error()
            );
        }
        set_loopback(true);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Brings the calling thread's `lo` up or down (SIOCSIFFLAGS).
fn set_loopback(up: bool) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain syscalls on a socket this function owns and a zeroed, then filled, `ifreq`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (to, from) in req.ifr_name.iter_mut().zip(b"lo") {
            *to = *from as libc::c_char;
        }
        let rc = libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req);
        assert_eq!(rc, 0, "SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
        let up_flag = libc::IFF_UP as libc::c_short;
        let flags = req.ifr_ifru.ifru_flags;
        req.ifr_ifru.ifru_flags = if up { flags | up_flag } else { flags & !up_flag };
        let rc = libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req);
        assert_eq!(rc, 0, "SIOCSIFFLAGS lo: {}", io::Error::last_os_error());
    }
}

/// A cut network says nothing to either side. Within the dead-peer bound the replica lets go of the cut
/// controller's connection and the controller's request into the cut fails (instead of hanging for the ~15
/// minutes of TCP retransmission, or forever on an idle link); once the network is back a controller writes
/// again at once, and the epoch fence still shuts out an older controller.
#[test]
fn a_cut_network_closes_both_ends_within_the_dead_peer_bound_and_a_new_writer_gets_in() {
    use basalt_proto::peer::DEAD_PEER_TIMEOUT;
    use std::time::Instant;
    /// Scheduling on a loaded 2-core machine, and the keepalive interval the kernel checks at.
    const SLACK: Duration = Duration::from_secs(5);
    in_private_network(|| async {
        let replica = Replica::start().await;
        let old = replica.client(1).await;
        old.write(0, block(1), false).await.unwrap();
        assert_eq!(replica.open_connections(), 1);

        set_loopback(false);
        let cut = Instant::now();
        let into_the_cut = tokio::time::timeout(DEAD_PEER_TIMEOUT + SLACK, old.write(4096, block(2), false))
            .await
            .expect("a request into a cut network must fail within the dead-peer bound, not hang");
        assert!(
            matches!(into_the_cut, Err(ClientError::Disconnected { .. })),
            "{into_the_cut:?}"
        );
        while replica.open_connections() != 0 {
            assert!(
                cut.elapsed() < DEAD_PEER_TIMEOUT + SLACK,
                "the replica still holds the cut controller's connection after {:?}",
                cut.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            cut.elapsed() >= DEAD_PEER_TIMEOUT - Duration::from_secs(1),
            "given up after {:?}, sooner than the bound: a short stall would drop healthy links",
            cut.elapsed()
        );

        set_loopback(true);
        let new = replica.client(2).await;
        new.write(0, block(3), false).await.unwrap();
        assert_eq!(new.read(0, 4096).await.unwrap(), block(3));
        let older = replica.client(1).await;
        assert_eq!(
            refusal(older.write(0, block(4), false).await),
            ReplyError::StaleEpoch { current: Epoch(2) }
        );
        assert_eq!(
            new.read(0, 4096).await.unwrap(),
            block(3),
            "the older controller wrote nothing"
        );
    });
}

// ------------------------------------------------------------------------------------------------
// The rebuild's questions: WrittenSince, AdoptSyncPoint, RunCrcs
// ------------------------------------------------------------------------------------------------

/// One WrittenSince answer: the replica's own position, the answer, and where it is complete.
async fn written_since(
    client: &ReplicaClient,
    since: Option<SyncPoint>,
    start_lba: u64,
) -> (SyncPoint, WrittenAnswer, u64) {
    match client
        .call(Message::WrittenSince { since, start_lba })
        .await
        .unwrap()
    {
        Message::WrittenSinceOk {
            position,
            answer,
            end_lba,
        } => (position, answer, end_lba),
        other => panic!("expected a WrittenSince answer, got {other:?}"),
    }
}

fn regions(answer: WrittenAnswer) -> Vec<BlockRun> {
    match answer {
        WrittenAnswer::Regions(runs) => runs,
        WrittenAnswer::Unknown(why) => panic!("the record must answer, but said: {why}"),
    }
}

fn unknown(answer: WrittenAnswer) -> String {
    match answer {
        WrittenAnswer::Unknown(why) => why,
        WrittenAnswer::Regions(runs) => panic!("the record must refuse to answer, but listed {runs:?}"),
    }
}

fn run(lba: u64, blocks: u64) -> BlockRun {
    BlockRun { lba, blocks }
}

/// Blocks of a 64 MiB test volume.
const VOLUME_BLOCKS: u64 = 64 * MIB / 4096;

#[tokio::test]
async fn written_since_names_the_regions_written_after_a_sync_point_and_what_is_not_yet_flushed() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    // Region 0 (blocks 0..16) is written and flushed, then an empty flush: the point is after it.
    client.write(0, block(1), false).await.unwrap();
    client.flush().await.unwrap();
    client.flush().await.unwrap();
    let (point, _, _) = written_since(&client, None, VOLUME_BLOCKS).await;
    // Region 2 (blocks 32..48) and region 100 written and flushed after the point; region 7 only written.
    client.write(32 * 4096, block(2), false).await.unwrap();
    client.write(1600 * 4096 + 8192, block(3), false).await.unwrap();
    client.flush().await.unwrap();
    client.write(7 * 16 * 4096, block(4), false).await.unwrap();

    let (position, answer, end) = written_since(&client, Some(point), 0).await;
    assert_eq!(
        regions(answer),
        vec![run(32, 16), run(112, 16), run(1600, 16)],
        "every region written after the point, whole, flushed or not; region 0 is not among them"
    );
    assert_eq!(end, VOLUME_BLOCKS, "the answer is complete");
    assert_eq!(
        position.lineage, point.lineage,
        "one replica, one flush numbering"
    );
    assert!(position.revision > point.revision);

    // About its own last flush: only what may not have been flushed.
    let (_, own, _) = written_since(&client, None, 0).await;
    assert_eq!(regions(own), vec![run(112, 16)]);
}

#[tokio::test]
async fn written_since_lists_from_the_block_asked_for_and_pages_a_long_answer() {
    // 2^16 + 2 regions apart from each other: more runs than one answer holds. Written through the store
    // (a few seconds over the wire), then served.
    const REGIONS: u64 = (1 << 16) + 2;
    let dir = tempfile::tempdir().unwrap();
    let size = REGIONS * 2 * 16 * 4096;
    let store = Arc::new(Store::create(dir.path(), VolumeId::random(), size).unwrap());
    let since = store.sync_point();
    let data = vec![7u8; 4096];
    let writes: Vec<(u64, &[u8])> = (0..REGIONS).map(|r| (r * 2 * 16 * 4096, &data[..])).collect();
    for outcome in store.write_batch(&writes) {
        outcome.unwrap();
    }
    store.flush().unwrap();
    let replica = Replica::serve(store, dir).await;
    let client = replica.client(1).await;

    let mut listed = Vec::new();
    let mut start = 0;
    let mut answers = 0;
    while start < REGIONS * 32 {
        let (_, answer, end) = written_since(&client, Some(since), start).await;
        assert!(end > start, "every answer makes progress");
        listed.extend(regions(answer));
        start = end;
        answers += 1;
    }
    assert!(answers >= 2, "the answer came in pages");
    assert_eq!(listed.len() as u64, REGIONS);
    assert!(
        listed
            .iter()
            .enumerate()
            .all(|(i, r)| *r == run(i as u64 * 32, 16)),
        "every region once, in block order, across the pages"
    );

    // A listing from the middle of a region starts there.
    let (_, answer, end) = written_since(&client, Some(since), 40).await;
    let from_40 = regions(answer);
    assert_eq!(from_40[0], run(40, 8), "clipped at the block asked for");
    assert_eq!(from_40[1], run(64, 16));
    assert!(end > 40);
}

#[tokio::test]
async fn written_since_refuses_to_answer_for_another_numbering_a_later_point_or_a_split_history() {
    let replica = Replica::start().await;
    let client = replica.client(3).await;
    client.write(0, block(1), false).await.unwrap();
    client.flush().await.unwrap();
    let (here, _, _) = written_since(&client, None, VOLUME_BLOCKS).await;
    assert_eq!(
        here.epoch,
        Epoch(3),
        "the flush was made under the connection's epoch"
    );

    let other = SyncPoint {
        lineage: here.lineage ^ 1,
        ..here
    };
    let why = unknown(written_since(&client, Some(other), 0).await.1);
    assert!(why.contains("numbering"), "{why}");
    let ahead = SyncPoint {
        revision: basalt_proto::Revision(here.revision.0 + 5),
        ..here
    };
    let why = unknown(written_since(&client, Some(ahead), 0).await.1);
    assert!(why.contains("ahead"), "{why}");
    let split = SyncPoint {
        epoch: Epoch(2),
        ..here
    };
    let why = unknown(written_since(&client, Some(split), 0).await.1);
    assert!(why.contains("split"), "{why}");
    // A refusal still says where the replica stands, and covers the whole volume.
    let (position, _, end) = written_since(&client, Some(split), 0).await;
    assert_eq!((position, end), (here, VOLUME_BLOCKS));
}

#[tokio::test]
async fn rebuild_questions_are_epoch_checked() {
    let replica = Replica::start().await;
    let client = replica.client(2).await;
    client.flush().await.unwrap();
    let (here, _, _) = written_since(&client, None, 0).await;
    let stale = replica.client(1).await;
    for question in [
        Message::WrittenSince {
            since: Some(here),
            start_lba: 0,
        },
        Message::AdoptSyncPoint {
            point: None,
            own_revision: here.revision,
        },
        Message::RunCrcs {
            runs: vec![run(0, 16)],
        },
        Message::ReadV {
            extents: vec![extent(0, 4096)],
        },
        Message::WriteV {
            extents: vec![extent(0, 4096)],
            data: block(9),
        },
    ] {
        let op = question.op().0;
        assert_eq!(
            refusal(stale.call(question).await),
            ReplyError::StaleEpoch { current: Epoch(2) },
            "{op} from an older controller"
        );
    }
    let (after, _, _) = written_since(&client, None, 0).await;
    assert_eq!(after, here, "the stale AdoptSyncPoint changed nothing");
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(0),
        "nor the stale WriteV"
    );
}

#[tokio::test]
async fn adopt_sync_point_puts_a_replica_on_the_sources_numbering_or_takes_it_off_any() {
    // Two replicas of one volume, flushed a different number of times: separate numberings.
    let source = Replica::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), source.volume, 64 * MIB).unwrap();
    let target = Replica::serve(Arc::new(store), dir).await;
    let (s, t) = (source.client(1).await, target.client(1).await);
    for _ in 0..3 {
        s.flush().await.unwrap();
    }
    let at_source = s.flush().await.unwrap();
    let at_target = t.flush().await.unwrap();
    let (point, _, _) = written_since(&s, None, 0).await;
    assert_eq!(point.revision, at_source);
    let (target_before, _, _) = written_since(&t, None, 0).await;
    let why = unknown(written_since(&s, Some(target_before), 0).await.1);
    assert!(why.contains("numbering"), "{why}");

    // The target's flush `at_target` is the source's `at_source`.
    let adopted = match t
        .call(Message::AdoptSyncPoint {
            point: Some(point),
            own_revision: at_target,
        })
        .await
        .unwrap()
    {
        Message::AdoptSyncPointOk { position } => position,
        other => panic!("expected AdoptSyncPointOk, got {other:?}"),
    };
    assert_eq!(adopted, point, "the target now stands where the source does");
    // Both write the same block and flush: the next flushes are numbered alike, and the source's record
    // answers about the target.
    s.write(48 * 4096, block(5), false).await.unwrap();
    t.write(48 * 4096, block(5), false).await.unwrap();
    assert_eq!(s.flush().await.unwrap(), t.flush().await.unwrap());
    let (_, answer, _) = written_since(&s, Some(adopted), 0).await;
    assert_eq!(regions(answer), vec![run(48, 16)]);

    // Off any numbering (a rebuild is about to copy onto it): nobody's record answers for it any more.
    match t
        .call(Message::AdoptSyncPoint {
            point: None,
            own_revision: basalt_proto::Revision(0),
        })
        .await
        .unwrap()
    {
        Message::AdoptSyncPointOk { position } => assert_ne!(position.lineage, point.lineage),
        other => panic!("expected AdoptSyncPointOk, got {other:?}"),
    }
    let (off, _, _) = written_since(&t, None, 0).await;
    let why = unknown(written_since(&s, Some(off), 0).await.1);
    assert!(why.contains("numbering"), "{why}");
    let why = unknown(written_since(&t, Some(point), 0).await.1);
    assert!(
        why.contains("numbering"),
        "its own record no longer answers for the old point: {why}"
    );
}

#[tokio::test]
async fn adopt_sync_point_refuses_a_revision_the_replica_never_made() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    let revision = client.flush().await.unwrap();
    let (here, _, _) = written_since(&client, None, 0).await;
    let refused = client
        .call(Message::AdoptSyncPoint {
            point: Some(here),
            own_revision: basalt_proto::Revision(revision.0 + 100),
        })
        .await;
    match refused {
        Err(ClientError::Replica { error, message, .. }) => {
            assert_eq!(error, ReplyError::BadRequest);
            assert!(message.contains("not one of this replica's"), "{message}");
        }
        other => panic!("expected a BadRequest refusal, got {other:?}"),
    }
    client.write(0, block(1), false).await.unwrap();
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(1),
        "the replica still serves"
    );
}

#[tokio::test]
async fn a_written_since_with_a_cut_short_sync_point_closes_only_its_connection() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    // A WrittenSince frame whose payload is 23 bytes, not a 24-byte sync point, with a valid CRC (over
    // header bytes 0..48, then the payload): only its content is wrong.
    let point = SyncPoint {
        lineage: 1,
        revision: basalt_proto::Revision(1),
        epoch: Epoch(1),
    };
    let mut bytes = encoded(Frame::new(
        RequestId(2),
        Epoch(1),
        Message::WrittenSince {
            since: Some(point),
            start_lba: 0,
        },
    ));
    bytes.truncate(bytes.len() - 1);
    let payload_len = (bytes.len() - HEADER_LEN) as u32;
    bytes[44..48].copy_from_slice(&payload_len.to_le_bytes());
    let crc = crc32fast::hash(&[&bytes[..48], &bytes[HEADER_LEN..]].concat());
    bytes[48..52].copy_from_slice(&crc.to_le_bytes());
    assert!(
        server_closes_after(&replica, &bytes).await,
        "a malformed rebuild question closes its connection"
    );
    client.ping().await.expect("other connections are served on");
    let (position, _, _) = written_since(&client, None, 0).await;
    assert_eq!(position.epoch, Epoch(0), "nothing was flushed under any epoch");
}

#[tokio::test]
async fn run_crcs_lists_the_allocated_blocks_of_many_runs_in_one_request() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    for lba in [0u64, 1, 5, 40, 41, 300, 9000] {
        client.write(lba * 4096, block(lba as u8), false).await.unwrap();
    }
    client.unmap(41 * 4096, 4096).await.unwrap();
    let reply = client
        .call(Message::RunCrcs {
            runs: vec![run(0, 2), run(4, 36), run(40, 16), run(9000, 16)],
        })
        .await
        .unwrap();
    let crc = |b: u8| crc32fast::hash(&[b; 4096]);
    assert_eq!(
        reply,
        Message::RunCrcsOk {
            crcs: vec![
                BlockCrc { lba: 0, crc: crc(0) },
                BlockCrc { lba: 1, crc: crc(1) },
                BlockCrc { lba: 5, crc: crc(5) },
                BlockCrc {
                    lba: 40,
                    crc: crc(40)
                },
                BlockCrc {
                    lba: 9000,
                    crc: crc((9000 % 256) as u8)
                },
            ],
            end_lba: 9016,
        },
        "data blocks inside the runs only: not block 300 (outside), not block 41 (discarded)"
    );
    // The same as one BlockCrcs per run.
    let mut one_by_one = Vec::new();
    for r in [run(0, 2), run(4, 36), run(40, 16), run(9000, 16)] {
        match client
            .call(Message::BlockCrcs {
                start_lba: r.lba,
                count: r.blocks,
            })
            .await
            .unwrap()
        {
            Message::BlockCrcsOk(page) => one_by_one.extend(page),
            other => panic!("{other:?}"),
        }
    }
    let Message::RunCrcsOk { crcs, .. } = reply else {
        unreachable!()
    };
    assert_eq!(crcs, one_by_one);
}

#[tokio::test]
async fn run_crcs_refuses_runs_out_of_order_overlapping_empty_too_many_or_past_the_end() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    let cases: Vec<(Vec<BlockRun>, ReplyError, &str)> = vec![
        (
            vec![run(32, 16), run(0, 16)],
            ReplyError::BadRequest,
            "block order",
        ),
        (
            vec![run(0, 16), run(8, 16)],
            ReplyError::BadRequest,
            "block order",
        ),
        (vec![run(0, 16), run(16, 0)], ReplyError::BadRequest, "empty"),
        (
            vec![run(VOLUME_BLOCKS - 8, 16)],
            ReplyError::OutOfRange { size_bytes: 64 * MIB },
            "past the volume",
        ),
        (
            vec![run(u64::MAX - 1, 4)],
            ReplyError::OutOfRange { size_bytes: 64 * MIB },
            "past the volume",
        ),
        (
            (0..=MAX_CRC_RUNS as u64).map(|i| run(i, 1)).collect(),
            ReplyError::BadRequest,
            "at most",
        ),
    ];
    for (runs, want, says) in cases {
        match client.call(Message::RunCrcs { runs: runs.clone() }).await {
            Err(ClientError::Replica { error, message, .. }) => {
                assert_eq!(error, want, "{message}");
                assert!(message.contains(says), "{message:?} should say {says:?}");
            }
            other => panic!("runs {:?}..: expected a refusal, got {other:?}", &runs[..1]),
        }
    }
    client.write(0, block(1), false).await.unwrap();
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(1),
        "the connection stays usable"
    );
}

#[tokio::test]
async fn a_dropped_client_closes_its_connection() {
    // A rebuild opens clients to its source and target and drops them when it ends: each must leave
    // nothing open behind it, or every rebuild leaks a connection on both replicas.
    let replica = Replica::start().await;
    for round in 0..5 {
        let client = replica.client(1).await;
        client.flush().await.unwrap();
        drop(client.write(0, block(round), false));
        drop(client);
        let start = std::time::Instant::now();
        while replica.open_connections() != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "round {round}: the replica still holds {} connection(s) of dropped clients",
                replica.open_connections()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// Vectored reads and writes: a rebuild's copy of many scattered blocks

fn extent(offset: u64, len: u32) -> Extent {
    Extent { offset, len }
}

async fn read_v(client: &ReplicaClient, extents: &[Extent]) -> Result<Bytes, ClientError> {
    match client
        .call(Message::ReadV {
            extents: extents.to_vec(),
        })
        .await?
    {
        Message::ReadVOk { data } => Ok(data),
        other => panic!("ReadV answered with {other:?}"),
    }
}

async fn write_v(client: &ReplicaClient, extents: &[Extent], data: Bytes) -> Result<(), ClientError> {
    match client
        .call(Message::WriteV {
            extents: extents.to_vec(),
            data,
        })
        .await?
    {
        Message::WriteVOk => Ok(()),
        other => panic!("WriteV answered with {other:?}"),
    }
}

/// `len` bytes of a pattern that differs at every block and every sector.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 512) as u8)).collect()
}

#[tokio::test]
async fn read_v_answers_the_extents_concatenated_in_order_cached_or_not() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    let data = Bytes::from(pattern(1, 512 * 4096));
    for chunk in 0..2 {
        let at = chunk * MIB as usize;
        client
            .write(at as u64, data.slice(at..at + MIB as usize), false)
            .await
            .unwrap();
    }
    let expected = |extents: &[Extent]| -> Vec<u8> {
        extents
            .iter()
            .flat_map(|e| data[e.offset as usize..e.end().unwrap() as usize].to_vec())
            .collect()
    };
    // Small enough to be answered on the reader task from the page cache:
    // whole blocks, a sector inside a block, and a never-written block (zeros).
    let small = [
        extent(0, 4096),
        extent(7 * 4096 + 512, 1024),
        extent(100 * 4096, 8192),
        extent(8 * MIB, 4096),
    ];
    let mut want = expected(&small[..3]);
    want.extend_from_slice(&[0; 4096]);
    assert_eq!(read_v(&client, &small).await.unwrap(), want);
    // 256 scattered blocks (1 MiB): read on the blocking pool.
    let scattered: Vec<Extent> = (0..256).map(|i| extent(i * 2 * 4096, 4096)).collect();
    assert_eq!(read_v(&client, &scattered).await.unwrap(), expected(&scattered));
}

#[tokio::test]
async fn write_v_writes_each_extent_and_nothing_between_them() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    client
        .write(0, Bytes::from(vec![0xEE; 64 * 4096]), false)
        .await
        .unwrap();
    let extents = [
        extent(4096, 4096),
        extent(3 * 4096, 8192),
        extent(40 * 4096 + 512, 512),
    ];
    let data = Bytes::from(pattern(7, 4096 + 8192 + 512));
    write_v(&client, &extents, data.clone()).await.unwrap();
    let mut want = vec![0xEE; 64 * 4096];
    let mut at = 0;
    for e in &extents {
        let (from, n) = (e.offset as usize, e.len as usize);
        want[from..from + n].copy_from_slice(&data[at..at + n]);
        at += n;
    }
    assert_eq!(client.read(0, 64 * 4096).await.unwrap(), want);
    assert_eq!(
        read_v(&client, &extents).await.unwrap(),
        data,
        "and reads back as written"
    );
}

#[tokio::test]
async fn a_write_v_is_ordered_with_the_writes_around_it() {
    // The copy's write reaches the target after guest writes sent before it and before those sent
    // after it, however the replica batches them.
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    // Each request is queued for the socket when it is called, in this order.
    let before = client.write(0, block(1), false);
    let copy = client.call(Message::WriteV {
        extents: vec![extent(0, 4096), extent(8192, 4096)],
        data: Bytes::from(vec![2; 8192]),
    });
    let after = client.write(8192, block(3), false);
    let (before, copy, after) = tokio::join!(before, copy, after);
    before.unwrap();
    assert_eq!(copy.unwrap(), Message::WriteVOk);
    after.unwrap();
    assert_eq!(client.read(0, 4096).await.unwrap(), block(2));
    assert_eq!(client.read(8192, 4096).await.unwrap(), block(3));
}

#[tokio::test]
async fn read_v_reports_a_corrupt_block_by_its_lba_like_read() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    for lba in [2u64, 5, 9] {
        client.write(lba * 4096, block(lba as u8), false).await.unwrap();
    }
    client.flush().await.unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(replica._dir.path().join("layer-00000001.data"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x43], 5 * 4096 + 100).unwrap();
    let corrupt = [
        extent(2 * 4096, 4096),
        extent(5 * 4096, 4096),
        extent(9 * 4096, 4096),
    ];
    assert_eq!(
        refusal(read_v(&client, &corrupt).await.map(|data| data.len())),
        ReplyError::ChecksumMismatch { lba: 5 }
    );
    assert_eq!(
        refusal(client.read(5 * 4096, 4096).await),
        ReplyError::ChecksumMismatch { lba: 5 },
        "the same answer as a Read's"
    );
    // Large enough for the blocking pool: the same answer.
    let mut large: Vec<Extent> = (0..8).map(|lba| extent(lba * 4096, 4096)).collect();
    large.extend((0..32).map(|i| extent((100 + i * 2) * 4096, 4096)));
    assert_eq!(
        refusal(read_v(&client, &large).await.map(|data| data.len())),
        ReplyError::ChecksumMismatch { lba: 5 }
    );
    assert_eq!(
        read_v(&client, &[extent(9 * 4096, 4096)]).await.unwrap(),
        block(9)
    );
}

#[tokio::test]
async fn vectored_requests_outside_the_volume_are_refused_and_a_refused_write_v_writes_nothing() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    let past = [extent(0, 4096), extent(64 * MIB - 4096, 8192)];
    assert_eq!(
        refusal(read_v(&client, &past).await),
        ReplyError::OutOfRange { size_bytes: 64 * MIB }
    );
    assert_eq!(
        refusal(read_v(&client, &[extent(100, 512)]).await),
        ReplyError::Unaligned { alignment: 512 }
    );
    assert_eq!(
        refusal(write_v(&client, &past, Bytes::from(vec![1; 3 * 4096])).await),
        ReplyError::OutOfRange { size_bytes: 64 * MIB }
    );
    assert_eq!(
        refusal(
            write_v(
                &client,
                &[extent(0, 4096), extent(8192, 1000)],
                Bytes::from(vec![1; 5096])
            )
            .await
        ),
        ReplyError::Unaligned { alignment: 512 }
    );
    assert_eq!(
        client.read(0, 4096).await.unwrap(),
        block(0),
        "the first extent of a refused WriteV was not written"
    );
}

// ---------------------------------------------------------------------------------------------------
// Authentication: only a client that knows the volume's secret is served, and the replica proves the
// same to the client.
// ---------------------------------------------------------------------------------------------------

/// Whether the replica closed `raw` (EOF or a reset) within a few seconds.
async fn closed(raw: &mut Framed<TcpStream, FrameCodec>) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), raw.next()).await,
        Ok(None) | Ok(Some(Err(_)))
    )
}

#[tokio::test]
async fn a_client_with_the_wrong_secret_is_refused_and_its_connection_closed() {
    let replica = Replica::start().await;
    let controller = replica.client(1).await;
    controller.write(0, block(1), true).await.unwrap();

    let (mut raw, reply) = replica.hello_and_auth(1, &wrong_secret()).await;
    let Message::Failed { error, message, .. } = reply.message else {
        panic!("expected a refusal, got {reply:?}");
    };
    assert_eq!(error, ReplyError::AuthFailed);
    assert!(
        message.contains("could not prove it knows the volume's secret") && message.contains("--secret-file"),
        "{message}"
    );
    assert!(
        !message.contains("server-protocol-test-secret"),
        "the secret is never shown"
    );
    assert!(closed(&mut raw).await, "the refused connection is closed");

    controller.ping().await.unwrap();
    assert_eq!(controller.read(0, 4096).await.unwrap(), block(1));
}

#[tokio::test]
async fn a_client_that_skips_auth_cannot_write_or_raise_the_epoch() {
    let replica = Replica::start().await;
    let controller = replica.client(1).await;
    controller.write(0, block(1), true).await.unwrap();
    // A snapshot the clone ops below could read or hold, were they served.
    controller.snapshot_create("gold").await.unwrap();

    let mut raw = replica.raw().await;
    let hello = Message::Hello {
        volume: replica.volume,
        min_version: ProtocolVersion::MIN_SUPPORTED,
        max_version: ProtocolVersion::CURRENT,
        writer: true,
        nonce: Nonce::random(),
    };
    raw.send(Frame::new(RequestId(1), Epoch(9), hello)).await.unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert!(matches!(reply.message, Message::HelloOk { .. }), "{reply:?}");
    for (id, request) in [
        (
            2,
            Message::Write {
                offset: 0,
                data: block(0xee),
                fua: true,
            },
        ),
        (3, Message::SetEpoch),
        (4, Message::Read { offset: 0, len: 4096 }),
        (5, Message::Ping),
        (
            6,
            Message::Resize {
                size_bytes: 96 * MIB,
                check_only: false,
            },
        ),
        (
            7,
            Message::SnapshotRuns {
                snapshot: "gold".into(),
                start_lba: 0,
                count: 16,
            },
        ),
        (
            8,
            Message::ReadSnapshot {
                snapshot: "gold".into(),
                offset: 0,
                len: 4096,
            },
        ),
        (
            9,
            Message::SnapshotHold {
                snapshot: "gold".into(),
                holder: "intruder".into(),
            },
        ),
        (
            10,
            Message::SnapshotRelease {
                snapshot: "gold".into(),
                holder: "intruder".into(),
            },
        ),
        (11, Message::HoldList),
    ] {
        raw.send(Frame::new(RequestId(id), Epoch(9), request))
            .await
            .unwrap();
        let reply = raw.next().await.unwrap().unwrap();
        assert!(
            matches!(
                reply.message,
                Message::Failed {
                    error: ReplyError::NotAuthenticated,
                    ..
                }
            ),
            "request {id}: {reply:?}"
        );
    }
    // Nothing happened: the controller's epoch and writer role are intact, and so are the data, the
    // size and the snapshot (held by nobody).
    controller.write(4096, block(2), true).await.unwrap();
    assert_eq!(controller.read(0, 4096).await.unwrap(), block(1));
    assert_eq!(controller.info().await.unwrap().size_bytes, 64 * MIB);
    match controller.call(Message::HoldList).await.unwrap() {
        Message::HoldListOk(holds) => assert!(holds.is_empty(), "{holds:?}"),
        other => panic!("HoldList answered {other:?}"),
    }
}

#[tokio::test]
async fn an_unauthenticated_hello_of_a_higher_epoch_neither_fences_nor_disturbs_the_controller() {
    let replica = Replica::start().await;
    let controller = replica.client(1).await;
    let writes: Vec<_> = (0..64u64)
        .map(|i| controller.write(i * 4096, block(i as u8 + 1), false))
        .collect();
    // An intruder without the secret says Hello as a writer of a much higher epoch, mid-I/O.
    let (mut raw, reply) = replica.hello_and_auth(1000, &wrong_secret()).await;
    assert!(
        matches!(
            reply.message,
            Message::Failed {
                error: ReplyError::AuthFailed,
                ..
            }
        ),
        "{reply:?}"
    );
    assert!(closed(&mut raw).await);
    for w in writes {
        w.await.expect("the controller's I/O goes on");
    }
    controller
        .flush()
        .await
        .expect("not fenced: the epoch was not raised");
    controller
        .write(0, block(0x42), true)
        .await
        .expect("still the writer: the intruder did not take the role");
    let probe = ReplicaClient::connect(replica.addr, VolumeId(uuid::Uuid::nil()), Epoch(0), &secret())
        .await
        .unwrap();
    assert_eq!(
        probe.identity().epoch,
        Epoch(1),
        "the replica's epoch is unchanged"
    );
}

#[tokio::test]
async fn auth_before_hello_is_refused() {
    let replica = Replica::start().await;
    let mut raw = replica.raw().await;
    let proof = basalt_proto::auth::Proof([7; 32]);
    raw.send(Frame::new(RequestId(1), Epoch(1), Message::Auth { proof }))
        .await
        .unwrap();
    let reply = raw.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Failed {
                op: Op::Auth,
                error: ReplyError::NotAuthenticated,
                ..
            }
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_replayed_hello_and_auth_are_refused() {
    let replica = Replica::start().await;
    // A genuine exchange, recorded frame by frame.
    let nonce = Nonce::random();
    let hello = Frame::new(
        RequestId(1),
        Epoch(2),
        Message::Hello {
            volume: replica.volume,
            min_version: ProtocolVersion::MIN_SUPPORTED,
            max_version: ProtocolVersion::CURRENT,
            writer: true,
            nonce,
        },
    );
    let mut genuine = replica.raw().await;
    genuine.send(hello.clone()).await.unwrap();
    let Message::HelloOk {
        volume,
        nonce: theirs,
        ..
    } = genuine.next().await.unwrap().unwrap().message
    else {
        panic!("expected HelloOk");
    };
    let proof = Challenge {
        volume,
        client: nonce,
        replica: theirs,
    }
    .prove(&secret(), Prover::Client);
    let auth = Frame::new(RequestId(2), Epoch(2), Message::Auth { proof });
    genuine.send(auth.clone()).await.unwrap();
    let reply = genuine.next().await.unwrap().unwrap();
    assert!(matches!(reply.message, Message::AuthOk { .. }), "{reply:?}");
    drop(genuine);

    // The same frames on a new connection: the replica picked a new nonce, so the old proof is worthless.
    let mut replay = replica.raw().await;
    replay.send(hello).await.unwrap();
    let reply = replay.next().await.unwrap().unwrap();
    assert!(matches!(reply.message, Message::HelloOk { .. }), "{reply:?}");
    replay.send(auth).await.unwrap();
    let reply = replay.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message,
            Message::Failed {
                error: ReplyError::AuthFailed,
                ..
            }
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_replica_that_cannot_prove_the_secret_is_refused_by_the_client() {
    let replica = Replica::start().await;
    // The client holds another secret than the replica: the replica's proof does not check out, and the
    // client stops before it sends anything the replica would act on.
    let refused = ReplicaClient::connect(replica.addr, replica.volume, Epoch(5), &wrong_secret()).await;
    match refused {
        Err(ClientError::Handshake(HandshakeError::ReplicaNotProven)) => {}
        Err(other) => panic!("expected the replica's proof to fail, got {other}"),
        Ok(_) => panic!("a replica with another secret was accepted"),
    }
    let probe = replica.client(0).await;
    assert_eq!(
        probe.identity().epoch,
        Epoch(0),
        "the refused Hello raised nothing"
    );
}

#[tokio::test]
async fn set_membership_is_durable_refuses_older_generations_and_is_reported_at_auth() {
    use basalt_proto::pb::replica::Membership;
    let replica = Replica::start().await;
    let controller = replica.client(3).await;
    assert_eq!(controller.membership(), None, "a new replica records none");
    let members = |generation| Membership {
        generation,
        members: vec!["10.0.0.1:7100".into(), "10.0.0.2:7100".into()],
        epoch: 3,
    };
    controller.set_membership(members(2)).await.unwrap();
    assert_eq!(
        refusal(controller.set_membership(members(1)).await),
        ReplyError::StaleMembership { current: 2 }
    );
    // Every authenticated client learns it, a reader too; only the writer may change it.
    let reader = ReplicaClient::connect_as(replica.addr, replica.volume, Epoch(3), false, &secret())
        .await
        .unwrap();
    assert_eq!(reader.membership(), Some(&members(2)));
    let newer = replica.client(3).await;
    assert_eq!(
        refusal(controller.set_membership(members(3)).await),
        ReplyError::Superseded
    );
    newer.set_membership(members(3)).await.unwrap();
    drop((controller, newer, reader));

    // Durable: a restarted replica reports it.
    replica.shutdown.cancel();
    replica.task.await.unwrap().unwrap();
    let store = Arc::new(Store::open(replica._dir.path()).unwrap());
    assert_eq!(store.membership().map(|m| m.generation), Some(3));
}

async fn resize(client: &ReplicaClient, size_bytes: u64, check_only: bool) -> Result<u64, ClientError> {
    match client
        .call(Message::Resize {
            size_bytes,
            check_only,
        })
        .await?
    {
        Message::ResizeOk { size_bytes } => Ok(size_bytes),
        other => panic!("a resize answered with {other:?}"),
    }
}

#[tokio::test]
async fn a_resize_grows_the_replica_durably_is_idempotent_and_refuses_a_shrink() {
    let replica = Replica::start().await;
    let client = replica.client(1).await;
    client.write(64 * MIB - 4096, block(1), false).await.unwrap();
    assert_eq!(
        refusal(client.write(64 * MIB, block(2), false).await),
        ReplyError::OutOfRange { size_bytes: 64 * MIB }
    );
    // A check answers the current size and changes nothing.
    assert_eq!(resize(&client, 96 * MIB, true).await.unwrap(), 64 * MIB);
    assert_eq!(client.info().await.unwrap().size_bytes, 64 * MIB);
    assert_eq!(
        refusal(resize(&client, 32 * MIB, true).await),
        ReplyError::ShrinkRefused { size_bytes: 64 * MIB }
    );

    assert_eq!(resize(&client, 96 * MIB, false).await.unwrap(), 96 * MIB);
    // Retried (the controller lost the answer): the same size again is fine.
    assert_eq!(resize(&client, 96 * MIB, false).await.unwrap(), 96 * MIB);
    client.write(64 * MIB, block(2), false).await.unwrap();
    assert_eq!(client.read(64 * MIB, 4096).await.unwrap(), block(2));
    assert_eq!(client.read(64 * MIB - 4096, 4096).await.unwrap(), block(1));
    assert_eq!(
        refusal(resize(&client, 64 * MIB, false).await),
        ReplyError::ShrinkRefused { size_bytes: 96 * MIB }
    );
    assert_eq!(
        refusal(resize(&client, 96 * MIB + 512, false).await),
        ReplyError::BadRequest
    );
    assert!(matches!(
        refusal(resize(&client, u64::MAX - 4095, false).await),
        ReplyError::TooLarge { .. }
    ));
    // A new connection's Hello reports the new size.
    let again = replica.client(1).await;
    assert_eq!(again.identity().size_bytes, 96 * MIB);
}

#[tokio::test]
async fn a_resize_is_fenced_by_the_epoch_and_the_writer_role() {
    let replica = Replica::start().await;
    let old = replica.client(1).await;
    let _newer = replica.client(2).await;
    assert!(matches!(
        refusal(resize(&old, 96 * MIB, false).await),
        ReplyError::StaleEpoch { .. }
    ));
    let superseded = replica.client(2).await;
    let writer = replica.client(2).await;
    assert_eq!(
        refusal(resize(&superseded, 96 * MIB, false).await),
        ReplyError::Superseded
    );
    // A check changes nothing, so any connection at the epoch may ask.
    assert_eq!(resize(&superseded, 96 * MIB, true).await.unwrap(), 64 * MIB);
    assert_eq!(writer.info().await.unwrap().size_bytes, 64 * MIB);
}
