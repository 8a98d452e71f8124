//! The embedded store survives `kill -9` at any moment.
//!
//! The test re-executes its own binary as a child (marked by an environment variable) that opens
//! the store and changes it without end: creates, updates and deletes (with revision checks),
//! lease grants, puts under leases, revokes. Before each change it prints what it is about to do,
//! after it the acknowledged revision. The parent kills it with SIGKILL after a random delay
//! (during its open, a change, a sync or a compaction: the log is compacted often here), many
//! times over, and after each kill opens the store itself and checks it against a model built
//! from the child's lines: every acknowledged change is there with its value, lease and revision,
//! and the one change that was in flight is either wholly there or wholly absent (a revoke's
//! deletions included). Then the next child continues on the same directory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use basalt_agent::store::embedded::{EmbeddedStore, Options, SNAPSHOT_FILE};
use basalt_agent::store::{Expect, LeaseId, Revision, Store};
use serde::{Deserialize, Serialize};

/// Set in the child: the store's directory.
const CHILD_DIR_ENV: &str = "BASALT_STORE_CRASH_CHILD_DIR";
/// Set in the child: the seed of its choices.
const CHILD_SEED_ENV: &str = "BASALT_STORE_CRASH_CHILD_SEED";
const TEST_NAME: &str = "acknowledged_changes_survive_kill_9_at_any_moment";

/// How long the parent keeps killing children once it has done the minimum below.
const RUN_FOR: Duration = Duration::from_secs(20);
/// At least this many kills and acknowledged changes, however slow the machine.
const MIN_KILLS: usize = 30;
const MIN_ACKS: usize = 300;
/// A bound on the whole test on a machine so slow that the minimum takes this long: then it
/// fails as stuck rather than running forever.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// The longest a child lives: long enough for a few dozen changes, short enough for many kills.
const MAX_CHILD_LIFE_MS: u64 = 150;
/// Key names the child picks from, so that updates and deletes are frequent.
const KEY_NAMES: u64 = 40;

fn options() -> Options {
    Options {
        // Tiny: a compaction every few dozen changes, so that kills land in them too.
        compact_after_bytes: 2048,
        ..Options::default()
    }
}

/// One change, as the child announces it.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Change {
    Put {
        key: String,
        value: String,
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
    Grant,
    Revoke {
        lease: i64,
    },
}

#[test]
fn acknowledged_changes_survive_kill_9_at_any_moment() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        let seed = std::env::var(CHILD_SEED_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        child(Path::new(&dir), seed);
        // The child changes the store until it is killed; returning is a failure.
        std::process::exit(3);
    }
    parent();
}

/// A small deterministic generator (xorshift64*): the seed of a failing run reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// Changes the store at `dir` until killed, announcing each change and its acknowledgement.
fn child(dir: &Path, seed: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open_with(dir, options()).unwrap();
        let (kvs, revision) = store.list("").await.unwrap();
        say(&format!("open {revision}"));
        // The child's view: each key's revision and lease, and the leases it knows.
        let mut keys: BTreeMap<String, (Revision, Option<LeaseId>)> = kvs
            .iter()
            .map(|kv| (kv.key.clone(), (kv.mod_revision, kv.lease)))
            .collect();
        let mut leases: Vec<LeaseId> = kvs.iter().filter_map(|kv| kv.lease).collect();
        leases.sort_by_key(|l| l.0);
        leases.dedup();
        let mut rng = Rng(seed | 1);
        loop {
            let name = format!("/k/{}", rng.below(KEY_NAMES));
            let value = format!("{:x}", rng.next()).repeat(1 + rng.below(4) as usize);
            let choice = rng.below(100);
            let lease = match leases.len() {
                0 => None,
                n if choice >= 90 => Some(leases[rng.below(n as u64) as usize]),
                _ => None,
            };
            let change = match choice {
                0..70 | 90.. => Change::Put {
                    key: name.clone(),
                    value,
                    lease: lease.map(|l| l.0),
                },
                70..82 if keys.contains_key(&name) => Change::Delete { key: name.clone() },
                82..86 => Change::Grant,
                86..90 if !leases.is_empty() => Change::Revoke {
                    lease: leases[rng.below(leases.len() as u64) as usize].0,
                },
                _ => continue,
            };
            say(&format!("try {}", serde_json::to_string(&change).unwrap()));
            let expect = match keys.get(&name) {
                Some((revision, _)) => Expect::Revision(*revision),
                None => Expect::Absent,
            };
            match change {
                Change::Put { key, value, .. } => {
                    let revision = store.put(&key, value.into_bytes(), expect, lease).await.unwrap();
                    keys.insert(key, (revision, lease));
                    say(&format!("ack {revision}"));
                }
                Change::Delete { key } => {
                    let revision = store.delete(&key, expect).await.unwrap();
                    keys.remove(&key);
                    say(&format!("ack {revision}"));
                }
                Change::Grant => {
                    let lease = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
                    leases.push(lease);
                    say("ack 0");
                }
                Change::Revoke { lease } => {
                    let lease = LeaseId(lease);
                    store.revoke(lease).await.unwrap();
                    keys.retain(|_, (_, l)| *l != Some(lease));
                    leases.retain(|l| *l != lease);
                    say("ack 0");
                }
            }
        }
    });
}

/// What the store must hold: each key's value, lease and revision, and the store's revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    revision: Revision,
    keys: BTreeMap<String, (String, Option<i64>, Revision)>,
}

impl Model {
    /// Applies `change`; `acked` is the revision the child reported for a put or delete.
    fn apply(&mut self, change: &Change, acked: Option<Revision>) {
        match change {
            Change::Put { key, value, lease } => {
                self.revision += 1;
                self.keys
                    .insert(key.clone(), (value.clone(), *lease, self.revision));
            }
            Change::Delete { key } => {
                self.revision += 1;
                self.keys.remove(key);
            }
            Change::Grant => {}
            Change::Revoke { lease } => {
                let before = self.keys.len();
                self.keys.retain(|_, (_, l, _)| *l != Some(*lease));
                self.revision += (before - self.keys.len()) as u64;
            }
        }
        if let Some(acked) = acked.filter(|&r| r != 0) {
            assert_eq!(
                acked, self.revision,
                "the child was acknowledged {change:?} at another revision than the model's"
            );
        }
    }
}

/// What the store at `dir` holds, read by the parent.
fn observe(runtime: &tokio::runtime::Runtime, dir: &Path) -> Model {
    runtime.block_on(async {
        let store = EmbeddedStore::open_with(dir, options()).unwrap();
        let (kvs, revision) = store.list("").await.unwrap();
        let keys = kvs
            .into_iter()
            .map(|kv| {
                let value = String::from_utf8(kv.value).unwrap();
                (kv.key, (value, kv.lease.map(|l| l.0), kv.mod_revision))
            })
            .collect();
        Model { revision, keys }
    })
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut rng = Rng((clock.as_nanos() as u64 ^ u64::from(std::process::id())) | 1);
    let mut model = Model::default();
    let (mut kills, mut acks, mut in_flight_applied, mut in_flight_lost) = (0usize, 0usize, 0usize, 0usize);
    while kills < MIN_KILLS || acks < MIN_ACKS || started.elapsed() < RUN_FOR {
        assert!(
            started.elapsed() < GIVE_UP_AFTER,
            "no progress: {kills} kills, {acks} acknowledged changes"
        );
        let seed = rng.next();
        let stderr_path = dir.path().join("child.stderr");
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path().join("store"))
            .env(CHILD_SEED_ENV, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.below(MAX_CHILD_LIFE_MS)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the child (seed {seed}) stopped on its own ({status}): {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        kills += 1;

        // Replay the child's account on the model: acknowledged changes for sure, the last
        // announced one perhaps.
        let mut pending: Option<Change> = None;
        for line in &lines {
            if let Some(json) = line.strip_prefix("try ") {
                pending = Some(serde_json::from_str(json).unwrap());
            } else if let Some(revision) = line.strip_prefix("ack ") {
                let change = pending.take().expect("an ack without a change");
                model.apply(&change, Some(revision.parse().unwrap()));
                acks += 1;
            }
        }
        let found = observe(&runtime, &dir.path().join("store"));
        if found == model {
            in_flight_lost += usize::from(pending.is_some());
            continue;
        }
        let with_pending = pending.as_ref().map(|change| {
            let mut m = model.clone();
            m.apply(change, None);
            m
        });
        assert_eq!(
            Some(&found),
            with_pending.as_ref(),
            "after kill {kills} (child seed {seed}) the store holds neither the acknowledged changes nor them plus the one in flight ({pending:?}); acknowledged: {model:?}"
        );
        in_flight_applied += 1;
        model = found;
    }
    assert!(
        dir.path().join("store").join(SNAPSHOT_FILE).exists(),
        "no compaction happened"
    );
    eprintln!(
        "{kills} kills, {acks} acknowledged changes, the change in flight kept {in_flight_applied} times and dropped {in_flight_lost} times, final revision {}",
        model.revision
    );
}
