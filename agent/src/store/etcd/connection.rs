//! Reaching an etcd cluster: one gRPC channel at a time to one of its members, moved to the next
//! member when the current one stops answering, and the rules for retrying a call there.
//!
//! Why not tonic's load-balanced channel over every endpoint: a member cut off from the others
//! still accepts connections and then answers nothing (or "no leader"); the balancer would keep
//! sending it a share of the requests. Here a call that fails for want of an answer drops the
//! member and the next call starts with the next one, so one dead or partitioned member costs one
//! failed call (or none, for a call that may be retried).
//!
//! Which calls are retried on another member at once: reads, lease grants, keep-alives and
//! revokes always (repeating them changes nothing that matters: a lease granted twice leaves one
//! unused that lapses by itself), changes only when the request cannot have reached etcd's log
//! (the connection was refused, or the member said it has no leader). A change whose answer was
//! lost may or may not have been applied: it is reported as [`StoreError::Unavailable`] saying so,
//! and its caller reads again (a repeat with the same revision check would fail with a conflict
//! against its own write).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::store::StoreError;

/// How long connecting to one member may take: a member on a live network answers a TCP
/// connection (and a TLS handshake) in milliseconds; one on a cut link never does.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take: etcd's own request timeout for a write is 5 s plus the time of an
/// election (about 1 s by default); a call that has not been answered by then is not coming.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(7);
/// HTTP/2 pings on an idle connection, so that a watch on a member whose link was cut learns it
/// within this plus [`KEEPALIVE_TIMEOUT`] rather than at TCP's retransmission timeout (minutes).
/// Not below etcd's `--grpc-keepalive-min-time` (5 s by default), or etcd closes the connection
/// for pinging too often.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer accepted: a list of every volume record of a large cluster is a few MB;
/// tonic's default (4 MiB) would fail it.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The TLS files of the etcd client (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the members' certificates.
    pub ca: Vec<u8>,
    /// This client's certificate and key, when etcd checks clients' certificates.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The members of an etcd cluster and how to reach them.
pub(super) struct Connection {
    endpoints: Vec<Endpoint>,
    /// The endpoints as configured, for messages.
    names: Vec<String>,
    current: Mutex<Current>,
}

struct Current {
    /// The member tried first.
    index: usize,
    channel: Option<Channel>,
}

/// May a call be repeated on another member after it failed for want of an answer?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retry {
    /// Yes: it changes nothing, or repeating it is harmless.
    Always,
    /// Only if it cannot have reached etcd's log.
    IfNotSent,
}

impl Connection {
    /// The endpoints (`http(s)://HOST:PORT` or `HOST:PORT`, `https` when TLS is given): nothing is
    /// dialled until the first call.
    pub(super) fn new(endpoints: &[String], tls: Option<&TlsFiles>) -> Result<Connection, String> {
        if endpoints.is_empty() {
            return Err("no etcd endpoint is given; list at least one".to_string());
        }
        let mut out = Vec::with_capacity(endpoints.len());
        for name in endpoints {
            let url = if name.contains("://") {
                name.clone()
            } else if tls.is_some() {
                format!("https://{name}")
            } else {
                format!("http://{name}")
            };
            let https = url.starts_with("https://");
            match (https, tls) {
                (true, None) => {
                    return Err(format!(
                    "endpoint {name} is https but no ca_file is given to check the members' certificates; \
                         give ca_file (and cert_file/key_file if etcd checks clients)"
                ))
                }
                (false, Some(_)) => {
                    return Err(format!(
                    "endpoint {name} is plain http but TLS files are given; write https://{} or remove the \
                         TLS files",
                    name.trim_start_matches("http://")
                ))
                }
                _ => {}
            }
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("endpoint {name} is not a URL ({url}): {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            if let Some(tls) = tls {
                let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                endpoint = endpoint
                    .tls_config(config)
                    .map_err(|e| format!("endpoint {name}: the TLS files cannot be used: {}", chain(&e)))?;
            }
            out.push(endpoint);
        }
        Ok(Connection {
            endpoints: out,
            names: endpoints.to_vec(),
            current: Mutex::new(Current {
                index: 0,
                channel: None,
            }),
        })
    }

    /// The endpoints as configured, joined for messages.
    pub(super) fn names(&self) -> String {
        self.names.join(", ")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A channel to a member that accepted a connection: the current one, or the first of the
    /// others (in order, from the one after the last that failed) that does.
    pub(super) async fn channel(&self) -> Result<(usize, Channel), StoreError> {
        let start = {
            let current = self.lock();
            if let Some(channel) = &current.channel {
                return Ok((current.index, channel.clone()));
            }
            current.index
        };
        let mut failures = Vec::new();
        for i in 0..self.endpoints.len() {
            let index = (start + i) % self.endpoints.len();
            match tokio::time::timeout(CONNECT_TIMEOUT, self.endpoints[index].connect()).await {
                Ok(Ok(channel)) => {
                    let mut current = self.lock();
                    current.index = index;
                    current.channel = Some(channel.clone());
                    return Ok((index, channel));
                }
                Ok(Err(e)) => failures.push(format!("{}: {}", self.names[index], chain(&e))),
                Err(_) => failures.push(format!(
                    "{}: no answer within {}s",
                    self.names[index],
                    CONNECT_TIMEOUT.as_secs()
                )),
            }
        }
        Err(StoreError::Unavailable(format!(
            "no etcd member answers ({}); check that etcd runs at cluster.etcd.endpoints and that this host \
             reaches it",
            failures.join("; ")
        )))
    }

    /// The member at `index` failed a call: the next call starts with the next member.
    pub(super) fn forget(&self, index: usize) {
        let mut current = self.lock();
        if current.index == index {
            current.channel = None;
            current.index = (index + 1) % self.endpoints.len();
        }
    }

    /// Runs `call` on a member; a failure for want of an answer moves to the next member and, as
    /// `retry` allows, tries again there (each member once). Other failures are etcd's answer,
    /// turned into a [`StoreError`] by `refused`.
    pub(super) async fn call<T, F, Fut>(
        &self,
        retry: Retry,
        call: F,
        refused: impl Fn(Status) -> StoreError,
    ) -> Result<T, StoreError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = String::new();
        for _ in 0..self.endpoints.len() {
            let (index, channel) = self.channel().await?;
            let name = &self.names[index];
            let (failure, not_sent) = match tokio::time::timeout(REQUEST_TIMEOUT, call(channel)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(status)) if unanswered(&status) => {
                    (format!("{name}: {}", describe(&status)), not_sent(&status))
                }
                Ok(Err(status)) => return Err(refused(status)),
                Err(_) => (
                    format!("{name}: no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                    false,
                ),
            };
            self.forget(index);
            last = failure;
            if retry == Retry::IfNotSent && !not_sent {
                return Err(StoreError::Unavailable(format!(
                    "etcd did not answer a change ({last}); it may or may not have been applied: read again \
                     before retrying"
                )));
            }
        }
        Err(StoreError::Unavailable(format!(
            "no etcd member answered ({last}); check that etcd runs at {} and has a leader (a majority of \
             its members up and connected)",
            self.names()
        )))
    }
}

/// Did the call fail because the member did not answer (rather than etcd refusing it)?
pub(super) fn unanswered(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => true,
        // A transport failure (a reset connection) reaches us as Unknown with its cause attached.
        Code::Unknown => {
            std::error::Error::source(status).is_some() || status.message().contains("transport")
        }
        _ => false,
    }
}

/// Can the failed call not have reached etcd's log: refused connections, and a member that had no
/// leader to propose it to.
fn not_sent(status: &Status) -> bool {
    if status.message().contains("no leader") {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// A status with its causes, for messages.
pub(super) fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    append_causes(&mut text, std::error::Error::source(status));
    text
}

/// An error with its causes, for messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    append_causes(&mut text, e.source());
    text
}

/// Appends each cause not already said (transport errors repeat their cause in their own text).
fn append_causes(text: &mut String, mut source: Option<&(dyn std::error::Error + 'static)>) {
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> TlsFiles {
        TlsFiles {
            ca: b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec(),
            identity: None,
        }
    }

    #[test]
    fn endpoints_and_tls_must_agree() {
        assert!(Connection::new(&[], None).is_err());
        let plain = Connection::new(&["127.0.0.1:2379".into(), "http://10.0.0.2:2379".into()], None).unwrap();
        assert_eq!(plain.names(), "127.0.0.1:2379, http://10.0.0.2:2379");
        let e = Connection::new(&["https://10.0.0.1:2379".into()], None)
            .err()
            .unwrap();
        assert!(e.contains("ca_file"), "{e}");
        let e = Connection::new(&["http://10.0.0.1:2379".into()], Some(&tls()))
            .err()
            .unwrap();
        assert!(e.contains("https://10.0.0.1:2379"), "{e}");
        assert!(Connection::new(&["10.0.0.1:2379".into()], Some(&tls())).is_ok());
    }

    #[test]
    fn only_failures_to_answer_move_to_another_member() {
        assert!(unanswered(&Status::unavailable("etcdserver: no leader")));
        assert!(not_sent(&Status::unavailable("etcdserver: no leader")));
        assert!(unanswered(&Status::deadline_exceeded(
            "etcdserver: request timed out"
        )));
        assert!(!not_sent(&Status::deadline_exceeded(
            "etcdserver: request timed out"
        )));
        assert!(!unanswered(&Status::not_found(
            "etcdserver: requested lease not found"
        )));
        assert!(!unanswered(&Status::invalid_argument(
            "etcdserver: request is too large"
        )));
        assert!(!unanswered(&Status::unknown("something etcd said")));
    }
}
