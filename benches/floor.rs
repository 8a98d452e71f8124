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
//!
//! Every case runs twice: with processes that sleep in a blocking `read` until their message arrives, and with
//! processes that poll for it (a non-blocking `read`, then `sched_yield`, again and again), as Basalt's
//! data-path processes do while their volume is busy (`basalt_poll`). On a virtual machine the difference is
//! the cost of waking a process on another vCPU.

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
/// Set (to anything) for a peer that polls for its requests instead of sleeping.
const POLL_ENV: &str = "BASALT_FLOOR_POLL";

/// How a process waits for its next message.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    /// A blocking `read`: the process sleeps, and the sender's write wakes it.
    Sleep,
    /// Non-blocking `read`s with a `sched_yield` between them: the process stays awake.
    Poll,
}

fn main() {
    if let Ok(mode) = std::env::var(PEER_ENV) {
        let wait = if std::env::var_os(POLL_ENV).is_some() {
            Wait::Poll
        } else {
            Wait::Sleep
        };
        peer(mode == "pwrite", wait);
        return;
    }
    // cargo bench passes `--bench`; a filter may follow. Nothing to filter here.
    let dir = tempfile::tempdir().expect("a temp dir");
    println!(
        "{:<36} {:>8} {:>8} {:>8} {:>9}",
        "case", "mean µs", "p50 µs", "p99 µs", "ops"
    );
    for (wait, how) in [(Wait::Sleep, "sleeping"), (Wait::Poll, "polling")] {
        let (mut one, _c1) = peers(1, false, wait);
        report(&format!("round trip, {how}"), &mut one, wait);
        let (mut one_w, _c2) = peers(1, true, wait);
        report(&format!("round trip + pwrite, {how}"), &mut one_w, wait);
        let (mut three, _c3) = peers(3, true, wait);
        report(&format!("fan-out to 3 + pwrite, {how}"), &mut three, wait);
    }
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

/// Starts `n` peer processes that wait for requests as `wait` says and connects to each.
fn peers(n: usize, pwrite: bool, wait: Wait) -> (Vec<TcpStream>, Vec<Child>) {
    let exe = std::env::current_exe().expect("this binary's path");
    let mut streams = Vec::new();
    let mut children = Vec::new();
    for _ in 0..n {
        let mut command = Command::new(&exe);
        command.env(PEER_ENV, if pwrite { "pwrite" } else { "echo" });
        if wait == Wait::Poll {
            command.env(POLL_ENV, "1");
        }
        let mut child = command.stdout(Stdio::piped()).spawn().expect("start a peer");
        let mut port = String::new();
        let mut out = child.stdout.take().expect("piped stdout");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).expect("the peer's port") == 1 && byte[0] != b'\n' {
            port.push(byte[0] as char);
        }
        let stream =
            TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("a port number"))).expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream.set_nonblocking(wait == Wait::Poll).expect("O_NONBLOCK");
        streams.push(stream);
        children.push(child);
    }
    (streams, children)
}

/// Round trips to every stream at once (sent to all, then every reply read) for [`RUN`].
fn report(name: &str, streams: &mut [TcpStream], wait: Wait) {
    let request = vec![0xa5u8; REQUEST];
    let mut reply = [0u8; REPLY];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let t = Instant::now();
        for s in streams.iter_mut() {
            write_all(s, &request, wait).expect("send");
        }
        for s in streams.iter_mut() {
            read_exact(s, &mut reply, wait).expect("reply");
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
        "{name:<36} {mean:>8.1} {:>8.1} {:>8.1} {:>9}",
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
fn peer(pwrite: bool, wait: Wait) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = pwrite.then(|| prefilled(&dir.path().join("data")));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("{}", listener.local_addr().expect("local address").port());
    std::io::stdout().flush().expect("flush stdout");
    let (mut stream, _) = listener.accept().expect("accept");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream.set_nonblocking(wait == Wait::Poll).expect("O_NONBLOCK");
    let mut request = vec![0u8; REQUEST];
    let reply = [0u8; REPLY];
    let mut n = 0u64;
    while read_exact(&mut stream, &mut request, wait).is_ok() {
        if let Some(file) = &file {
            let offset = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (FILE_SIZE / 4096)) * 4096;
            file.write_all_at(&request[52..], offset).expect("pwrite");
        }
        n += 1;
        if write_all(&mut stream, &reply, wait).is_err() {
            break;
        }
    }
}

/// `read_exact`, sleeping in `read` or polling (see [`Wait`]; the socket is non-blocking when polling).
fn read_exact(s: &mut TcpStream, buf: &mut [u8], wait: Wait) -> std::io::Result<()> {
    match wait {
        Wait::Sleep => s.read_exact(buf),
        Wait::Poll => polled(buf.len(), std::io::ErrorKind::UnexpectedEof, |at| {
            s.read(&mut buf[at..])
        }),
    }
}

/// `write_all`, the same way (a full send buffer is waited out by polling too).
fn write_all(s: &mut TcpStream, buf: &[u8], wait: Wait) -> std::io::Result<()> {
    match wait {
        Wait::Sleep => s.write_all(buf),
        Wait::Poll => polled(buf.len(), std::io::ErrorKind::WriteZero, |at| s.write(&buf[at..])),
    }
}

/// Moves `len` bytes with `op` (given how many are done) on a non-blocking socket, yielding the CPU whenever
/// the socket is not ready; `op` moving nothing is the error `zero`.
fn polled(
    len: usize,
    zero: std::io::ErrorKind,
    mut op: impl FnMut(usize) -> std::io::Result<usize>,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        match op(done) {
            Ok(0) => return Err(zero.into()),
            Ok(n) => done += n,
            // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => unsafe {
                libc::sched_yield();
            },
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
