//! Crash test: a child process writes, flushes, snapshots and deletes snapshots in a loop and is killed
//! with SIGKILL at a random instant, many times over on the same directory. After each kill the store
//! is reopened and checked against what the child reported:
//!
//! * every block acknowledged before the last completed flush reads back exactly;
//! * a block written after it reads back as one of the contents it had since (old or new) -- and never
//!   as a checksum error;
//! * every snapshot whose creation was acknowledged and whose deletion was not started exists, with
//!   exactly the content the volume had when it was taken (checked by reverting a copy of the directory).
//!
//! The child's writes go one by one and in batches (`Store::write_batch`, one index-log append for
//! many writes), so a kill also lands between a batch's records and its data writes.
//!
//! The child is this same test binary re-executed with [`CHILD_DIR`] set; it reports on stdout, one
//! line per event, *before* it starts each operation and after each acknowledged flush or snapshot
//! operation, so the parent knows exactly what may and must have survived.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use basalt_replica::store::{Store, StoreError};
use rand::{Rng, SeedableRng};

const CHILD_DIR: &str = "BASALT_STORE_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "BASALT_STORE_CRASH_CHILD_SEED";
const BLOCKS: u64 = 1024;
const SIZE: u64 = BLOCKS * 4096;
/// Kills per run: enough to hit every phase of the loop many times, within ~30 s.
const ITERATIONS: u64 = 40;
const TEST_NAME: &str = "kill_9_at_any_instant_keeps_flushed_writes_and_snapshots_intact";

/// The content of one sector of a write, a pure function of where it goes and the write's seed.
fn sector(lba: u64, sector: u64, seed: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.wrapping_mul(0xC2B2_AE3D) ^ seed;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn report(line: String) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "@@ {line}").unwrap();
    out.flush().unwrap();
}

/// The child: loops until killed.
fn child(dir: &Path, seed: u64) -> ! {
    let store = Store::open_or_create(dir, SIZE, None).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut snapshots: Vec<String> = store.snapshot_list().into_iter().map(|s| s.name).collect();
    let mut n = 0u64;
    report("R".into());
    loop {
        n += 1;
        let lba = rng.random_range(0..BLOCKS);
        match rng.random_range(0..100) {
            0..15 => {
                // A batch as the server's ordered lane hands it over: whole blocks (some adjacent,
                // some repeated) and sector writes, reported one by one before the batch starts.
                let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut at = lba;
                for _ in 0..rng.random_range(2..=8) {
                    let (first, count) = if rng.random_range(0..4) == 0 {
                        let first = rng.random_range(0..8u64);
                        (first, rng.random_range(1..=8 - first))
                    } else {
                        (0, 8)
                    };
                    let value = rng.random::<u64>();
                    report(format!("W {at} {first} {count} {value}"));
                    let data: Vec<u8> = (first..first + count)
                        .flat_map(|s| sector(at, s, value))
                        .collect();
                    writes.push((at * 4096 + first * 512, data));
                    at = match rng.random_range(0..3) {
                        0 => at,
                        1 => (at + 1) % BLOCKS,
                        _ => rng.random_range(0..BLOCKS),
                    };
                }
                let batch: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
                for result in store.write_batch(&batch) {
                    result.unwrap();
                }
            }
            15..70 => {
                let value = rng.random::<u64>();
                report(format!("W {lba} 0 8 {value}"));
                let data: Vec<u8> = (0..8).flat_map(|s| sector(lba, s, value)).collect();
                store.write(lba * 4096, &data).unwrap();
            }
            70..82 => {
                let first = rng.random_range(0..8u64);
                let count = rng.random_range(1..=8 - first);
                let value = rng.random::<u64>();
                report(format!("W {lba} {first} {count} {value}"));
                let data: Vec<u8> = (first..first + count)
                    .flat_map(|s| sector(lba, s, value))
                    .collect();
                store.write(lba * 4096 + first * 512, &data).unwrap();
            }
            82..90 => {
                report(format!("U {lba}"));
                store.unmap(lba * 4096, 4096).unwrap();
            }
            90..94 => {
                store.flush().unwrap();
                report("F".into());
            }
            94..97 => {
                let name = format!("s{seed}-{n}");
                report(format!("S {name}"));
                store.snapshot_create(&name).unwrap();
                report(format!("s {name}"));
                snapshots.push(name);
            }
            _ => {
                if snapshots.len() >= 2 {
                    let name = snapshots.remove(rng.random_range(0..snapshots.len()));
                    report(format!("X {name}"));
                    store.snapshot_delete(&name).unwrap();
                    report(format!("x {name}"));
                }
            }
        }
    }
}

/// What the parent knows about the volume.
struct Model {
    /// Content as of the last acknowledged flush.
    durable: Vec<Vec<u8>>,
    /// Content after the last write issued (completed or not).
    latest: Vec<Vec<u8>>,
    /// Every content a block had since the last flush: any of them (or `durable`) may survive.
    since_flush: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Acknowledged snapshots and the whole-volume content they captured.
    snapshots: BTreeMap<String, Vec<u8>>,
    /// A snapshot create or delete that was started but not acknowledged.
    creating: Option<(String, Vec<u8>)>,
    deleting: Option<String>,
}

impl Model {
    fn volume(blocks: &[Vec<u8>]) -> Vec<u8> {
        blocks.concat()
    }

    fn flushed(&mut self) {
        self.durable = self.latest.clone();
        self.since_flush.clear();
    }

    fn apply(&mut self, line: &str) {
        let words: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| words[i].parse::<u64>().unwrap();
        match words[0] {
            "W" => {
                let (lba, first, count, value) = (num(1), num(2), num(3), num(4));
                let block = &mut self.latest[lba as usize];
                for s in first..first + count {
                    block[(s * 512) as usize..((s + 1) * 512) as usize]
                        .copy_from_slice(&sector(lba, s, value));
                }
                self.since_flush.entry(lba).or_default().push(block.clone());
            }
            "U" => {
                let lba = num(1);
                self.latest[lba as usize] = vec![0; 4096];
                self.since_flush.entry(lba).or_default().push(vec![0; 4096]);
            }
            "F" => self.flushed(),
            "S" => self.creating = Some((words[1].to_string(), Self::volume(&self.latest))),
            "s" => {
                let (name, content) = self.creating.take().unwrap();
                assert_eq!(name, words[1]);
                self.snapshots.insert(name, content);
                // A snapshot create flushes the head first.
                self.flushed();
            }
            "X" => self.deleting = Some(words[1].to_string()),
            "x" => {
                assert_eq!(self.deleting.take().as_deref(), Some(words[1]));
                self.snapshots.remove(words[1]);
            }
            "R" => {}
            other => panic!("unknown report {other:?}"),
        }
    }

    /// Checks the reopened store and then adopts what it holds as the new truth.
    fn verify(&mut self, dir: &Path, iteration: u64) {
        let store = Store::open(dir).unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
        for lba in 0..BLOCKS {
            let mut got = vec![0u8; 4096];
            match store.read(lba * 4096, &mut got) {
                Ok(()) => {}
                Err(StoreError::ChecksumMismatch { lba }) => {
                    panic!("iteration {iteration}: checksum error on block {lba} after kill -9")
                }
                Err(e) => panic!("iteration {iteration}: read of block {lba} failed: {e}"),
            }
            let ok = got == self.durable[lba as usize]
                || self.since_flush.get(&lba).is_some_and(|c| c.contains(&got));
            assert!(
                ok,
                "iteration {iteration}: block {lba} is neither its flushed content nor a later write"
            );
            self.latest[lba as usize] = got;
        }
        self.flushed();

        let listed: Vec<String> = store.snapshot_list().into_iter().map(|s| s.name).collect();
        drop(store);
        for name in self.snapshots.keys() {
            assert!(
                listed.contains(name) || self.deleting.as_ref() == Some(name),
                "iteration {iteration}: acknowledged snapshot {name} is lost (have {listed:?})"
            );
        }
        let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for name in &listed {
            let content = match (self.snapshots.get(name), &self.creating) {
                (Some(content), _) => content.clone(),
                (None, Some((creating, content))) if creating == name => content.clone(),
                _ => panic!("iteration {iteration}: unexpected snapshot {name} (listed {listed:?})"),
            };
            expected.insert(name.clone(), content);
        }
        if !listed.is_empty() {
            check_snapshot_contents(dir, &listed, &expected, iteration);
        }
        self.snapshots = expected;
        self.creating = None;
        self.deleting = None;
    }
}

/// Reverts a copy of the directory to each snapshot, newest first, and compares the whole volume.
fn check_snapshot_contents(
    dir: &Path,
    listed: &[String],
    expected: &BTreeMap<String, Vec<u8>>,
    iteration: u64,
) {
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let store = Store::open(copy.path()).unwrap();
    for name in listed.iter().rev() {
        store.snapshot_revert(name).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        store
            .read(0, &mut got)
            .unwrap_or_else(|e| panic!("iteration {iteration}: snapshot {name}: {e}"));
        let want = &expected[name];
        if got != *want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "iteration {iteration}: snapshot {name} changed at block {}",
                first / 4096
            );
        }
    }
}

#[test]
fn kill_9_at_any_instant_keeps_flushed_writes_and_snapshots_intact() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        child(Path::new(&dir), seed);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model {
        durable: vec![vec![0; 4096]; BLOCKS as usize],
        latest: vec![vec![0; 4096]; BLOCKS as usize],
        since_flush: BTreeMap::new(),
        snapshots: BTreeMap::new(),
        creating: None,
        deleting: None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xBA5A17);
    let exe = std::env::current_exe().unwrap();
    let mut events = 0usize;
    for iteration in 0..ITERATIONS {
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_SEED, iteration.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test <name> ... " without a newline just before the first report.
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the child never became ready");
        assert_eq!(first, "R");
        // Kill right after the child announced its N-th operation, so the kill lands inside that
        // operation (between a log append and its data write, mid-snapshot, mid-merge...) rather than
        // mostly inside fsyncs, which is where a child spends its time.
        let target = rng.random_range(1..150);
        let mut seen = Vec::new();
        while seen.len() < target {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => seen.push(line),
                Err(e) => panic!("iteration {iteration}: the child stopped reporting: {e}"),
            }
        }
        if rng.random_bool(0.3) {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        }
        // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "the child exited by itself: {status:?}");
        reader.join().unwrap();
        for line in seen.into_iter().chain(rx.try_iter()) {
            model.apply(&line);
            events += 1;
        }
        model.verify(dir.path(), iteration);
    }
    eprintln!("{ITERATIONS} kills, {events} events checked");
    assert!(
        events > ITERATIONS as usize * 10,
        "the child did too little work between kills ({events} events)"
    );
}
