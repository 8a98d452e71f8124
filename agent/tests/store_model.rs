//! Property: any sequence of operations on the embedded store (including closing and reopening it,
//! with compaction happening along the way) gives the same results as a plain in-memory model of
//! the contract in agent/src/store/mod.rs, and a watch opened at each open sees exactly the
//! model's events, in order, with no gap and nothing extra; so does a watch opened after a reopen
//! from a revision before it (or it is refused as compacted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use basalt_agent::store::embedded::{EmbeddedStore, Options};
use basalt_agent::store::{Event, Expect, KeyValue, LeaseId, Revision, Store, StoreError, Watch};
use futures::StreamExt;
use proptest::prelude::*;

const KEYS: [&str; 5] = ["/a", "/a/x", "/a/y", "/b", "/b/z"];
const PREFIXES: [&str; 5] = ["", "/a", "/a/", "/b", "/c"];
/// Leases in this test never expire on their own: expiry is timing, the model is not.
const TTL: Duration = Duration::from_secs(3600);
/// The key the watch checks write after the events they expect: outside `KEYS`, so only they
/// touch it.
const MARKER: &str = "/~marker";
/// A bound on waiting for a watch event, never an assertion about speed.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
enum ExpectChoice {
    Any,
    Absent,
    /// The key's current revision (what a careful writer sends).
    Current,
    /// Some revision, most likely stale.
    Revision(Revision),
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        key: usize,
        value: u8,
        expect: ExpectChoice,
        lease: Option<usize>,
    },
    Delete {
        key: usize,
        expect: ExpectChoice,
    },
    Get(usize),
    List(usize),
    Grant,
    KeepAlive(usize),
    Revoke(usize),
    Reopen,
}

fn expect_choice() -> impl Strategy<Value = ExpectChoice> {
    prop_oneof![
        Just(ExpectChoice::Any),
        Just(ExpectChoice::Absent),
        Just(ExpectChoice::Current),
        (0u64..12).prop_map(ExpectChoice::Revision),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS.len(), any::<u8>(), expect_choice(), proptest::option::of(0usize..4))
            .prop_map(|(key, value, expect, lease)| Op::Put { key, value, expect, lease }),
        3 => (0..KEYS.len(), expect_choice()).prop_map(|(key, expect)| Op::Delete { key, expect }),
        1 => (0..KEYS.len()).prop_map(Op::Get),
        1 => (0..PREFIXES.len()).prop_map(Op::List),
        2 => Just(Op::Grant),
        1 => (0usize..4).prop_map(Op::KeepAlive),
        1 => (0usize..4).prop_map(Op::Revoke),
        1 => Just(Op::Reopen),
    ]
}

/// What an operation answered, comparable between the store and the model.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Revision(Revision),
    Conflict { found: Revision },
    LeaseExpired,
    Value(Option<KeyValue>),
    Listed(Vec<KeyValue>, Revision),
    Done,
    Other(String),
}

fn outcome(r: Result<Revision, StoreError>) -> Outcome {
    match r {
        Ok(rev) => Outcome::Revision(rev),
        Err(e) => error_outcome(e),
    }
}

fn error_outcome(e: StoreError) -> Outcome {
    match e {
        StoreError::Conflict { found, .. } => Outcome::Conflict { found },
        StoreError::LeaseExpired(_) => Outcome::LeaseExpired,
        other => Outcome::Other(other.to_string()),
    }
}

/// The contract, as plainly as it can be written.
#[derive(Default)]
struct Model {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    /// Live leases and their keys.
    leases: BTreeMap<i64, BTreeSet<String>>,
    events: Vec<Event>,
}

impl Model {
    fn holds(&self, key: &str, expect: Expect) -> Result<(), Outcome> {
        let found = self.kvs.get(key).map_or(0, |kv| kv.mod_revision);
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => found == 0,
            Expect::Revision(r) => found != 0 && found == r,
        };
        if ok {
            Ok(())
        } else {
            Err(Outcome::Conflict { found })
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, expect: Expect, lease: Option<LeaseId>) -> Outcome {
        if let Err(o) = self.holds(key, expect) {
            return o;
        }
        if lease.is_some_and(|l| !self.leases.contains_key(&l.0)) {
            return Outcome::LeaseExpired;
        }
        self.revision += 1;
        let create_revision = self.kvs.get(key).map_or(self.revision, |kv| kv.create_revision);
        if let Some(old) = self.kvs.get(key).and_then(|kv| kv.lease) {
            if let Some(keys) = self.leases.get_mut(&old.0) {
                keys.remove(key);
            }
        }
        if let Some(l) = lease {
            self.leases.entry(l.0).or_default().insert(key.to_string());
        }
        let kv = KeyValue {
            key: key.to_string(),
            value,
            create_revision,
            mod_revision: self.revision,
            lease,
        };
        self.kvs.insert(key.to_string(), kv.clone());
        self.events.push(Event::Put(kv));
        Outcome::Revision(self.revision)
    }

    fn delete(&mut self, key: &str, expect: Expect) -> Outcome {
        if let Err(o) = self.holds(key, expect) {
            return o;
        }
        let Some(kv) = self.kvs.remove(key) else {
            return Outcome::Revision(self.revision);
        };
        if let Some(keys) = kv.lease.and_then(|l| self.leases.get_mut(&l.0)) {
            keys.remove(key);
        }
        self.revision += 1;
        self.events.push(Event::Delete {
            key: key.to_string(),
            mod_revision: self.revision,
        });
        Outcome::Revision(self.revision)
    }

    fn revoke(&mut self, lease: LeaseId) {
        if let Some(keys) = self.leases.remove(&lease.0) {
            for key in keys {
                self.kvs.remove(&key);
                self.revision += 1;
                self.events.push(Event::Delete {
                    key,
                    mod_revision: self.revision,
                });
            }
        }
    }

    fn list(&self, prefix: &str) -> Outcome {
        let kvs = self
            .kvs
            .values()
            .filter(|kv| kv.key.starts_with(prefix))
            .cloned()
            .collect();
        Outcome::Listed(kvs, self.revision)
    }
}

struct Session {
    store: Arc<EmbeddedStore>,
    watch: Watch,
    /// The model's events before this session's watch started.
    first_event: usize,
    /// The revision this session's watch started from.
    from: Revision,
}

async fn open(dir: &Path, model: &Model) -> Session {
    let options = Options {
        // Small, so that sequences of a few dozen operations compact and reopen from snapshots.
        compact_after_bytes: 400,
        ..Options::default()
    };
    let store = EmbeddedStore::open_with(dir, options).unwrap();
    let from = model.revision + 1;
    let watch = store.watch("", from).await.unwrap();
    Session {
        store,
        watch,
        first_event: model.events.len(),
        from,
    }
}

/// `watch` delivers exactly the model's events from index `first` on, and nothing else: a marker
/// is written first (through the store and the model), so an extra event the store delivered would
/// come before the marker's and differ from the one expected there.
async fn read_exactly(
    watch: &mut Watch,
    store: &EmbeddedStore,
    model: &mut Model,
    first: usize,
) -> Result<(), TestCaseError> {
    let marked = outcome(store.put(MARKER, b"m".to_vec(), Expect::Any, None).await);
    prop_assert_eq!(marked, model.put(MARKER, b"m".to_vec(), Expect::Any, None));
    for expected in &model.events[first..] {
        let got = tokio::time::timeout(DEADLINE, watch.next()).await;
        let got = got.map_err(|_| TestCaseError::fail("no event before the deadline"))?;
        let got = got.ok_or_else(|| TestCaseError::fail("the watch ended"))?;
        prop_assert_eq!(&got.map_err(|e| TestCaseError::fail(e.to_string()))?, expected);
    }
    Ok(())
}

/// The session's watch saw exactly the model's events since it started.
async fn check_watch(session: &mut Session, model: &mut Model) -> Result<(), TestCaseError> {
    let first = session.first_event;
    read_exactly(&mut session.watch, &session.store, model, first).await
}

/// A watch opened now from `from`, a revision before the latest reopen, delivers exactly the
/// model's events since `from`, or is refused as compacted (the history at open holds only what
/// the log replays).
async fn check_watch_across_reopen(
    session: &Session,
    model: &mut Model,
    from: Revision,
) -> Result<(), TestCaseError> {
    let mut watch = match session.store.watch("", from).await {
        Ok(watch) => watch,
        Err(StoreError::Compacted { .. }) => return Ok(()),
        Err(e) => return Err(TestCaseError::fail(format!("watch from {from}: {e}"))),
    };
    let first = model
        .events
        .iter()
        .position(|e| e.revision() >= from)
        .unwrap_or(model.events.len());
    read_exactly(&mut watch, &session.store, model, first).await
}

fn expect_of(choice: &ExpectChoice, model: &Model, key: &str) -> Expect {
    match choice {
        ExpectChoice::Any => Expect::Any,
        ExpectChoice::Absent => Expect::Absent,
        ExpectChoice::Current => Expect::Revision(model.kvs.get(key).map_or(1, |kv| kv.mod_revision)),
        ExpectChoice::Revision(r) => Expect::Revision(*r),
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    // Every lease granted, live or not; index choices pick among them (or an unknown one).
    let mut granted: Vec<LeaseId> = Vec::new();
    let pick = |granted: &Vec<LeaseId>, i: usize| granted.get(i).copied().unwrap_or(LeaseId(1_000_000));
    let mut session = open(dir.path(), &model).await;
    for op in ops {
        let store = &session.store;
        match op {
            Op::Put {
                key,
                value,
                expect,
                lease,
            } => {
                let key = KEYS[key];
                let expect = expect_of(&expect, &model, key);
                let lease = lease.map(|i| pick(&granted, i));
                let got = outcome(store.put(key, vec![value], expect, lease).await);
                prop_assert_eq!(got, model.put(key, vec![value], expect, lease));
            }
            Op::Delete { key, expect } => {
                let key = KEYS[key];
                let expect = expect_of(&expect, &model, key);
                let got = outcome(store.delete(key, expect).await);
                prop_assert_eq!(got, model.delete(key, expect));
            }
            Op::Get(key) => {
                let key = KEYS[key];
                let got = store.get(key).await.map_or_else(error_outcome, Outcome::Value);
                prop_assert_eq!(got, Outcome::Value(model.kvs.get(key).cloned()));
            }
            Op::List(prefix) => {
                let prefix = PREFIXES[prefix];
                let got = store
                    .list(prefix)
                    .await
                    .map_or_else(error_outcome, |(kvs, rev)| Outcome::Listed(kvs, rev));
                prop_assert_eq!(got, model.list(prefix));
            }
            Op::Grant => {
                let lease = store.grant_lease(TTL).await.unwrap();
                prop_assert!(!granted.contains(&lease), "lease id {:?} reused", lease);
                granted.push(lease);
                model.leases.insert(lease.0, BTreeSet::new());
            }
            Op::KeepAlive(i) => {
                let lease = pick(&granted, i);
                let got = store
                    .keep_alive(lease)
                    .await
                    .map_or_else(error_outcome, |()| Outcome::Done);
                let expected = if model.leases.contains_key(&lease.0) {
                    Outcome::Done
                } else {
                    Outcome::LeaseExpired
                };
                prop_assert_eq!(got, expected);
            }
            Op::Revoke(i) => {
                let lease = pick(&granted, i);
                let got = store
                    .revoke(lease)
                    .await
                    .map_or_else(error_outcome, |()| Outcome::Done);
                prop_assert_eq!(got, Outcome::Done);
                model.revoke(lease);
            }
            Op::Reopen => {
                check_watch(&mut session, &mut model).await?;
                let before = session.from;
                drop(session);
                session = open(dir.path(), &model).await;
                let (kvs, revision) = session.store.list("").await.unwrap();
                prop_assert_eq!(revision, model.revision);
                prop_assert_eq!(kvs, model.kvs.values().cloned().collect::<Vec<_>>());
                check_watch_across_reopen(&session, &mut model, before).await?;
            }
        }
    }
    check_watch(&mut session, &mut model).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run(ops))?;
    }
}
