//! What the controller is told so that its replicas become the placement's: pure decisions.
//!
//! Failover changes a volume's placement in the store (a lost replica replaced, a draining one
//! doubled and then dropped); the controller learns of it only through its management API,
//! `ReplicaAdd` / `ReplicaRemove`, which record the new membership on the replicas (so a
//! restarted controller follows it, whatever its `--replica` list says). The agent running the
//! controller compares the placement with the controller's `VolumeInfo` every pass and asks for
//! the difference, one step at a time, in this order:
//!
//! 1. **A member the placement dropped that is not read-write is removed first.** It is a lost
//!    replica (ERR: its node is down) and holds no write the others lack; removing it before the
//!    replacement is added keeps the membership, and so the majority the controller counts, from
//!    growing past what the running replicas can meet.
//! 2. **A placed replica the controller lacks is added** once its own node reports it running
//!    (before that, the controller would only find it unreachable). It is rebuilt online.
//! 3. **A member the placement dropped that is read-write is removed only when every placed
//!    replica is read-write** (a drain: its replacement is in sync). The controller refuses too,
//!    on its own, to go below min-healthy read-write replicas; this rule keeps the volume at its
//!    full count of copies throughout.
//!
//! Nothing is asked of a controller that does not serve: it could not rebuild, and a volume that
//! does not serve needs its replicas back, not new ones.

use crate::model::{Progress, ReplicaMode};

/// One replica as the controller reports it (`VolumeInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewedReplica {
    /// `HOST:PORT`, as the controller was given it.
    pub address: String,
    pub mode: ReplicaMode,
    /// Removed for good (`replica rm`); still listed by the controller.
    pub removed: bool,
    /// A rebuild in progress (WO).
    pub rebuild: Option<Progress>,
    /// A clone replica's copy of its source, until it is hydrated.
    pub hydration: Option<Progress>,
}

/// A replica the placement wants, as the controller's node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub address: String,
    /// Its own node reports its service running.
    pub running: bool,
}

/// One request to the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `ReplicaAdd`: a new (or returning) member, rebuilt online.
    Add { address: String },
    /// `ReplicaRemove`: out of the membership for good.
    Remove { address: String },
}

/// The next requests that make the controller's members `wanted` (see the module docs). At most
/// one removal of a read-write member per call: the next pass sees its effect before another.
pub fn changes(wanted: &[Wanted], serving: bool, members: &[ViewedReplica]) -> Vec<Change> {
    if !serving {
        return Vec::new();
    }
    let current: Vec<&ViewedReplica> = members.iter().filter(|m| !m.removed).collect();
    let is_wanted = |address: &str| wanted.iter().any(|w| w.address == address);
    let mut out = Vec::new();
    for m in current
        .iter()
        .filter(|m| !is_wanted(&m.address) && m.mode != ReplicaMode::Rw)
    {
        out.push(Change::Remove {
            address: m.address.clone(),
        });
    }
    for w in wanted {
        let member = current.iter().any(|m| m.address == w.address);
        // A replica the controller removed for good is never added back at the same address:
        // the engine refuses it, and a replacement always gets a new one.
        let removed = members.iter().any(|m| m.address == w.address && m.removed);
        if !member && !removed && w.running {
            out.push(Change::Add {
                address: w.address.clone(),
            });
        }
    }
    let all_placed_in_sync = wanted.iter().all(|w| {
        current
            .iter()
            .any(|m| m.address == w.address && m.mode == ReplicaMode::Rw)
    });
    if all_placed_in_sync {
        if let Some(m) = current
            .iter()
            .find(|m| !is_wanted(&m.address) && m.mode == ReplicaMode::Rw)
        {
            out.push(Change::Remove {
                address: m.address.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(address: &str, mode: ReplicaMode) -> ViewedReplica {
        ViewedReplica {
            address: address.into(),
            mode,
            removed: false,
            rebuild: None,
            hydration: None,
        }
    }

    fn wanted(address: &str, running: bool) -> Wanted {
        Wanted {
            address: address.into(),
            running,
        }
    }

    #[test]
    fn a_lost_replica_is_removed_before_its_replacement_is_added() {
        let members = [
            member("a:1", ReplicaMode::Rw),
            member("b:1", ReplicaMode::Rw),
            member("c:1", ReplicaMode::Err),
        ];
        let want = [wanted("a:1", true), wanted("b:1", true), wanted("d:1", true)];
        assert_eq!(
            changes(&want, true, &members),
            vec![
                Change::Remove {
                    address: "c:1".into()
                },
                Change::Add {
                    address: "d:1".into()
                }
            ]
        );
    }

    #[test]
    fn a_replacement_is_added_only_once_its_node_runs_it() {
        let members = [member("a:1", ReplicaMode::Rw), member("b:1", ReplicaMode::Rw)];
        let want = [wanted("a:1", true), wanted("b:1", true), wanted("d:1", false)];
        assert!(changes(&want, true, &members).is_empty());
    }

    #[test]
    fn a_drained_replica_leaves_only_when_every_placed_replica_is_in_sync() {
        let want = [wanted("a:1", true), wanted("b:1", true), wanted("d:1", true)];
        let rebuilding = [
            member("a:1", ReplicaMode::Rw),
            member("b:1", ReplicaMode::Rw),
            member("c:1", ReplicaMode::Rw),
            member("d:1", ReplicaMode::Wo),
        ];
        assert!(changes(&want, true, &rebuilding).is_empty());
        let synced = [
            member("a:1", ReplicaMode::Rw),
            member("b:1", ReplicaMode::Rw),
            member("c:1", ReplicaMode::Rw),
            member("d:1", ReplicaMode::Rw),
        ];
        assert_eq!(
            changes(&want, true, &synced),
            vec![Change::Remove {
                address: "c:1".into()
            }]
        );
    }

    #[test]
    fn a_controller_that_does_not_serve_is_asked_nothing() {
        let members = [member("a:1", ReplicaMode::Rw), member("c:1", ReplicaMode::Err)];
        let want = [wanted("a:1", true), wanted("d:1", true)];
        assert!(changes(&want, false, &members).is_empty());
    }

    #[test]
    fn a_removed_address_is_not_added_again() {
        let mut gone = member("c:1", ReplicaMode::Err);
        gone.removed = true;
        let members = [member("a:1", ReplicaMode::Rw), gone];
        let want = [wanted("a:1", true), wanted("c:1", true)];
        assert!(changes(&want, true, &members).is_empty());
    }

    fn mode() -> impl Strategy<Value = ReplicaMode> {
        prop_oneof![
            Just(ReplicaMode::Rw),
            Just(ReplicaMode::Wo),
            Just(ReplicaMode::Err)
        ]
    }

    proptest! {
        /// Whatever the controller reports: a read-write member leaves only while every placed
        /// replica is read-write (the volume keeps its full count of copies), at most one such
        /// member leaves per step, and only replicas whose node runs them are added.
        #[test]
        fn never_fewer_copies_than_placed(
            members in proptest::collection::vec((0u8..6, mode(), any::<bool>()), 0..6),
            want in proptest::collection::vec((0u8..6, any::<bool>()), 0..4),
        ) {
            // A controller lists each address once.
            let mut members: Vec<ViewedReplica> = members.iter().map(|(a, m, removed)| ViewedReplica {
                removed: *removed, ..member(&format!("n{a}:1"), *m)
            }).collect();
            members.sort_by(|x, y| x.address.cmp(&y.address));
            members.dedup_by(|x, y| x.address == y.address);
            let want: Vec<Wanted> = want.iter().map(|(a, r)| wanted(&format!("n{a}:1"), *r)).collect();
            let out = changes(&want, true, &members);
            let rw = |a: &str| members.iter().any(|m| m.address == a && !m.removed && m.mode == ReplicaMode::Rw);
            let rw_removals: Vec<&Change> = out.iter()
                .filter(|c| matches!(c, Change::Remove { address } if rw(address)))
                .collect();
            prop_assert!(rw_removals.len() <= 1);
            if !rw_removals.is_empty() {
                prop_assert!(want.iter().all(|w| rw(&w.address)));
            }
            for c in &out {
                match c {
                    Change::Add { address } => {
                        prop_assert!(want.iter().any(|w| &w.address == address && w.running));
                    }
                    Change::Remove { address } => {
                        prop_assert!(!want.iter().any(|w| &w.address == address));
                    }
                }
            }
        }
    }
}
