//! The cluster store: one small interface, two implementations.
//!
//! Everything the agents share goes through [`Store`]: get, compare-and-put
//! with a revision, delete, list by prefix, watch, and leases. The interface
//! is etcd's data model cut down to what Basalt needs, so that the embedded
//! store of a one-host cluster ([`embedded`]) and etcd (several hosts) are
//! interchangeable and the reconcilers never know which one they talk to.
//!
//! Semantics (both implementations):
//! * the store has one revision counter; every put, and every delete of a key
//!   that exists, raises it by one and stamps the key with it
//!   ([`KeyValue::mod_revision`]); deleting an absent key changes nothing;
//! * a put or delete names what it expects to find ([`Expect`]) and fails
//!   with [`StoreError::Conflict`] otherwise, changing nothing: there are no
//!   lost updates when two agents act at once;
//! * a key put with a lease is deleted when the lease expires or is revoked
//!   (the embedded store gives each deletion a revision of its own, etcd
//!   gives them all the revision of the lease's end);
//! * a watch delivers every change under its prefix after the revision it
//!   starts from, in revision order, with no gaps (or ends with an error the
//!   watcher answers by listing again).

pub mod embedded;
pub mod etcd;

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The store's revision: 0 means "never written".
pub type Revision = u64;

/// A lease: keys put with it live while it is kept alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// One key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the put that created this key (since its last delete).
    pub create_revision: Revision,
    /// The revision of the last put of this key.
    pub mod_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// What a put or a delete expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist (create).
    Absent,
    /// The key exists with this `mod_revision` (update what was read).
    Revision(Revision),
    /// Anything: used only for records a single writer owns (a node's own
    /// registration and statuses).
    Any,
}

/// What a [`StoreError::Conflict`] says: a failed create is about a key that
/// exists, a failed update about one that changed or went away.
fn conflict_message(key: &str, expected: Expect, found: Revision) -> String {
    match (expected, found) {
        (Expect::Absent, found) => format!(
            "{key} already exists (revision {found}); read it and update it with its revision, or use another key"
        ),
        (Expect::Revision(read), 0) => format!(
            "{key} was deleted since it was read at revision {read}; read it again and retry"
        ),
        (Expect::Revision(read), found) => format!(
            "{key} changed since it was read (read at revision {read}, now revision {found}); read it again and retry"
        ),
        (Expect::Any, found) => format!("{key} could not be changed (found revision {found}); retry"),
    }
}

/// Which store a cluster keeps its state in: other endpoints (the API's
/// health, placement's warnings) ask whether hosts share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One host's crash-safe file: the cluster is this host.
    Embedded,
    /// An etcd cluster the agents of several hosts share.
    Etcd,
}

impl StoreKind {
    /// Do several hosts share this store (so that other hosts may take over
    /// this one's volumes)?
    pub fn is_shared(self) -> bool {
        matches!(self, StoreKind::Etcd)
    }
}

/// A key no record is kept at: reading it tells whether the store answers.
pub const PROBE_KEY: &str = "/basalt/probe";

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, mod_revision: Revision },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", conflict_message(key, *expected, *found))]
    Conflict {
        key: String,
        expected: Expect,
        /// The key's current `mod_revision` (0: absent).
        found: Revision,
    },
    #[error("lease {0:?} has expired or was revoked; grant a new one")]
    LeaseExpired(LeaseId),
    #[error("a watch from revision {requested} cannot be served: history before {compacted} is gone; list again and watch from the revision the list returns")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("the cluster store is unavailable: {0}")]
    Unavailable(String),
    #[error("the cluster store at {path} is damaged: {reason}; restore it from a backup or move it away to start empty")]
    Corrupt { path: String, reason: String },
    #[error("the request for {key} cannot be served: {reason}")]
    InvalidRequest { key: String, reason: String },
    #[error("{key} holds a record this agent cannot read: {reason}")]
    BadRecord { key: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A stream of changes; an `Err` ends it.
pub type Watch = BoxStream<'static, Result<Event>>;

/// The cluster store (see the module docs for the semantics).
pub trait Store: Send + Sync + 'static {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>>>;

    /// Every key under `prefix`, in key order, and the store's revision at the
    /// time of the read (watch from `revision + 1` to miss nothing).
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<(Vec<KeyValue>, Revision)>>;

    /// Put `value` at `key` if `expect` holds; returns the new revision.
    /// Values are text records (JSON, see [`put_json`]): the embedded
    /// store's log reader relies on values holding no NUL byte to tell a
    /// torn append from damage (see `embedded/codec.rs`).
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Revision>>;

    /// Delete `key` if `expect` holds (deleting an absent key with
    /// `Expect::Any` succeeds); returns the new revision (the current one
    /// when there was nothing to delete: no change, no event).
    fn delete<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, Result<Revision>>;

    /// Changes under `prefix` with revisions `>= from`.
    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch>>;

    /// A lease that lives `ttl` past its last keep-alive.
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>>;

    /// Renew `lease`; `LeaseExpired` if it is already gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>>;

    /// End `lease` now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>>;

    /// Which store this is (see [`StoreKind::is_shared`]).
    fn kind(&self) -> StoreKind;
}

/// A record read from the store with the revision to expect when writing it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

/// Read and decode a JSON record.
pub async fn get_json<T: DeserializeOwned>(store: &dyn Store, key: &str) -> Result<Option<Versioned<T>>> {
    match store.get(key).await? {
        None => Ok(None),
        Some(kv) => decode(&kv).map(Some),
    }
}

/// Encode and put a JSON record.
pub async fn put_json<T: Serialize>(
    store: &dyn Store,
    key: &str,
    value: &T,
    expect: Expect,
    lease: Option<LeaseId>,
) -> Result<Revision> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::BadRecord {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    store.put(key, bytes, expect, lease).await
}

/// Every JSON record under `prefix`, and the revision of the read.
pub async fn list_json<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<(Vec<(String, Versioned<T>)>, Revision)> {
    let (kvs, revision) = store.list(prefix).await?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in &kvs {
        out.push((kv.key.clone(), decode(kv)?));
    }
    Ok((out, revision))
}

/// Decode a key's JSON value.
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>> {
    let value = serde_json::from_slice(&kv.value).map_err(|e| StoreError::BadRecord {
        key: kv.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Versioned {
        value,
        revision: kv.mod_revision,
    })
}
