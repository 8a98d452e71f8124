//! A TCP proxy the test controls, between a controller and one replica: the "network" of the fault harness.
//!
//! ```text
//!   controller ──► proxy (127.0.0.1:<free>) ──► replica
//!                    │
//!                    └─ Link::Up         bytes flow both ways
//!                       Link::Cut        every connection is reset and new ones are closed at once
//!                                        (a partition long enough for TCP to give up, or a severed link)
//!                       Link::Blackhole  connections stay open but no byte moves in either direction;
//!                                        on Up they flow again (a short partition: TCP would retransmit)
//! ```
//!
//! The controller is started with the proxies' addresses instead of the replicas', so the harness can cut a
//! replica off without touching either process. Each connection is two copy loops that watch the link state;
//! the bytes are moved through one reused buffer per direction.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of the simulated network link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Up,
    Cut,
    Blackhole,
}

/// A running proxy; dropping it stops accepting and tears down every connection.
pub struct Proxy {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    link: watch::Sender<Link>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Copy loops end when they see the sender gone.
        let _ = self.link.send(Link::Cut);
    }
}

impl Proxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let (link, watcher) = watch::channel(Link::Up);
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((downstream, _)) = listener.accept().await else {
                    continue;
                };
                if *watcher.borrow() == Link::Cut {
                    // Refused: the controller sees the connection close at once.
                    drop(downstream);
                    continue;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(pump_connection(downstream, upstream, watcher.clone()));
            }
        });
        Ok(Proxy {
            listen,
            upstream,
            link,
            connections,
            accept,
        })
    }

    /// Changes the link state; existing connections follow at once.
    pub fn set(&self, link: Link) {
        let _ = self.link.send(link);
    }

    pub fn link(&self) -> Link {
        *self.link.borrow()
    }

    /// How many connections the proxy has accepted and forwarded.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

async fn pump_connection(downstream: TcpStream, upstream: SocketAddr, link: watch::Receiver<Link>) {
    let Ok(upstream) = TcpStream::connect(upstream).await else {
        // The replica is down: the controller sees a closed connection, as it would without the proxy.
        return;
    };
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // SO_LINGER 0 so that dropping a socket on Cut sends a RST, like a severed link, not a polite FIN.
    for s in [&downstream, &upstream] {
        let _ = s.set_zero_linger();
    }
    let (down_rd, down_wr) = downstream.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    // When either direction ends, both sockets close (the other task is aborted and drops its halves).
    let mut to_replica = tokio::spawn(pump(down_rd, up_wr, link.clone()));
    let mut to_controller = tokio::spawn(pump(up_rd, down_wr, link));
    tokio::select! {
        _ = &mut to_replica => to_controller.abort(),
        _ = &mut to_controller => to_replica.abort(),
    }
}

/// Copies one direction while the link is up; holds still while it is blackholed; returns when it is cut,
/// the proxy is dropped, or either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let state = *link.borrow_and_update();
        match state {
            Link::Cut => return,
            Link::Blackhole => {
                if link.changed().await.is_err() {
                    return;
                }
            }
            Link::Up => {
                tokio::select! {
                    changed = link.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    n = from.read(&mut buf) => {
                        let n = match n {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // A write in progress finishes even if the link changes meanwhile: those bytes
                        // were already "on the wire".
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}
