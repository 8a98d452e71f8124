//! The floor under a replicated queue-depth-1 write on this machine (`benches/README.md`, "Where a QD1 write's
//! time goes"): what the hardware and the kernel charge before any Basalt code runs.
//!
//!     cargo bench -p basalt-benches --bench floor
//!
//! A replicated 4 KiB write needs at least: the initiator's command to the controller and the response back (a
//! loopback round trip carrying 4 KiB one way), the controller's request to its replicas and their replies (one
//! more round trip, to three processes at once for three replicas), and one page-cache write on each replica.
//! Each is measured here with plain blocking sockets between separate processes (this binary re-executed as an
//! echo server, so every hop is a real process wake-up, as between fio, the controller and the replicas) and a
//! plain `pwrite`:
//!
//! * `round trip`: 4,148 bytes out (a frame header and a 4 KiB block), 52 bytes back, one peer process;
//! * `round trip + pwrite`: the same, the peer `pwrite`s the 4 KiB into its file before it answers;
//! * `fan-out to 3 + pwrite`: the same request to three peer processes, done when all three answered;
//! * `pwrite 4 KiB`: one 4 KiB overwrite of a page-cache file (written in 16 KiB pieces first, as the store does).
//!
//! The floor of a 3-replica QD1 write is then `round trip` + `fan-out to 3 + pwrite` (the controller's own work
//! and fio's are on top); of a 1-replica write, `round trip` + `round trip + pwrite`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A data-path frame header (52 bytes) and one 4 KiB block: what the controller sends a replica per write.
const REQUEST: usize = 52 + 4096;
/// A reply frame: header only.
const REPLY: usize = 52;
/// Each peer's file: 64 MiB, written in [`basalt_benches::PREFILL_WRITE`] pieces like a store's data.
const FILE_SIZE: u64 = 64 << 20;
/// How long each case runs.
const RUN: Duration = Duration::from_secs(3);
/// The environment variable that turns this binary into an echo peer (its value: pwrite or not).
const PEER_ENV: &str = "BASALT_FLOOR_PEER";

fn main() {
    if let Ok(mode) = std::env::var(PEER_ENV) {
        peer(mode == "pwrite");
        return;
    }
    // cargo bench passes `--bench`; a filter may follow. Nothing to filter here.
    let dir = tempfile::tempdir().expect("a temp dir");
    println!(
        "{:<28} {:>8} {:>8} {:>8} {:>9}",
        "case", "mean µs", "p50 µs", "p99 µs", "ops"
    );
    let (mut one, _c1) = peers(1, false);
    report("round trip", &mut one);
    let (mut one_w, _c2) = peers(1, true);
    report("round trip + pwrite", &mut one_w);
    let (mut three, _c3) = peers(3, true);
    report("fan-out to 3 + pwrite", &mut three);
    let file = prefilled(&dir.path().join("pwrite"));
    let block = vec![0x5au8; 4096];
    let mut n = 0u64;
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let offset = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (FILE_SIZE / 4096)) * 4096;
        let t = Instant::now();
        file.write_all_at(&block, offset).expect("pwrite");
        samples.push(t.elapsed());
        n += 1;
    }
    print_row("pwrite 4 KiB", &mut samples);
}

/// Starts `n` peer processes and connects to each.
fn peers(n: usize, pwrite: bool) -> (Vec<TcpStream>, Vec<Child>) {
    let exe = std::env::current_exe().expect("this binary's path");
    let mut streams = Vec::new();
    let mut children = Vec::new();
    for _ in 0..n {
        let mut child = Command::new(&exe)
            .env(PEER_ENV, if pwrite { "pwrite" } else { "echo" })
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a peer");
        let mut port = String::new();
        let mut out = child.stdout.take().expect("piped stdout");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).expect("the peer's port") == 1 && byte[0] != b'\n' {
            port.push(byte[0] as char);
        }
        let stream =
            TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("a port number"))).expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        streams.push(stream);
        children.push(child);
    }
    (streams, children)
}

/// Round trips to every stream at once (sent to all, then every reply read) for [`RUN`].
fn report(name: &str, streams: &mut [TcpStream]) {
    let request = vec![0xa5u8; REQUEST];
    let mut reply = [0u8; REPLY];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let t = Instant::now();
        for s in streams.iter_mut() {
            s.write_all(&request).expect("send");
        }
        for s in streams.iter_mut() {
            s.read_exact(&mut reply).expect("reply");
        }
        samples.push(t.elapsed());
    }
    print_row(name, &mut samples);
}

fn print_row(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    let p = |q: f64| us(samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]);
    println!(
        "{name:<28} {mean:>8.1} {:>8.1} {:>8.1} {:>9}",
        p(0.5),
        p(0.99),
        samples.len()
    );
}

/// A file of [`FILE_SIZE`] written in the store's pieces, so that a 4 KiB overwrite costs what it costs a store.
fn prefilled(path: &std::path::Path) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create the peer's file");
    let fill = vec![0x11u8; basalt_benches::PREFILL_WRITE];
    for offset in (0..FILE_SIZE).step_by(fill.len()) {
        file.write_all_at(&fill, offset).expect("prefill");
    }
    file
}

/// The echo peer: prints its port, then answers every request of its one connection with a reply, after
/// writing the request's block into its file if `pwrite`.
fn peer(pwrite: bool) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = pwrite.then(|| prefilled(&dir.path().join("data")));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("{}", listener.local_addr().expect("local address").port());
    std::io::stdout().flush().expect("flush stdout");
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut request = vec![0u8; REQUEST];
    let reply = [0u8; REPLY];
    let mut n = 0u64;
    while stream.read_exact(&mut request).is_ok() {
        if let Some(file) = &file {
            let offset = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (FILE_SIZE / 4096)) * 4096;
            file.write_all_at(&request[52..], offset).expect("pwrite");
        }
        n += 1;
        if stream.write_all(&reply).is_err() {
            break;
        }
    }
}
