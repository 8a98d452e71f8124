//! The cluster store of several hosts: an etcd cluster (Debian's `etcd-server` 3.4 and later),
//! behind the same [`Store`] interface as the embedded store.
//!
//! How it talks to etcd: etcd's v3 gRPC API through tonic, on a subset of etcd's protos
//! (`agent/proto/etcd/`, written from etcd's API reference with the real field numbers) compiled
//! by `build.rs` with protox, so a fresh machine builds with no `protoc`. Not the `etcd-client`
//! crate: its build script runs `protoc`, and the dozen RPCs we need are less code than patching
//! its build. Not etcd's JSON gateway: its path moved between releases (`/v3beta`, `/v3`), it
//! carries keys and values as base64 and a watch as a chunked HTTP body, and it would still need
//! a second HTTP client with TLS; gRPC is etcd's own interface and tonic is in the tree already.
//!
//! The mapping:
//! * our [`Revision`] is etcd's revision, and a key's `mod_revision`/`create_revision` are
//!   etcd's. etcd starts at revision 1 (the empty store), so its first change is revision 2;
//! * a put or delete with [`Expect::Absent`] is a transaction comparing the key's
//!   `create_revision` with 0; with [`Expect::Revision`] one comparing its `mod_revision` (and
//!   `create_revision > 0`, so that revision 0 never matches an absent key); on failure the same
//!   transaction reads the key, so the conflict says what was found, as of the same revision;
//! * a lease's TTL is whole seconds, rounded up (etcd also raises it to its minimum, about 2 s
//!   with the default election timeout); its end deletes its keys in one revision;
//! * a watch is resumed from the revision after the last one delivered when its stream breaks
//!   (see `etcd/watch.rs`).
//!
//! When no member answers, every operation fails with [`StoreError::Unavailable`] naming the
//! endpoints; the outage is logged once when it starts and once when it ends (not per call), and
//! [`EtcdStore::outage`] says whether one is in progress.

mod connection;
mod watch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::transport::Channel;
use tonic::{Code, Status};

use self::connection::{Connection, Retry, MAX_MESSAGE_BYTES};
pub use self::connection::{TlsFiles, REQUEST_TIMEOUT};
use self::pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, response_op, CompactionRequest,
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
    RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use super::{Expect, KeyValue, LeaseId, Result, Revision, Store, StoreError, StoreKind, Watch};

/// The code generated from `proto/etcd` by `build.rs`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// How long one attempt of [`EtcdStore::wait_until_reachable`] waits: a member with a leader
/// answers a read in milliseconds; one without may hold it for its whole request timeout.
const PROBE_ATTEMPT: Duration = Duration::from_secs(3);

/// The longest lease etcd grants (its `MaxLeaseTTL`, in seconds).
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// How to reach the etcd cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Its members' client URLs (`http(s)://HOST:PORT` or `HOST:PORT`).
    pub endpoints: Vec<String>,
    /// TLS (every endpoint `https`), or none (every endpoint `http`).
    pub tls: Option<TlsFiles>,
}

/// The cluster store on etcd (see the module docs).
pub struct EtcdStore {
    connection: Arc<Connection>,
    outage: Arc<Outage>,
}

/// Whether etcd answers, so that an outage is logged once, not once per failed call.
#[derive(Default)]
struct Outage {
    since: Mutex<Option<(Instant, String)>>,
}

impl Outage {
    fn failed(&self, what: &str) {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if since.is_none() {
            tracing::warn!(error = %what, "the cluster store (etcd) is unavailable; the volumes this host serves keep running, control operations wait for it");
        }
        *since = Some((
            since.as_ref().map_or_else(Instant::now, |(t, _)| *t),
            what.to_string(),
        ));
    }

    fn answered(&self) {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((t, _)) = since.take() {
            tracing::info!(
                after_secs = t.elapsed().as_secs(),
                "the cluster store (etcd) answers again"
            );
        }
    }
}

impl EtcdStore {
    /// A store on the etcd cluster at `options.endpoints`. Nothing is dialled yet: the first
    /// operation connects (use [`EtcdStore::wait_until_reachable`] to find out at start).
    pub fn new(options: &EtcdOptions) -> std::result::Result<Arc<EtcdStore>, String> {
        let connection = Connection::new(&options.endpoints, options.tls.as_ref())?;
        Ok(Arc::new(EtcdStore {
            connection: Arc::new(connection),
            outage: Arc::new(Outage::default()),
        }))
    }

    /// Waits until a member answers a read, for at most `within` (and the end of the attempt in
    /// progress then); the error names the endpoints and what the last attempt met. Each attempt is
    /// cut after [`PROBE_ATTEMPT`], so that members still electing a leader when the agent starts
    /// (hosts booting together) are asked again soon after they have one.
    pub async fn wait_until_reachable(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let last = match tokio::time::timeout(PROBE_ATTEMPT, self.get(super::PROBE_KEY)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(StoreError::Unavailable(e))) => e,
                Ok(Err(e)) => return Err(e),
                Err(_) => format!(
                    "no member answered within {}s (is a majority of the members up, with a leader?)",
                    PROBE_ATTEMPT.as_secs()
                ),
            };
            if !seen.contains(&last) {
                seen.push(last.clone());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {} did not answer within {}s: {}",
                    self.connection.names(),
                    within.as_secs(),
                    reasons(&seen)
                )));
            }
            tracing::debug!(error = %last, "waiting for etcd");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Since when, and why, etcd has not answered (`None`: it answered the last call).
    pub fn outage(&self) -> Option<(Duration, String)> {
        let since = self
            .outage
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        since.as_ref().map(|(t, why)| (t.elapsed(), why.clone()))
    }

    /// Compacts etcd's history up to `revision` (watches from before it end with
    /// [`StoreError::Compacted`]). etcd compacts by itself only when told to
    /// (`--auto-compaction-retention`); this is for tests and operators' tools.
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        let revision = to_etcd(revision);
        self.call(
            Retry::Always,
            move |channel| async move {
                kv(channel)
                    .compact(CompactionRequest {
                        revision,
                        physical: true,
                    })
                    .await
            },
            |status| refused("(compaction)", status),
        )
        .await
        .map(drop)
    }

    async fn call<T, F, Fut>(
        &self,
        retry: Retry,
        call: F,
        refused: impl Fn(Status) -> StoreError,
    ) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let result = self
            .connection
            .call(retry, call, refused)
            .await
            .map(tonic::Response::into_inner);
        match &result {
            Err(StoreError::Unavailable(why)) => self.outage.failed(why),
            _ => self.outage.answered(),
        }
        result
    }

    async fn txn(&self, key: &str, request: TxnRequest) -> Result<TxnResponse> {
        self.call(
            Retry::IfNotSent,
            |channel| {
                let request = request.clone();
                async move { kv(channel).txn(request).await }
            },
            |status| refused(key, status),
        )
        .await
    }
}

fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn lease(channel: Channel) -> LeaseClient<Channel> {
    LeaseClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// etcd's revisions and lease ids are `int64`, never negative in practice.
fn to_etcd(revision: Revision) -> i64 {
    i64::try_from(revision).unwrap_or(i64::MAX)
}

fn from_etcd(revision: i64) -> Revision {
    revision.unsigned_abs()
}

/// The key range of a prefix: `[prefix, prefix with its last byte raised)`; every key for "".
pub(super) fn key_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.as_bytes().to_vec(), end);
        }
    }
    // "\0" as both: every key from the smallest one on.
    (vec![0], vec![0])
}

pub(super) fn kv_from(kv: pb::mvccpb::KeyValue) -> Result<KeyValue> {
    let key = String::from_utf8(kv.key).map_err(|e| StoreError::BadRecord {
        key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        reason: "the key is not UTF-8".to_string(),
    })?;
    Ok(KeyValue {
        key,
        value: kv.value,
        create_revision: from_etcd(kv.create_revision),
        mod_revision: from_etcd(kv.mod_revision),
        lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
    })
}

/// etcd's refusal of a request about `key`, as the store's error.
pub(super) fn refused(key: &str, status: Status) -> StoreError {
    let message = status.message();
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::ResourceExhausted => StoreError::InvalidRequest {
            key: key.to_string(),
            reason: if message.contains("too large") || status.code() == Code::ResourceExhausted {
                format!("{message} (beyond etcd's request size limit, --max-request-bytes)")
            } else {
                message.to_string()
            },
        },
        Code::PermissionDenied | Code::Unauthenticated => StoreError::Unavailable(format!(
            "etcd refused access ({message}); check cluster.etcd's TLS files and etcd's client certificate auth"
        )),
        _ => StoreError::Unavailable(format!("etcd refused the request for {key}: {}", connection::describe(&status))),
    }
}

/// Requests etcd refuses in any case, refused before they are sent, as the embedded store does.
fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidRequest {
            key: key.to_string(),
            reason: "the key is empty".to_string(),
        });
    }
    Ok(())
}

fn compare_mod(key: &str, revision: Revision) -> Vec<Compare> {
    vec![
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(compare::TargetUnion::ModRevision(to_etcd(revision))),
        },
        Compare {
            result: compare::CompareResult::Greater as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        },
    ]
}

fn compare_absent(key: &str) -> Vec<Compare> {
    vec![Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
    }]
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..RangeRequest::default()
        })),
    }
}

/// The outcome of a conditional transaction: its revision, or the conflict it met.
fn settle(key: &str, expected: Expect, response: TxnResponse) -> Result<Revision> {
    let revision = from_etcd(response.header.map_or(0, |h| h.revision));
    if response.succeeded {
        return Ok(revision);
    }
    let found = response
        .responses
        .into_iter()
        .find_map(|r| match r.response {
            Some(response_op::Response::ResponseRange(range)) => Some(range),
            _ => None,
        })
        .and_then(|range| range.kvs.into_iter().next())
        .map_or(0, |kv| from_etcd(kv.mod_revision));
    Err(StoreError::Conflict {
        key: key.to_string(),
        expected,
        found,
    })
}

/// A put naming a lease etcd does not have: the lease ended.
fn put_refused(key: &str, lease: Option<LeaseId>, status: Status) -> StoreError {
    match lease {
        Some(lease) if status.code() == Code::NotFound && status.message().contains("lease") => {
            StoreError::LeaseExpired(lease)
        }
        _ => refused(key, status),
    }
}

impl Store for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>>> {
        Box::pin(async move {
            check_key(key)?;
            let response = self
                .call(
                    Retry::Always,
                    |channel| async move {
                        kv(channel)
                            .range(RangeRequest {
                                key: key.as_bytes().to_vec(),
                                ..RangeRequest::default()
                            })
                            .await
                    },
                    |status| refused(key, status),
                )
                .await?;
            response.kvs.into_iter().next().map(kv_from).transpose()
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<(Vec<KeyValue>, Revision)>> {
        Box::pin(async move {
            let (key, range_end) = key_range(prefix);
            let response = self
                .call(
                    Retry::Always,
                    |channel| {
                        let request = RangeRequest {
                            key: key.clone(),
                            range_end: range_end.clone(),
                            ..RangeRequest::default()
                        };
                        async move { kv(channel).range(request).await }
                    },
                    |status| refused(prefix, status),
                )
                .await?;
            let revision = from_etcd(response.header.map_or(0, |h| h.revision));
            let kvs = response
                .kvs
                .into_iter()
                .map(kv_from)
                .collect::<Result<Vec<_>>>()?;
            Ok((kvs, revision))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Revision>> {
        Box::pin(async move {
            check_key(key)?;
            let put = PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease: lease.map_or(0, |l| l.0),
            };
            let compare = match expect {
                Expect::Any => {
                    let response = self
                        .call(
                            Retry::IfNotSent,
                            |channel| {
                                let put = put.clone();
                                async move { kv(channel).put(put).await }
                            },
                            |status| put_refused(key, lease, status),
                        )
                        .await?;
                    return Ok(from_etcd(response.header.map_or(0, |h| h.revision)));
                }
                Expect::Absent => compare_absent(key),
                Expect::Revision(r) => compare_mod(key, r),
            };
            let request = TxnRequest {
                compare,
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(put)),
                }],
                failure: vec![get_op(key)],
            };
            let response = self
                .call(
                    Retry::IfNotSent,
                    |channel| {
                        let request = request.clone();
                        async move { kv(channel).txn(request).await }
                    },
                    |status| put_refused(key, lease, status),
                )
                .await?;
            settle(key, expect, response)
        })
    }

    fn delete<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, Result<Revision>> {
        Box::pin(async move {
            check_key(key)?;
            let delete = RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    range_end: Vec::new(),
                })),
            };
            let (compare, success) = match expect {
                Expect::Any => (Vec::new(), vec![delete]),
                // Nothing to delete if it holds: the transaction only checks.
                Expect::Absent => (compare_absent(key), Vec::new()),
                Expect::Revision(r) => (compare_mod(key, r), vec![delete]),
            };
            let response = self
                .txn(
                    key,
                    TxnRequest {
                        compare,
                        success,
                        failure: vec![get_op(key)],
                    },
                )
                .await?;
            settle(key, expect, response)
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch>> {
        Box::pin(async move {
            let result = watch::open(self.connection.clone(), prefix.to_string(), from).await;
            match &result {
                Err(StoreError::Unavailable(why)) => self.outage.failed(why),
                _ => self.outage.answered(),
            }
            result
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        Box::pin(async move {
            if ttl.is_zero() {
                return Err(StoreError::InvalidRequest {
                    key: "(lease)".to_string(),
                    reason: "a lease of no length ends before it is used; give a positive TTL".to_string(),
                });
            }
            // Whole seconds, rounded up: a lease never lives shorter than asked.
            let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            if secs > MAX_LEASE_TTL_SECS {
                return Err(StoreError::InvalidRequest {
                    key: "(lease)".to_string(),
                    reason: format!("a lease of {secs}s is beyond etcd's limit of {MAX_LEASE_TTL_SECS}s"),
                });
            }
            let ttl = i64::try_from(secs).unwrap_or(i64::MAX);
            let response = self
                .call(
                    Retry::Always,
                    |channel| async move { lease(channel).lease_grant(LeaseGrantRequest { ttl, id: 0 }).await },
                    |status| refused("(lease)", status),
                )
                .await?;
            if !response.error.is_empty() {
                return Err(StoreError::Unavailable(format!(
                    "etcd did not grant the lease: {}",
                    response.error
                )));
            }
            Ok(LeaseId(response.id))
        })
    }

    fn keep_alive(&self, id: LeaseId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // One request on etcd's keep-alive stream, one answer: the trait renews on demand,
            // and a stream kept open would hide a lapsed lease until the next read.
            let response = self
                .call(
                    Retry::Always,
                    |channel| async move {
                        let requests = futures::stream::iter([LeaseKeepAliveRequest { id: id.0 }]);
                        let mut answers = lease(channel).lease_keep_alive(requests).await?.into_inner();
                        match answers.message().await? {
                            Some(answer) => Ok(tonic::Response::new(answer)),
                            None => Err(Status::unavailable(
                                "etcd ended the keep-alive stream without an answer",
                            )),
                        }
                    },
                    |status| match status.code() {
                        Code::NotFound => StoreError::LeaseExpired(id),
                        _ => refused("(lease)", status),
                    },
                )
                .await?;
            if response.ttl <= 0 {
                return Err(StoreError::LeaseExpired(id));
            }
            Ok(())
        })
    }

    fn revoke(&self, id: LeaseId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let result = self
                .call(
                    Retry::Always,
                    |channel| async move { lease(channel).lease_revoke(LeaseRevokeRequest { id: id.0 }).await },
                    |status| match status.code() {
                        // Revoked already, or expired: what was asked is done.
                        Code::NotFound => StoreError::LeaseExpired(id),
                        _ => refused("(lease)", status),
                    },
                )
                .await;
            match result {
                Ok(_) | Err(StoreError::LeaseExpired(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn kind(&self) -> StoreKind {
        StoreKind::Etcd
    }
}

/// The distinct reasons the attempts failed, latest first: the latest alone may hide the telling one
/// (a member that refused the client's certificate closes the connection, and the next attempt only
/// sees it closed). At most four are named.
fn reasons(seen: &[String]) -> String {
    let latest_first: Vec<&str> = seen.iter().rev().take(4).map(String::as_str).collect();
    match latest_first.split_first() {
        None => "no attempt finished".to_string(),
        Some((last, [])) => last.to_string(),
        Some((last, earlier)) => format!("{last}; before that: {}", earlier.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_cluster_is_explained_by_every_distinct_reason_latest_first() {
        let seen = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(reasons(&[]), "no attempt finished");
        assert_eq!(reasons(&seen(&["refused"])), "refused");
        assert_eq!(
            reasons(&seen(&["BadCertificate", "connection closed"])),
            "connection closed; before that: BadCertificate"
        );
        let many = reasons(&seen(&["a", "b", "c", "d", "e"]));
        assert_eq!(many, "e; before that: d; c; b");
    }

    #[test]
    fn a_prefix_covers_exactly_its_keys() {
        assert_eq!(key_range("/v/"), (b"/v/".to_vec(), b"/v0".to_vec()));
        assert_eq!(key_range("a\u{7f}"), (b"a\x7f".to_vec(), b"a\x80".to_vec()));
        assert_eq!(key_range(""), (vec![0], vec![0]));
    }

    #[test]
    fn a_failed_transaction_reports_what_it_found() {
        use pb::etcdserverpb::{RangeResponse, ResponseHeader, ResponseOp};
        let found = |mod_revision: Option<i64>| TxnResponse {
            header: Some(ResponseHeader {
                revision: 9,
                ..ResponseHeader::default()
            }),
            succeeded: false,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseRange(RangeResponse {
                    kvs: mod_revision
                        .map(|r| pb::mvccpb::KeyValue {
                            key: b"/k".to_vec(),
                            mod_revision: r,
                            create_revision: 2,
                            ..Default::default()
                        })
                        .into_iter()
                        .collect(),
                    ..RangeResponse::default()
                })),
            }],
        };
        match settle("/k", Expect::Absent, found(Some(7))) {
            Err(StoreError::Conflict { found: 7, .. }) => {}
            other => panic!("{other:?}"),
        }
        match settle("/k", Expect::Revision(3), found(None)) {
            Err(StoreError::Conflict { found: 0, .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut ok = found(None);
        ok.succeeded = true;
        assert_eq!(settle("/k", Expect::Any, ok).unwrap(), 9);
    }

    #[test]
    fn etcd_refusals_become_the_stores_errors() {
        let e = put_refused(
            "/k",
            Some(LeaseId(5)),
            Status::not_found("etcdserver: requested lease not found"),
        );
        assert!(matches!(e, StoreError::LeaseExpired(LeaseId(5))), "{e}");
        let e = refused("/k", Status::invalid_argument("etcdserver: request is too large"));
        assert!(
            matches!(&e, StoreError::InvalidRequest { .. }) && e.to_string().contains("limit"),
            "{e}"
        );
        let e = refused("/k", Status::permission_denied("etcdserver: permission denied"));
        assert!(e.to_string().contains("TLS"), "{e}");
    }
}
