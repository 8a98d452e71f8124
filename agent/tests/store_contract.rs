//! The store contract (agent/src/store/mod.rs), run against both stores: the embedded store on a
//! real directory, and a real etcd member (Debian's etcd 3.4, started by the test on free ports).
//! Every test is generated twice (`embedded::NAME`, `etcd::NAME`) from one body. Revisions are
//! compared relative to each other: etcd's first change is revision 2, the embedded store's 1.
//! Waits have deadlines and no assertion depends on timing.

mod support;

use std::sync::Arc;
use std::time::Duration;

use basalt_agent::model::{keys, NodeAlive, NodeName, NodeRecord};
use basalt_agent::store::embedded::{EmbeddedStore, Options};
use basalt_agent::store::etcd::EtcdStore;
use basalt_agent::store::{
    self, Event, Expect, KeyValue, LeaseId, Revision, Store, StoreError, StoreKind, Watch,
};
use futures::StreamExt;
use support::etcd::EtcdMember;

/// Long enough for anything to happen on a loaded machine; only ever a bound on a wait.
const DEADLINE: Duration = Duration::from_secs(60);

/// A store under test, and what keeps it alive.
struct Subject {
    store: Arc<dyn Store>,
    etcd: Option<(EtcdMember, Arc<EtcdStore>)>,
    _dir: tempfile::TempDir,
}

/// How many recent events the embedded store of the compaction test keeps.
const SHORT_HISTORY: usize = 4;

impl Subject {
    async fn new(kind: StoreKind) -> Subject {
        match kind {
            StoreKind::Embedded => Subject::embedded(Options::default()),
            StoreKind::Etcd => {
                let member = EtcdMember::start();
                let store = member.store().await;
                Subject {
                    store: store.clone(),
                    etcd: Some((member, store)),
                    _dir: tempfile::tempdir().unwrap(),
                }
            }
        }
    }

    fn embedded(options: Options) -> Subject {
        let dir = tempfile::tempdir().unwrap();
        Subject {
            store: EmbeddedStore::open_with(dir.path(), options).unwrap(),
            etcd: None,
            _dir: dir,
        }
    }

    /// Another client of the same store: a second connection to etcd; the embedded store has one
    /// owner per directory, shared by its users.
    async fn second_client(&self) -> Arc<dyn Store> {
        match &self.etcd {
            Some((member, _)) => member.store().await,
            None => self.store.clone(),
        }
    }

    /// Makes the store forget the history before the last [`SHORT_HISTORY`] revisions up to
    /// `last` (etcd: a compaction; the embedded store keeps only that many by construction).
    async fn forget_history_before(&self, revision: Revision) {
        if let Some((_, etcd)) = &self.etcd {
            etcd.compact(revision).await.unwrap();
        }
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let subject = super::Subject::new(super::StoreKind::Embedded).await;
                    super::$name(&subject).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let subject = super::Subject::new(super::StoreKind::Etcd).await;
                    super::$name(&subject).await;
                }
            )*
        }
    };
}

contract!(
    put_get_delete_stamp_revisions,
    a_write_whose_expectation_fails_changes_nothing,
    list_returns_the_prefix_in_key_order_with_the_revision_of_the_read,
    two_clients_racing_compare_and_put_exactly_one_wins,
    many_writers_of_one_counter_lose_no_update,
    a_watch_delivers_every_change_under_its_prefix_in_order,
    a_watch_from_a_revision_starts_exactly_there_and_a_future_one_waits,
    a_watch_from_forgotten_history_ends_with_compacted,
    revoking_a_lease_deletes_its_keys,
    an_expired_lease_takes_its_keys_with_it,
    a_lapsed_lease_makes_its_node_down,
    bad_requests_are_refused_with_what_was_wrong,
);

async fn next(watch: &mut Watch) -> Event {
    tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("no event before the deadline")
        .expect("the watch ended")
        .expect("the watch failed")
}

fn conflict_found(r: Result<u64, StoreError>) -> u64 {
    match r {
        Err(StoreError::Conflict { found, .. }) => found,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

async fn put_get_delete_stamp_revisions(s: &Subject) {
    let store = &*s.store;
    assert_eq!(store.get("/a").await.unwrap(), None);
    let r1 = store
        .put("/a", b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    assert_eq!(
        store.put("/b", b"x".to_vec(), Expect::Any, None).await.unwrap(),
        r1 + 1
    );
    let r3 = store
        .put("/a", b"2".to_vec(), Expect::Revision(r1), None)
        .await
        .unwrap();
    assert_eq!(r3, r1 + 2);
    assert_eq!(
        store.get("/a").await.unwrap(),
        Some(KeyValue {
            key: "/a".into(),
            value: b"2".to_vec(),
            create_revision: r1,
            mod_revision: r3,
            lease: None,
        })
    );
    assert_eq!(store.delete("/a", Expect::Revision(r3)).await.unwrap(), r3 + 1);
    assert_eq!(store.get("/a").await.unwrap(), None);
    // Created again: a new create revision.
    let r5 = store
        .put("/a", b"3".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    assert_eq!(r5, r3 + 2);
    assert_eq!(store.get("/a").await.unwrap().unwrap().create_revision, r5);
    // Deleting an absent key with Any changes nothing and says where the store is.
    assert_eq!(store.delete("/nope", Expect::Any).await.unwrap(), r5);
    assert_eq!(store.delete("/nope", Expect::Absent).await.unwrap(), r5);
    assert_eq!(store.delete("/b", Expect::Any).await.unwrap(), r5 + 1);
}

async fn a_write_whose_expectation_fails_changes_nothing(s: &Subject) {
    let store = &*s.store;
    let r1 = store
        .put("/k", b"v1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let r2 = store
        .put("/k", b"v2".to_vec(), Expect::Revision(r1), None)
        .await
        .unwrap();

    assert_eq!(
        conflict_found(store.put("/k", b"x".to_vec(), Expect::Absent, None).await),
        r2
    );
    assert_eq!(
        conflict_found(store.put("/k", b"x".to_vec(), Expect::Revision(r1), None).await),
        r2
    );
    assert_eq!(
        conflict_found(store.put("/new", b"x".to_vec(), Expect::Revision(r1), None).await),
        0
    );
    // Revision 0 is "never written": it matches no key, absent ones included.
    assert_eq!(
        conflict_found(store.put("/new", b"x".to_vec(), Expect::Revision(0), None).await),
        0
    );
    assert_eq!(conflict_found(store.delete("/k", Expect::Revision(r1)).await), r2);
    assert_eq!(conflict_found(store.delete("/k", Expect::Absent).await), r2);
    assert_eq!(
        conflict_found(store.delete("/new", Expect::Revision(r2)).await),
        0
    );

    let (kvs, revision) = store.list("/").await.unwrap();
    assert_eq!(revision, r2);
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].value, b"v2");
    let err = store
        .put("/k", vec![], Expect::Revision(r1), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read it again and retry"), "{err}");
}

async fn list_returns_the_prefix_in_key_order_with_the_revision_of_the_read(s: &Subject) {
    let store = &*s.store;
    let mut last = 0;
    for key in ["/v/c", "/v/a", "/w/a", "/v/b", "/u", "/v"] {
        last = store
            .put(key, key.as_bytes().to_vec(), Expect::Absent, None)
            .await
            .unwrap();
    }
    let (kvs, revision) = store.list("/v/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/v/a", "/v/b", "/v/c"]);
    assert_eq!(revision, last);
    let (all, _) = store.list("").await.unwrap();
    assert_eq!(all.len(), 6);
    let (none, revision) = store.list("/x").await.unwrap();
    assert!(none.is_empty());
    assert_eq!(revision, last);
}

async fn two_clients_racing_compare_and_put_exactly_one_wins(s: &Subject) {
    let clients = [s.store.clone(), s.second_client().await];
    let mut revision = clients[0]
        .put("/race", b"start".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    for round in 0..20u32 {
        // Both read the same revision, then both try to replace it.
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let attempts: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let client = client.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let read = client.get("/race").await.unwrap().unwrap().mod_revision;
                    barrier.wait().await;
                    let value = format!("{round}-{i}").into_bytes();
                    (
                        read,
                        client.put("/race", value, Expect::Revision(read), None).await,
                    )
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut lost = Vec::new();
        for (i, attempt) in attempts.into_iter().enumerate() {
            let (read, result) = attempt.await.unwrap();
            assert_eq!(read, revision, "both clients read the last write");
            match result {
                Ok(r) => won.push((i, r)),
                Err(StoreError::Conflict { found, .. }) => lost.push(found),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: exactly one wins, got {won:?}");
        let (winner, new_revision) = won[0];
        assert_eq!(lost, [new_revision], "the loser is told the winner's revision");
        let kv = clients[1].get("/race").await.unwrap().unwrap();
        assert_eq!(kv.value, format!("{round}-{winner}").into_bytes());
        assert_eq!(kv.mod_revision, new_revision);
        revision = new_revision;
    }
}

async fn many_writers_of_one_counter_lose_no_update(s: &Subject) {
    let first = s
        .store
        .put("/counter", b"0".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    const WRITERS: usize = 4;
    const INCREMENTS: usize = 10;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 {
            s.store.clone()
        } else {
            s.second_client().await
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS {
                loop {
                    let kv = store.get("/counter").await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    let value = (n + 1).to_string().into_bytes();
                    match store
                        .put("/counter", value, Expect::Revision(kv.mod_revision), None)
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let kv = s.store.get("/counter").await.unwrap().unwrap();
    assert_eq!(kv.value, (WRITERS * INCREMENTS).to_string().into_bytes());
    assert_eq!(kv.mod_revision, first + (WRITERS * INCREMENTS) as u64);
}

async fn a_watch_delivers_every_change_under_its_prefix_in_order(s: &Subject) {
    let store = s.store.clone();
    let first = store
        .put("/v/a", b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    store
        .put("/other", b"x".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    // From the beginning: the history, then what comes.
    let mut watch = store.watch("/v/", 0).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), first);
    let writer = {
        let store = s.second_client().await;
        tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..50u32 {
                let key = format!("/v/{}", i % 5);
                made.push(
                    store
                        .put(&key, i.to_le_bytes().to_vec(), Expect::Any, None)
                        .await
                        .unwrap(),
                );
                store.put("/other", vec![], Expect::Any, None).await.unwrap();
            }
            made.push(store.delete("/v/a", Expect::Any).await.unwrap());
            made
        })
    };
    let mut seen = Vec::new();
    loop {
        let event = next(&mut watch).await;
        assert!(event.key().starts_with("/v/"), "{event:?}");
        seen.push(event.revision());
        if matches!(event, Event::Delete { .. }) {
            break;
        }
    }
    assert_eq!(seen, writer.await.unwrap());
}

async fn a_watch_from_a_revision_starts_exactly_there_and_a_future_one_waits(s: &Subject) {
    let store = &*s.store;
    let mut made = Vec::new();
    for i in 0..5u8 {
        made.push(store.put("/k", vec![i], Expect::Any, None).await.unwrap());
    }
    let mut watch = store.watch("/k", made[2]).await.unwrap();
    for expected in &made[2..] {
        assert_eq!(next(&mut watch).await.revision(), *expected);
    }
    let last = made[4];
    let mut future = store.watch("/k", last + 2).await.unwrap();
    store.put("/k", vec![6], Expect::Any, None).await.unwrap();
    store.put("/k", vec![7], Expect::Any, None).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), last + 1);
    assert_eq!(next(&mut watch).await.revision(), last + 2);
    match next(&mut future).await {
        Event::Put(kv) => assert_eq!((kv.mod_revision, kv.value), (last + 2, vec![7])),
        other => panic!("{other:?}"),
    }
}

async fn a_watch_from_forgotten_history_ends_with_compacted(s: &Subject) {
    // The embedded store forgets by keeping a bounded history: a short one here.
    let short;
    let s = match s.etcd {
        Some(_) => s,
        None => {
            short = Subject::embedded(Options {
                history_events: SHORT_HISTORY,
                ..Options::default()
            });
            &short
        }
    };
    let store = &*s.store;
    let mut made = Vec::new();
    for i in 0..10u8 {
        made.push(store.put("/k", vec![i], Expect::Any, None).await.unwrap());
    }
    let kept = made[made.len() - SHORT_HISTORY];
    s.forget_history_before(kept).await;
    // Refused at once, or ended by the first item: either way the watcher lists again.
    match store.watch("/", made[1]).await {
        Err(StoreError::Compacted { requested, compacted }) => {
            assert_eq!(requested, made[1]);
            assert!(compacted > made[1] && compacted <= kept, "{compacted}");
        }
        Err(e) => panic!("{e}"),
        Ok(mut watch) => match tokio::time::timeout(DEADLINE, watch.next()).await.unwrap() {
            Some(Err(StoreError::Compacted { requested, compacted })) => {
                assert_eq!(requested, made[1]);
                assert!(compacted > made[1] && compacted <= kept, "{compacted}");
                assert!(watch.next().await.is_none(), "nothing after the end");
            }
            other => panic!("expected the watch to end with Compacted, got {other:?}"),
        },
    }
    // From what is kept, it is served.
    let mut watch = store.watch("/", kept).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), kept);
}

async fn revoking_a_lease_deletes_its_keys(s: &Subject) {
    let store = &*s.store;
    let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
    store
        .put("/l/a", b"a".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    store
        .put("/l/b", b"b".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    store
        .put("/l/c", b"c".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    // Moved off the lease by a put without it.
    store
        .put("/l/b", b"b2".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let before = store
        .put("/l/d", b"d".to_vec(), Expect::Absent, Some(lease))
        .await
        .unwrap();
    assert_eq!(store.get("/l/d").await.unwrap().unwrap().lease, Some(lease));
    store.keep_alive(lease).await.unwrap();

    let mut watch = store.watch("/l/", before + 1).await.unwrap();
    store.revoke(lease).await.unwrap();
    let deleted = [next(&mut watch).await, next(&mut watch).await];
    let keys: Vec<_> = deleted
        .iter()
        .map(|e| match e {
            Event::Delete { key, mod_revision } => {
                assert!(*mod_revision > before);
                key.as_str()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(keys, ["/l/a", "/l/d"]);
    let (kvs, _) = store.list("/l/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, vec!["/l/b", "/l/c"]);

    assert!(matches!(store.keep_alive(lease).await, Err(StoreError::LeaseExpired(l)) if l == lease));
    assert!(matches!(
        store.put("/l/e", vec![], Expect::Any, Some(lease)).await,
        Err(StoreError::LeaseExpired(_))
    ));
    // Revoking again is harmless; a lease never granted cannot be renewed.
    store.revoke(lease).await.unwrap();
    assert!(store.keep_alive(LeaseId(12345)).await.is_err());
    assert_ne!(store.grant_lease(Duration::from_secs(1)).await.unwrap(), lease);
}

async fn an_expired_lease_takes_its_keys_with_it(s: &Subject) {
    let store = &*s.store;
    let long = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
    store
        .put("/alive/long", vec![], Expect::Absent, Some(long))
        .await
        .unwrap();
    let mut watch = store.watch("/alive/", 0).await.unwrap();
    assert_eq!(next(&mut watch).await.key(), "/alive/long");

    let short = store.grant_lease(Duration::from_millis(50)).await.unwrap();
    // The lease may already be gone on a slow machine: then the put is refused, as it should be.
    match store
        .put("/alive/short", vec![], Expect::Absent, Some(short))
        .await
    {
        Ok(revision) => {
            assert_eq!(next(&mut watch).await.revision(), revision);
            match next(&mut watch).await {
                Event::Delete { key, mod_revision } => {
                    assert_eq!(key, "/alive/short");
                    assert!(mod_revision > revision);
                }
                other => panic!("{other:?}"),
            }
        }
        Err(StoreError::LeaseExpired(l)) => assert_eq!(l, short),
        Err(e) => panic!("{e}"),
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while store.keep_alive(short).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the short lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.get("/alive/long").await.unwrap().is_some());
    store.keep_alive(long).await.unwrap();
}

/// The agent's notion of a node being up is its leased liveness key: a lease nobody renews makes
/// the node down, as `basalt node ls` shows it.
async fn a_lapsed_lease_makes_its_node_down(s: &Subject) {
    let store = &*s.store;
    for (name, ttl) in [("kept", 3600), ("lapsing", 1)] {
        let rec = NodeRecord {
            name: NodeName::new(name).unwrap(),
            address: "10.0.0.1".parse().unwrap(),
            api_url: String::new(),
            labels: Default::default(),
            pools: Vec::new(),
            ports: basalt_agent::model::PortRange {
                first: 20000,
                last: 20100,
            },
            cordoned: false,
            draining: false,
            initiator: None,
        };
        basalt_agent::daemon::register(store, &rec).await.unwrap();
        let lease = store.grant_lease(Duration::from_secs(ttl)).await.unwrap();
        store::put_json(
            store,
            &keys::node_alive(&rec.name),
            &NodeAlive { since_unix: 1 },
            Expect::Any,
            Some(lease),
        )
        .await
        .unwrap();
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let up = node_states(store).await;
        if up == [("kept".to_string(), true), ("lapsing".to_string(), false)] {
            break;
        }
        assert!(
            up.iter().any(|(n, u)| n == "kept" && *u),
            "the renewed node went down: {up:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lapsed node stayed up: {up:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each node and whether it is up, as `basalt node ls` shows them.
async fn node_states(store: &dyn Store) -> Vec<(String, bool)> {
    let views = basalt_agent::api::volumes::node_views(store).await.unwrap();
    views
        .into_iter()
        .map(|v| (v.record.name.to_string(), v.up))
        .collect()
}

async fn bad_requests_are_refused_with_what_was_wrong(s: &Subject) {
    let store = &*s.store;
    let (_, before) = store.list("").await.unwrap();
    let err = store.put("", vec![], Expect::Any, None).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest { .. }), "{err}");
    let err = store
        .put("/big", vec![b'x'; 9 << 20], Expect::Any, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    assert!(store.grant_lease(Duration::ZERO).await.is_err());
    assert!(store
        .put("/k", vec![], Expect::Any, Some(LeaseId(77)))
        .await
        .is_err());
    // Nothing was written.
    assert_eq!(store.list("").await.unwrap(), (vec![], before));
}

// What only a store on the network has: members that die and come back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_watch_resumes_where_it_was_when_its_member_restarts() {
    let mut member = EtcdMember::start();
    let store = member.store().await;
    let first = store
        .put("/w/a", b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let mut watch = store.watch("/w/", first).await.unwrap();
    assert_eq!(next(&mut watch).await.revision(), first);

    member.kill();
    member.restart();
    // A second client writes once the member is back; the watch, resumed, delivers each change once.
    let writer = member.store().await;
    let mut made = Vec::new();
    for i in 0..5u8 {
        made.push(writer.put("/w/b", vec![i], Expect::Any, None).await.unwrap());
    }
    made.push(writer.delete("/w/a", Expect::Any).await.unwrap());
    let mut seen = Vec::new();
    for _ in 0..made.len() {
        seen.push(next(&mut watch).await.revision());
    }
    assert_eq!(seen, made);
    assert!(made[0] > first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_is_unavailable_naming_the_endpoint_and_up_again_works() {
    let mut member = EtcdMember::start();
    let store = member.store().await;
    store
        .put("/k", b"v".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    assert!(store.outage().is_none());

    member.kill();
    let err = store.get("/k").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let port = member.client_url.rsplit(':').next().unwrap().to_string();
    assert!(
        err.to_string().contains(&port),
        "the error names the endpoint: {err}"
    );
    let err = store
        .put("/k", b"w".to_vec(), Expect::Any, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(store.outage().is_some());

    member.restart();
    store
        .wait_until_reachable(support::etcd::START_DEADLINE)
        .await
        .unwrap();
    assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"v");
    assert!(store.outage().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_dead_endpoint_in_the_list_is_skipped() {
    let member = EtcdMember::start();
    let dead = format!("http://127.0.0.1:{}", support::etcd::free_port());
    let store = EtcdStore::new(&basalt_agent::store::etcd::EtcdOptions {
        endpoints: vec![dead, member.client_url.clone()],
        tls: None,
    })
    .unwrap();
    store
        .wait_until_reachable(support::etcd::START_DEADLINE)
        .await
        .unwrap();
    let r = store
        .put("/k", b"v".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    assert_eq!(store.get("/k").await.unwrap().unwrap().mod_revision, r);
}

#[tokio::test]
async fn etcd_unreachable_at_start_is_a_bounded_wait_naming_the_endpoints() {
    let port = support::etcd::free_port();
    let store = EtcdStore::new(&basalt_agent::store::etcd::EtcdOptions {
        endpoints: vec![format!("127.0.0.1:{port}")],
        tls: None,
    })
    .unwrap();
    let started = std::time::Instant::now();
    let err = store
        .wait_until_reachable(Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("did not answer"),
        "{text}"
    );
}
