//! The embedded store's state in memory, and the pure decisions about it.
//!
//! Every change goes the same way: a `plan_*` function reads the state and decides, without
//! touching it, which operations the change consists of (or refuses it: a revision that does not
//! match, a lease that is gone); the caller writes those operations to the log; then
//! [`State::apply`] makes them true in memory. Replay at open calls the same [`State::apply`], so
//! what a restarted store holds is by construction what the running one held.
//!
//! Time is an argument (`now`), never read here, so lease decisions are tested without waiting.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::codec::{Op, Snapshot};
use crate::store::{Event, Expect, KeyValue, LeaseId, Revision, StoreError};

/// The longest key the store takes. Keys are paths of a few names; a longer one is a bug in the
/// caller, and a bound keeps a single record from growing without limit.
pub const MAX_KEY_BYTES: usize = 4096;
/// The largest value the store takes. Records are small JSON documents; a value this large is a
/// bug in the caller (and etcd, the other store, refuses far smaller requests by default).
pub const MAX_VALUE_BYTES: usize = 8 << 20;
/// The longest lease. Leases say "this holder is alive" and are renewed every few seconds; a
/// longer one would keep a dead holder's keys for longer than anyone would wait.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);

/// A lease in memory: its length, when it ends unless renewed, and the keys that end with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Lease {
    pub ttl: Duration,
    pub deadline: Instant,
    pub keys: BTreeSet<String>,
}

/// Everything the store holds, plus the recent events watches are served from.
#[derive(Debug)]
pub(super) struct State {
    pub revision: Revision,
    /// The last batch applied.
    pub seq: u64,
    /// The id the next granted lease gets (ids are never reused, even across restarts).
    pub next_lease: i64,
    pub kvs: BTreeMap<String, KeyValue>,
    pub leases: HashMap<LeaseId, Lease>,
    /// The events of revisions `history_base + 1 ..= revision`, in order: one per revision.
    history: VecDeque<Event>,
    history_base: Revision,
    history_limit: usize,
    /// The history's size (keys and values), bounded too: values can be large.
    history_bytes: usize,
    history_bytes_limit: usize,
}

impl State {
    /// An empty store.
    pub fn new(history_limit: usize) -> State {
        State {
            revision: 0,
            seq: 0,
            next_lease: 1,
            kvs: BTreeMap::new(),
            leases: HashMap::new(),
            history: VecDeque::new(),
            history_base: 0,
            history_limit: history_limit.max(1),
            history_bytes: 0,
            history_bytes_limit: usize::MAX,
        }
    }

    /// Bounds the history's size in bytes as well as in events.
    pub fn limit_history_bytes(&mut self, bytes: usize) {
        self.history_bytes_limit = bytes;
        self.trim_history();
    }

    /// The state a snapshot holds; its leases run `ttl` from `now` (the holders of the previous
    /// process get one full lease length to renew them).
    pub fn from_snapshot(snapshot: Snapshot, history_limit: usize, now: Instant) -> Result<State, String> {
        // Counters this large are never reached by counting (one per change); they can only come
        // from a damaged or forged file, and would overflow on the next change.
        if snapshot.revision > u64::MAX / 2 || snapshot.seq > u64::MAX / 2 {
            return Err(format!(
                "its counters ({} changes, revision {}) are beyond any count of changes",
                snapshot.seq, snapshot.revision
            ));
        }
        let mut state = State::new(history_limit);
        state.revision = snapshot.revision;
        state.seq = snapshot.seq;
        // Ids start at 1 and are handed out counting up; a next id outside that range can only be
        // damage, and one too low would hand out an id again.
        if snapshot.next_lease < 1 || snapshot.next_lease > i64::MAX / 2 {
            return Err(format!(
                "its next lease id {} is outside 1..{}",
                snapshot.next_lease,
                i64::MAX / 2
            ));
        }
        state.next_lease = snapshot.next_lease;
        state.history_base = snapshot.revision;
        for (id, ttl) in snapshot.leases {
            if id.0 >= snapshot.next_lease {
                return Err(format!(
                    "lease {} is not below the next lease id {}",
                    id.0, snapshot.next_lease
                ));
            }
            let earlier = state.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: deadline(now, ttl),
                    keys: BTreeSet::new(),
                },
            );
            if earlier.is_some() {
                return Err(format!("lease {} appears twice", id.0));
            }
        }
        for kv in snapshot.kvs {
            if kv.create_revision == 0
                || kv.create_revision > kv.mod_revision
                || kv.mod_revision > snapshot.revision
            {
                return Err(format!(
                    "{} has revisions {}..{} outside 1..{}",
                    kv.key, kv.create_revision, kv.mod_revision, snapshot.revision
                ));
            }
            if let Some(id) = kv.lease {
                let lease = state.leases.get_mut(&id).ok_or_else(|| {
                    format!(
                        "{} belongs to lease {}, which the snapshot does not hold",
                        kv.key, id.0
                    )
                })?;
                lease.keys.insert(kv.key.clone());
            }
            if state.kvs.insert(kv.key.clone(), kv).is_some() {
                return Err("a key appears twice".to_string());
            }
        }
        Ok(state)
    }

    /// The whole state, for writing a snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let mut leases: Vec<_> = self.leases.iter().map(|(id, l)| (*id, l.ttl)).collect();
        leases.sort_by_key(|(id, _)| id.0);
        Snapshot {
            seq: self.seq,
            revision: self.revision,
            next_lease: self.next_lease,
            leases,
            kvs: self.kvs.values().cloned().collect(),
        }
    }

    /// Every key under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect()
    }

    /// The events under `prefix` from revision `from` on, or the first revision still held if
    /// `from` is older.
    pub fn events_since(&self, prefix: &str, from: Revision) -> Result<Vec<Event>, StoreError> {
        // Revision 0 is "from the beginning": servable while nothing has been dropped yet.
        let from = from.max(1);
        if from <= self.history_base {
            return Err(StoreError::Compacted {
                requested: from,
                compacted: self.history_base + 1,
            });
        }
        let skip = usize::try_from(from - self.history_base - 1).unwrap_or(usize::MAX);
        Ok(self
            .history
            .iter()
            .skip(skip)
            .filter(|e| e.key().starts_with(prefix))
            .cloned()
            .collect())
    }

    /// Whether `lease` can take keys and be renewed at `now`.
    fn live_lease(&self, lease: LeaseId, now: Instant) -> Result<&Lease, StoreError> {
        match self.leases.get(&lease) {
            Some(l) if l.deadline > now => Ok(l),
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    /// The operations of a put, and the revision it gets.
    pub fn plan_put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
        now: Instant,
    ) -> Result<(Vec<Op>, Revision), StoreError> {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::InvalidRequest {
                key: key.to_string(),
                reason: format!(
                    "the value is {} bytes, more than the store's limit of {MAX_VALUE_BYTES}",
                    value.len()
                ),
            });
        }
        check_expect(key, expect, self.kvs.get(key))?;
        if let Some(lease) = lease {
            self.live_lease(lease, now)?;
        }
        let revision = self.revision + 1;
        let op = Op::Put {
            revision,
            key: key.to_string(),
            value,
            lease,
        };
        Ok((vec![op], revision))
    }

    /// The operations of a delete (none if the key is already absent), and the revision after it.
    pub fn plan_delete(&self, key: &str, expect: Expect) -> Result<(Vec<Op>, Revision), StoreError> {
        check_key(key)?;
        let current = self.kvs.get(key);
        check_expect(key, expect, current)?;
        if current.is_none() {
            return Ok((Vec::new(), self.revision));
        }
        let revision = self.revision + 1;
        let op = Op::Delete {
            revision,
            key: key.to_string(),
        };
        Ok((vec![op], revision))
    }

    /// The operation of a grant, and the new lease's id.
    pub fn plan_grant(&self, ttl: Duration) -> Result<(Vec<Op>, LeaseId), StoreError> {
        if ttl.is_zero() || ttl > MAX_LEASE_TTL {
            return Err(StoreError::InvalidRequest {
                key: "(lease)".to_string(),
                reason: format!(
                    "a lease of {ttl:?} is outside what the store grants (more than zero, at most {MAX_LEASE_TTL:?})"
                ),
            });
        }
        let lease = LeaseId(self.next_lease);
        Ok((vec![Op::Grant { lease, ttl }], lease))
    }

    /// The operations that end `lease`: the deletion of each of its keys, then its end. None if
    /// it is already gone; if `only_expired_at` is given, none unless it has expired by then (a
    /// lease renewed since the expiry timer looked is kept).
    pub fn plan_end_lease(&self, lease: LeaseId, only_expired_at: Option<Instant>) -> Vec<Op> {
        let Some(l) = self.leases.get(&lease) else {
            return Vec::new();
        };
        if only_expired_at.is_some_and(|now| l.deadline > now) {
            return Vec::new();
        }
        let mut ops: Vec<Op> = l
            .keys
            .iter()
            .zip(self.revision + 1..)
            .map(|(key, revision)| Op::Delete {
                revision,
                key: key.clone(),
            })
            .collect();
        ops.push(Op::EndLease { lease });
        ops
    }

    /// Renews `lease` at `now`.
    pub fn keep_alive(&mut self, lease: LeaseId, now: Instant) -> Result<(), StoreError> {
        self.live_lease(lease, now)?;
        if let Some(l) = self.leases.get_mut(&lease) {
            l.deadline = deadline(now, l.ttl);
        }
        Ok(())
    }

    /// The leases that have expired at `now`, and the earliest deadline of the others.
    pub fn expiries(&self, now: Instant) -> (Vec<LeaseId>, Option<Instant>) {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, l) in &self.leases {
            if l.deadline <= now {
                expired.push(*id);
            } else {
                next = Some(next.map_or(l.deadline, |n| n.min(l.deadline)));
            }
        }
        expired.sort_by_key(|id| id.0);
        (expired, next)
    }

    /// Makes one logged operation true. The checks fail only on a log that contradicts itself
    /// (replay of a damaged or foreign file); a planned operation always applies.
    pub fn apply(&mut self, op: Op, now: Instant) -> Result<(), String> {
        match op {
            Op::Put {
                revision,
                key,
                value,
                lease,
            } => {
                self.check_next_revision(revision)?;
                if let Some(id) = lease {
                    let l = self
                        .leases
                        .get_mut(&id)
                        .ok_or_else(|| format!("{key} is put with lease {}, which does not exist", id.0))?;
                    l.keys.insert(key.clone());
                }
                let previous = self.kvs.get(&key);
                let create_revision = previous.map_or(revision, |kv| kv.create_revision);
                let old_lease = previous.and_then(|kv| kv.lease).filter(|old| Some(*old) != lease);
                if let Some(old) = old_lease {
                    if let Some(l) = self.leases.get_mut(&old) {
                        l.keys.remove(&key);
                    }
                }
                let kv = KeyValue {
                    key: key.clone(),
                    value,
                    create_revision,
                    mod_revision: revision,
                    lease,
                };
                self.kvs.insert(key, kv.clone());
                self.record(Event::Put(kv));
            }
            Op::Delete { revision, key } => {
                self.check_next_revision(revision)?;
                let kv = self
                    .kvs
                    .remove(&key)
                    .ok_or_else(|| format!("{key} is deleted at revision {revision} but does not exist"))?;
                if let Some(l) = kv.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(&key);
                }
                self.record(Event::Delete {
                    key,
                    mod_revision: revision,
                });
            }
            Op::Grant { lease, ttl } => {
                if lease.0 < self.next_lease {
                    return Err(format!("lease {} is granted again", lease.0));
                }
                self.next_lease = lease.0.saturating_add(1);
                self.leases.insert(
                    lease,
                    Lease {
                        ttl,
                        deadline: deadline(now, ttl),
                        keys: BTreeSet::new(),
                    },
                );
            }
            Op::EndLease { lease } => {
                let l = self
                    .leases
                    .remove(&lease)
                    .ok_or_else(|| format!("lease {} ends but does not exist", lease.0))?;
                if let Some(key) = l.keys.first() {
                    return Err(format!("lease {} ends while {key} still belongs to it", lease.0));
                }
            }
        }
        Ok(())
    }

    fn check_next_revision(&mut self, revision: Revision) -> Result<(), String> {
        if self.revision.checked_add(1) != Some(revision) {
            return Err(format!(
                "revision {revision} follows revision {}: a change is missing",
                self.revision
            ));
        }
        self.revision = revision;
        Ok(())
    }

    fn record(&mut self, event: Event) {
        self.history_bytes += event_bytes(&event);
        self.history.push_back(event);
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.history_limit || self.history_bytes > self.history_bytes_limit {
            let Some(dropped) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= event_bytes(&dropped);
            self.history_base += 1;
        }
    }
}

/// What an event weighs in the history: its key, its value and a fixed overhead.
fn event_bytes(event: &Event) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD
        + event.key().len()
        + match event {
            Event::Put(kv) => kv.value.len(),
            Event::Delete { .. } => 0,
        }
}

/// `now + ttl`, or as far as an `Instant` goes (`ttl` is bounded by [`MAX_LEASE_TTL`] for new
/// leases, but one read from a file is not).
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .or_else(|| now.checked_add(MAX_LEASE_TTL))
        .unwrap_or(now)
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let reason = if key.is_empty() {
        "the key is empty".to_string()
    } else if key.len() > MAX_KEY_BYTES {
        format!(
            "the key is {} bytes, more than the store's limit of {MAX_KEY_BYTES}",
            key.len()
        )
    } else {
        return Ok(());
    };
    let shown: String = key.chars().take(80).collect();
    Err(StoreError::InvalidRequest { key: shown, reason })
}

/// Whether `expect` holds for the key's `current` value.
pub(super) fn check_expect(key: &str, expect: Expect, current: Option<&KeyValue>) -> Result<(), StoreError> {
    let found = current.map_or(0, |kv| kv.mod_revision);
    let holds = match expect {
        Expect::Any => true,
        Expect::Absent => current.is_none(),
        Expect::Revision(r) => current.is_some() && found == r,
    };
    if holds {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key: key.to_string(),
            expected: expect,
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Plans and applies, as the store does (minus the log).
    fn put(
        s: &mut State,
        key: &str,
        value: &[u8],
        expect: Expect,
        lease: Option<LeaseId>,
        now: Instant,
    ) -> Revision {
        let (ops, rev) = s.plan_put(key, value.to_vec(), expect, lease, now).unwrap();
        for op in ops {
            s.apply(op, now).unwrap();
        }
        rev
    }

    fn grant(s: &mut State, ttl: Duration, now: Instant) -> LeaseId {
        let (ops, id) = s.plan_grant(ttl).unwrap();
        for op in ops {
            s.apply(op, now).unwrap();
        }
        id
    }

    #[test]
    fn expectations_hold_exactly_as_documented() {
        let kv = KeyValue {
            key: "k".into(),
            value: vec![],
            create_revision: 3,
            mod_revision: 5,
            lease: None,
        };
        assert!(check_expect("k", Expect::Any, None).is_ok());
        assert!(check_expect("k", Expect::Any, Some(&kv)).is_ok());
        assert!(check_expect("k", Expect::Absent, None).is_ok());
        assert!(check_expect("k", Expect::Revision(5), Some(&kv)).is_ok());
        let found = |r: Result<(), StoreError>| match r {
            Err(StoreError::Conflict { found, .. }) => found,
            other => panic!("expected a conflict, got {other:?}"),
        };
        assert_eq!(found(check_expect("k", Expect::Absent, Some(&kv))), 5);
        assert_eq!(found(check_expect("k", Expect::Revision(4), Some(&kv))), 5);
        assert_eq!(found(check_expect("k", Expect::Revision(0), None)), 0);
        assert_eq!(found(check_expect("k", Expect::Revision(5), None)), 0);
    }

    #[test]
    fn a_put_keeps_the_create_revision_and_moves_the_key_between_leases() {
        let now = Instant::now();
        let mut s = State::new(100);
        let a = grant(&mut s, SECOND, now);
        let b = grant(&mut s, SECOND, now);
        assert_eq!(put(&mut s, "k", b"1", Expect::Absent, Some(a), now), 1);
        assert_eq!(put(&mut s, "k", b"2", Expect::Revision(1), Some(b), now), 2);
        let kv = &s.kvs["k"];
        assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (1, 2, Some(b)));
        assert!(s.leases[&a].keys.is_empty());
        assert!(s.leases[&b].keys.contains("k"));
        // Ending lease a now deletes nothing; ending b deletes k.
        assert_eq!(s.plan_end_lease(a, None), vec![Op::EndLease { lease: a }]);
        assert_eq!(
            s.plan_end_lease(b, None),
            vec![
                Op::Delete {
                    revision: 3,
                    key: "k".into()
                },
                Op::EndLease { lease: b }
            ]
        );
    }

    #[test]
    fn a_lease_lives_ttl_past_its_last_renewal_and_not_a_moment_longer() {
        let t0 = Instant::now();
        let mut s = State::new(100);
        let id = grant(&mut s, 10 * SECOND, t0);
        assert_eq!(s.expiries(t0 + 9 * SECOND), (vec![], Some(t0 + 10 * SECOND)));
        s.keep_alive(id, t0 + 9 * SECOND).unwrap();
        assert_eq!(s.expiries(t0 + 18 * SECOND).0, vec![]);
        assert!(s.plan_end_lease(id, Some(t0 + 18 * SECOND)).is_empty());
        assert_eq!(s.expiries(t0 + 19 * SECOND).0, vec![id]);
        assert_eq!(
            s.plan_end_lease(id, Some(t0 + 19 * SECOND)),
            vec![Op::EndLease { lease: id }]
        );
        // Expired but not yet ended: it can neither be renewed nor take keys.
        assert!(matches!(
            s.keep_alive(id, t0 + 19 * SECOND),
            Err(StoreError::LeaseExpired(_))
        ));
        assert!(matches!(
            s.plan_put("k", vec![], Expect::Any, Some(id), t0 + 19 * SECOND),
            Err(StoreError::LeaseExpired(_))
        ));
    }

    #[test]
    fn bad_requests_are_refused_with_what_was_wrong() {
        let now = Instant::now();
        let s = State::new(100);
        let invalid = |r: Result<(Vec<Op>, Revision), StoreError>| match r {
            Err(StoreError::InvalidRequest { reason, .. }) => reason,
            other => panic!("expected an invalid request, got {other:?}"),
        };
        assert!(invalid(s.plan_put("", vec![], Expect::Any, None, now)).contains("empty"));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(invalid(s.plan_put(&long, vec![], Expect::Any, None, now)).contains("limit"));
        assert!(
            invalid(s.plan_put("k", vec![0; MAX_VALUE_BYTES + 1], Expect::Any, None, now)).contains("limit")
        );
        assert!(invalid(s.plan_delete("", Expect::Any)).contains("empty"));
        assert!(s.plan_grant(Duration::ZERO).is_err());
        assert!(s.plan_grant(MAX_LEASE_TTL + SECOND).is_err());
        assert!(matches!(
            s.plan_put("k", vec![], Expect::Any, Some(LeaseId(42)), now),
            Err(StoreError::LeaseExpired(LeaseId(42)))
        ));
    }

    #[test]
    fn deleting_an_absent_key_changes_nothing() {
        let mut s = State::new(100);
        put(&mut s, "a", b"1", Expect::Absent, None, Instant::now());
        assert_eq!(s.plan_delete("b", Expect::Any).unwrap(), (vec![], 1));
        assert_eq!(s.plan_delete("b", Expect::Absent).unwrap(), (vec![], 1));
        assert!(s.plan_delete("b", Expect::Revision(1)).is_err());
    }

    #[test]
    fn history_keeps_the_last_events_and_says_where_it_starts() {
        let now = Instant::now();
        let mut s = State::new(3);
        for i in 0..5u8 {
            put(&mut s, &format!("k{i}"), &[i], Expect::Absent, None, now);
        }
        // Revisions 3, 4, 5 are held; 1 and 2 are gone.
        let revisions = |evs: Vec<Event>| evs.iter().map(Event::revision).collect::<Vec<_>>();
        assert_eq!(revisions(s.events_since("", 3).unwrap()), vec![3, 4, 5]);
        assert!(matches!(
            s.events_since("", 2),
            Err(StoreError::Compacted {
                requested: 2,
                compacted: 3
            })
        ));
        assert_eq!(revisions(s.events_since("k4", 4).unwrap()), vec![5]);
        assert_eq!(revisions(s.events_since("", 6).unwrap()), Vec::<u64>::new());
        // A byte bound drops the oldest until the rest fits.
        s.limit_history_bytes(2 * (64 + 2 + 1));
        assert_eq!(revisions(s.events_since("", 4).unwrap()), vec![4, 5]);
        assert!(s.events_since("", 3).is_err());
    }

    #[test]
    fn a_snapshot_restores_the_state_with_leases_counted_from_the_open() {
        let t0 = Instant::now();
        let mut s = State::new(100);
        let id = grant(&mut s, 10 * SECOND, t0);
        put(&mut s, "a", b"1", Expect::Absent, Some(id), t0);
        put(&mut s, "b", b"2", Expect::Absent, None, t0);
        let t1 = t0 + 60 * SECOND;
        let restored = State::from_snapshot(s.snapshot(), 100, t1).unwrap();
        assert_eq!(restored.kvs, s.kvs);
        assert_eq!(restored.revision, 2);
        assert_eq!(restored.next_lease, 2);
        assert_eq!(restored.leases[&id].deadline, t1 + 10 * SECOND);
        assert!(restored.leases[&id].keys.contains("a"));
        // Watching from before the snapshot is refused; from after it is served.
        assert!(restored.events_since("", 2).is_err());
        assert!(restored.events_since("", 3).unwrap().is_empty());
    }

    #[test]
    fn a_snapshot_with_a_bad_next_lease_or_a_lease_twice_is_refused() {
        let t0 = Instant::now();
        let mut s = State::new(10);
        let id = grant(&mut s, 10 * SECOND, t0);
        for next_lease in [0, -5, i64::MAX] {
            let mut snapshot = s.snapshot();
            snapshot.next_lease = next_lease;
            let err = State::from_snapshot(snapshot, 10, t0).unwrap_err();
            assert!(err.contains("next lease id"), "{next_lease}: {err}");
        }
        let mut twice = s.snapshot();
        twice.leases.push((id, 5 * SECOND));
        let err = State::from_snapshot(twice, 10, t0).unwrap_err();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn a_snapshot_with_counters_no_count_reaches_is_refused() {
        let mut snapshot = State::new(1).snapshot();
        snapshot.revision = u64::MAX;
        let err = State::from_snapshot(snapshot, 1, Instant::now()).unwrap_err();
        assert!(err.contains("beyond any count"), "{err}");
    }

    #[test]
    fn a_log_that_contradicts_itself_is_refused_at_replay() {
        let now = Instant::now();
        let s = || State::new(100);
        let gap = Op::Put {
            revision: 2,
            key: "k".into(),
            value: vec![],
            lease: None,
        };
        assert!(s().apply(gap, now).unwrap_err().contains("missing"));
        let unknown_lease = Op::Put {
            revision: 1,
            key: "k".into(),
            value: vec![],
            lease: Some(LeaseId(9)),
        };
        assert!(s().apply(unknown_lease, now).unwrap_err().contains("lease 9"));
        let absent = Op::Delete {
            revision: 1,
            key: "nope".into(),
        };
        assert!(s().apply(absent, now).unwrap_err().contains("does not exist"));
        let end_unknown = Op::EndLease { lease: LeaseId(3) };
        assert!(s().apply(end_unknown, now).unwrap_err().contains("lease 3"));
    }

    /// Keys and leases point at each other, and the history is one event per revision up to
    /// the current one.
    fn check_invariants(s: &State) -> Result<(), TestCaseError> {
        for kv in s.kvs.values() {
            if let Some(id) = kv.lease {
                prop_assert!(
                    s.leases[&id].keys.contains(&kv.key),
                    "{} missing from its lease",
                    kv.key
                );
            }
        }
        for (id, lease) in &s.leases {
            for key in &lease.keys {
                prop_assert_eq!(s.kvs[key].lease, Some(*id));
            }
        }
        let revisions: Vec<Revision> = s.history.iter().map(Event::revision).collect();
        let expected: Vec<Revision> = (s.history_base + 1..=s.revision).collect();
        prop_assert_eq!(revisions, expected);
        Ok(())
    }

    proptest! {
        #[test]
        fn any_state_keeps_its_invariants_and_survives_a_snapshot(
            steps in proptest::collection::vec((0u8..5, 0usize..4, any::<u8>(), 0usize..3), 0..60),
        ) {
            let now = Instant::now();
            let mut s = State::new(16);
            let mut leases = Vec::new();
            for (kind, key, value, lease) in steps {
                let key = ["a", "a/b", "b", "c"][key];
                let lease = leases.get(lease).copied();
                let planned = match kind {
                    0 | 1 => s.plan_put(key, vec![value], Expect::Any, lease, now).map(|(ops, _)| ops),
                    2 => s.plan_delete(key, Expect::Any).map(|(ops, _)| ops),
                    3 => s.plan_grant(SECOND).map(|(ops, id)| {
                        leases.push(id);
                        ops
                    }),
                    _ => Ok(lease.map_or_else(Vec::new, |l| s.plan_end_lease(l, None))),
                };
                // A refused plan (a revoked lease) changes nothing; a planned one always applies.
                if let Ok(ops) = planned {
                    for op in ops {
                        prop_assert_eq!(s.apply(op, now), Ok(()));
                    }
                }
                check_invariants(&s)?;
            }
            let restored = State::from_snapshot(s.snapshot(), 16, now).unwrap();
            prop_assert_eq!(&restored.kvs, &s.kvs);
            prop_assert_eq!(&restored.leases, &s.leases);
            prop_assert_eq!((restored.revision, restored.next_lease), (s.revision, s.next_lease));
        }
    }
}
