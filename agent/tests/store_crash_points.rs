//! Deterministic crash-point enumeration: a scripted workload runs on a store that "crashes" after
//! its k-th change to its files (every later write, sync, rename, truncation or removal fails and
//! does nothing), for every k. `kill -9` keeps every completed system call, so this visits every
//! instant at which a process crash can cut the store's sequence of file changes, including the
//! short windows a random kill (store_crash.rs) almost never hits: between an append and its sync,
//! inside a compaction (snapshot written, renamed, directory synced, log emptied), inside an open
//! (a torn tail cut off, the log's magic written).
//!
//! After each crash the directory is opened again by a store without a budget and checked: every
//! acknowledged change is there, with its value, lease and revision; the one change in flight is
//! wholly there or wholly absent (a revoke's deletions included); and the next change continues
//! the revisions.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_agent::store::embedded::{EmbeddedStore, Options};
use basalt_agent::store::{Expect, LeaseId, Revision, Store};

#[derive(Clone, Debug)]
enum Step {
    /// Put `value` at `key`, under the `lease`-th lease granted so far if given.
    Put {
        key: usize,
        value: usize,
        lease: Option<usize>,
    },
    Delete(usize),
    Grant,
    /// Revoke the n-th lease granted so far.
    Revoke(usize),
    Reopen,
}

fn script() -> Vec<Step> {
    use Step::*;
    let put = |key, value| Put {
        key,
        value,
        lease: None,
    };
    let mut s: Vec<Step> = (0..6).map(|k| put(k, 0)).collect();
    s.extend([
        Grant,
        Put {
            key: 6,
            value: 0,
            lease: Some(0),
        },
        Put {
            key: 7,
            value: 0,
            lease: Some(0),
        },
        Delete(1),
        put(2, 1),
        Reopen,
        Grant,
        Put {
            key: 8,
            value: 0,
            lease: Some(1),
        },
        Revoke(0),
    ]);
    s.extend((0..5).map(|k| put(k, 2)));
    s.extend([Delete(3), Reopen, put(9, 0), Revoke(1), put(1, 3)]);
    s
}

fn key(k: usize) -> String {
    format!("/k/{k}")
}

/// Large enough that the tiny compaction threshold below is crossed every few changes.
fn value(k: usize, v: usize) -> Vec<u8> {
    format!("{k}:{v}:").repeat(40).into_bytes()
}

fn options(crash_after: Option<Arc<AtomicI64>>) -> Options {
    Options {
        compact_after_bytes: 1024,
        crash_after,
        ..Options::default()
    }
}

/// What the store must hold: each key's value and lease, and the revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    revision: Revision,
    keys: BTreeMap<String, (Vec<u8>, Option<LeaseId>)>,
}

impl Model {
    fn apply(&mut self, step: &Step, leases: &[LeaseId]) {
        match step {
            Step::Put {
                key: k,
                value: v,
                lease,
            } => {
                self.revision += 1;
                self.keys
                    .insert(key(*k), (value(*k, *v), lease.map(|l| leases[l])));
            }
            Step::Delete(k) => {
                if self.keys.remove(&key(*k)).is_some() {
                    self.revision += 1;
                }
            }
            Step::Revoke(l) => {
                let before = self.keys.len();
                self.keys.retain(|_, (_, lease)| *lease != Some(leases[*l]));
                self.revision += (before - self.keys.len()) as u64;
            }
            Step::Grant | Step::Reopen => {}
        }
    }
}

/// What a run acknowledged, and the step that failed (in flight when the crash came), if any.
struct Run {
    acked: Model,
    in_flight: Option<Step>,
    leases: Vec<LeaseId>,
}

async fn run_script(dir: &Path, crash_after: Option<Arc<AtomicI64>>) -> Run {
    let mut run = Run {
        acked: Model::default(),
        in_flight: None,
        leases: Vec::new(),
    };
    let Ok(mut store) = EmbeddedStore::open_with(dir, options(crash_after.clone())) else {
        return run;
    };
    for step in script() {
        let done = match &step {
            Step::Put {
                key: k,
                value: v,
                lease,
            } => {
                let lease = lease.map(|l| run.leases[l]);
                store
                    .put(&key(*k), value(*k, *v), Expect::Any, lease)
                    .await
                    .map(Some)
            }
            Step::Delete(k) => store.delete(&key(*k), Expect::Any).await.map(Some),
            Step::Grant => store.grant_lease(Duration::from_secs(3600)).await.map(|lease| {
                run.leases.push(lease);
                None
            }),
            Step::Revoke(l) => store.revoke(run.leases[*l]).await.map(|()| None),
            Step::Reopen => {
                drop(store);
                match EmbeddedStore::open_with(dir, options(crash_after.clone())) {
                    Ok(reopened) => {
                        store = reopened;
                        Ok(None)
                    }
                    // A crash during the open: nothing logical was in flight.
                    Err(_) => return run,
                }
            }
        };
        match done {
            Ok(revision) => {
                run.acked.apply(&step, &run.leases);
                if let Some(revision) = revision {
                    assert_eq!(
                        revision, run.acked.revision,
                        "{step:?} was acknowledged at an unexpected revision"
                    );
                }
            }
            Err(_) => {
                run.in_flight = Some(step);
                return run;
            }
        }
    }
    run
}

async fn observe(dir: &Path) -> (Model, Arc<EmbeddedStore>) {
    let store = EmbeddedStore::open_with(dir, options(None)).unwrap();
    let (kvs, revision) = store.list("").await.unwrap();
    let keys = kvs.into_iter().map(|kv| (kv.key, (kv.value, kv.lease))).collect();
    (Model { revision, keys }, store)
}

#[tokio::test]
async fn every_crash_point_keeps_what_was_acknowledged() {
    // How many file changes the whole script makes.
    let total = {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(AtomicI64::new(1 << 40));
        let run = run_script(dir.path(), Some(budget.clone())).await;
        assert!(
            run.in_flight.is_none(),
            "the script failed without a crash: {:?}",
            run.in_flight
        );
        let (found, _) = observe(dir.path()).await;
        assert_eq!(found, run.acked);
        (1i64 << 40) - budget.load(Ordering::SeqCst)
    };
    assert!(total > 50, "the script made only {total} file changes");

    let (mut kept, mut dropped) = (0, 0);
    for k in 0..=total {
        let dir = tempfile::tempdir().unwrap();
        let run = run_script(dir.path(), Some(Arc::new(AtomicI64::new(k)))).await;
        let (found, store) = observe(dir.path()).await;
        if found == run.acked {
            dropped += usize::from(run.in_flight.is_some());
        } else {
            let mut with_in_flight = run.acked.clone();
            let step = run.in_flight.as_ref().unwrap_or_else(|| {
                panic!("crash after {k} changes: nothing in flight, but the store holds {found:?} instead of {:?}", run.acked)
            });
            with_in_flight.apply(step, &run.leases);
            assert_eq!(
                found, with_in_flight,
                "crash after {k} changes: the store holds neither the acknowledged changes nor them plus {step:?}"
            );
            kept += 1;
        }
        // The revisions continue from what survived.
        let next = store.put("/after", vec![], Expect::Absent, None).await.unwrap();
        assert_eq!(next, found.revision + 1, "crash after {k} changes");
    }
    // Both outcomes of a change in flight were met: the enumeration cut appends before and after
    // they reached the file.
    assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");
}
