//! # Dead-peer detection: both ends of a data-path connection
//!
//! A cut network (a container disconnected from its network, a host that
//! lost power) sends neither FIN nor RST: without help the socket of the
//! other side stays ESTABLISHED, idle forever or retransmitting for about 15
//! minutes (`tcp_retries2`). So every data-path socket, the replica's and the
//! controller's ([`detect_dead_peer`]), has TCP keepalive and
//! `TCP_USER_TIMEOUT`: the kernel closes it with `ETIMEDOUT` once the peer
//! has not answered for [`DEAD_PEER_TIMEOUT`], whether or not data was in
//! flight. A replica therefore drops a vanished controller's connection (and
//! what it held) within that bound, and a controller's pending requests to a
//! vanished replica fail within it instead of hanging.
//!
//! It lives with the protocol, not with either end, because the bound is a
//! contract between the two: each side must give up on the other within the
//! same time, and each must notice on its own.

use std::time::Duration;

use tokio::net::TcpStream;

/// Longest time a data-path peer may leave the other side without an answer
/// (data unacknowledged, or keepalive probes unanswered) before the kernel
/// closes the connection: see the module doc. Twice the controller's
/// default replica timeout (5 s), so a replica never gives up on a controller
/// that would still wait for it; short enough that a cut is over, from both
/// sides, well within the time an operator watches a reconnect.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle time before the first keepalive probe: half of [`DEAD_PEER_TIMEOUT`],
/// so an idle connection is probed several times before it is given up. One
/// 52-byte probe per idle connection every few seconds costs nothing.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// Between keepalive probes: once a second, so the timeout is noticed within
/// a second of passing.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Probes before an idle connection is given up, for kernels that ignore
/// `TCP_USER_TIMEOUT` on idle sockets: 5 s idle + 5 x 1 s = the same bound.
const KEEPALIVE_PROBES: u32 = 5;

/// Turns on dead-peer detection for a data-path socket (see the module
/// doc): keepalive probes after [`KEEPALIVE_IDLE`] of silence and
/// `TCP_USER_TIMEOUT` of [`DEAD_PEER_TIMEOUT`], after which reads and writes
/// fail with `ETIMEDOUT`. Both ends of a connection call it: each must notice
/// on its own that the other is gone.
pub fn detect_dead_peer(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let secs = |d: Duration| libc::c_int::try_from(d.as_secs()).unwrap_or(libc::c_int::MAX);
    let millis = libc::c_int::try_from(DEAD_PEER_TIMEOUT.as_millis()).unwrap_or(libc::c_int::MAX);
    let probes = libc::c_int::try_from(KEEPALIVE_PROBES).unwrap_or(libc::c_int::MAX);
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(KEEPALIVE_IDLE)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(KEEPALIVE_INTERVAL)),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, millis),
    ] {
        // SAFETY: `fd` is the open socket `stream` owns for the whole call,
        // and the option value is a c_int the kernel copies before returning.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
