//! The embedded store of a one-host cluster: the whole state in memory, every change in an
//! append-only log on disk.
//!
//! ```text
//!   DIR/store.lock       flock'ed by the one process that owns DIR (holds its pid, for errors)
//!   DIR/store.snapshot   the whole state after batch S (absent until the first compaction)
//!   DIR/store.log        magic, then one CRC-framed batch per acknowledged change: S+1, S+2, ...
//! ```
//!
//! A change (put, delete, lease grant, lease end) is planned against the state in memory (the
//! revision checks, in `embedded/state.rs`), appended to the log as one frame and synced (`fdatasync`);
//! only then is it applied in memory, made visible to readers and watchers, and acknowledged.
//! Changes are serialised by one mutex around the log, so the state a change was planned against
//! is the state it is applied to; readers take a read lock on the state and never wait for a
//! sync. A lease's end (revoke or expiry) is one batch holding the deletion of each of its keys
//! and the end of the lease: it is on disk entirely or not at all.
//!
//! Why this survives `kill -9` (or a power loss) at any point:
//! * a change is acknowledged only after its frame is synced, and frames are only appended, so
//!   every acknowledged change is in the log (or in the snapshot) on reopen;
//! * a crash during an append leaves at most one incomplete frame at the end of the log, never
//!   acknowledged (the previous frame was synced before it was written): the reader recognises it
//!   (short, failing its CRC as the last frame, or zeros) and cuts it off. A bad frame with a
//!   whole frame after it is damage, not a crash, and the store refuses to open
//!   ([`StoreError::Corrupt`]) rather than lose what follows;
//! * at open, the log is synced before anything is served: frames a killed process wrote but
//!   never synced may still be only in the page cache, and the new process must not build on them
//!   (hand out later revisions) while a power loss could still take them back;
//! * compaction writes the snapshot to a temporary file, syncs it, renames it over the old one and
//!   syncs the directory, and only then truncates the log. A crash before the rename leaves the
//!   old snapshot and the whole log; a crash after it leaves the new snapshot and a log whose
//!   frames the snapshot already contains: frames carry a sequence number and replay skips those
//!   the snapshot covers. Revisions come from the frames and the snapshot, so they never go back.
//!
//! An append that fails (a full disk) is cut back off the log and refused, and the store carries
//! on. If a sync fails, or a failed append cannot be cut off, what reached the disk is unknown:
//! the store refuses further changes ([`StoreError::Unavailable`]) until the agent is restarted
//! and the log is read again (the failed change was not acknowledged; after the restart it may or
//! may not be there, like a request to etcd that timed out).
//!
//! Watches are served from a bounded history of the latest events in memory (one per revision);
//! a watch from before it, or one that falls that far behind, gets [`StoreError::Compacted`] and
//! lists again. At open the history holds what the log replays (the changes since the snapshot).
//!
//! Leases across a restart: a lease's grant is in the log with its length, but not its renewals.
//! At open, each lease from the previous process is given one full length counted from the open:
//! its holder (restarted too, or still running elsewhere on the host) has that long to renew it,
//! and if nobody does, it expires and its keys are deleted as usual. So a lease's keys never
//! outlive it by more than one length per restart, and a live holder is never cut off by a
//! restart of the store. Lease ids are never reused.

mod codec;
mod state;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::watch;

use self::codec::{Batch, Op, LOG_MAGIC};
use self::state::State;
use super::{Event, Expect, KeyValue, LeaseId, Result, Revision, Store, StoreError, Watch};

pub use self::state::{MAX_KEY_BYTES, MAX_LEASE_TTL, MAX_VALUE_BYTES};

/// The file the owning process holds an exclusive `flock` on.
pub const LOCK_FILE: &str = "store.lock";
/// The append-only log of changes.
pub const LOG_FILE: &str = "store.log";
/// The whole state at the last compaction.
pub const SNAPSHOT_FILE: &str = "store.snapshot";
/// A snapshot being written; removed at open (it was never renamed, so it is not needed).
const SNAPSHOT_TMP_FILE: &str = "store.snapshot.tmp";

/// How many events watches can be served from. A watcher (a reconciler, an API client) that falls
/// further behind lists again, which is cheap on a one-host cluster; this many covers the bursts
/// a one-host cluster makes (every service of every volume reporting at once) many times over.
pub const DEFAULT_HISTORY_EVENTS: usize = 10_000;
/// How many bytes of keys and values watches can be served from: with the count above, the
/// history's memory stays bounded even if some values are large.
pub const DEFAULT_HISTORY_BYTES: usize = 64 << 20;
/// The log is compacted into a snapshot when it grows past this and past the last snapshot's
/// size: replay at open stays short, and a large state is not rewritten more often than the
/// changes to it amount to its own size.
pub const DEFAULT_COMPACT_AFTER_BYTES: u64 = 8 << 20;
/// How long the lease-expiry task waits before trying again to end an expired lease after the
/// store refused (a failed disk): retrying at once would spin.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// Tunables of [`EmbeddedStore::open_with`]; [`EmbeddedStore::open`] takes the defaults.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many recent events watches are served from.
    pub history_events: usize,
    /// How many bytes of keys and values (roughly) those events may hold at most.
    pub history_bytes: usize,
    /// The log size past which it is compacted into a snapshot.
    pub compact_after_bytes: u64,
    /// For crash tests only: the store performs this many more changes to its files (writes,
    /// syncs, renames, truncations, removals), then fails every later one without doing it, as if
    /// the process had been killed at that point (`kill -9` keeps every completed system call).
    #[doc(hidden)]
    pub crash_after: Option<Arc<AtomicI64>>,
    /// For tests only: a compaction meets this barrier twice once it starts writing its snapshot
    /// (before and after the test looks), so a test can act while the snapshot is being written.
    #[doc(hidden)]
    pub compaction_barrier: Option<Arc<std::sync::Barrier>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            history_events: DEFAULT_HISTORY_EVENTS,
            history_bytes: DEFAULT_HISTORY_BYTES,
            compact_after_bytes: DEFAULT_COMPACT_AFTER_BYTES,
            crash_after: None,
            compaction_barrier: None,
        }
    }
}

/// The cluster store of a one-host cluster, kept in a directory (see the module docs).
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    state: RwLock<State>,
    /// Held for the whole of every change: plan, append, sync, apply.
    log: Mutex<Log>,
    /// The revision after the latest change: watches wait on it.
    revision: watch::Sender<Revision>,
    /// Bumped when a lease is granted, so the expiry task looks at the deadlines again; dropped
    /// with the store, which ends the task.
    lease_granted: watch::Sender<u64>,
    /// Holds the `flock` while the store is open.
    _lock: File,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with the default [`Options`]. Must be called
    /// inside a tokio runtime: a task of it expires leases.
    pub fn open(dir: &Path) -> Result<Arc<EmbeddedStore>> {
        EmbeddedStore::open_with(dir, Options::default())
    }

    /// Opens (creating if needed) the store in `dir`: takes the directory's lock, reads the
    /// snapshot and replays the log, cuts off a torn tail, and syncs what it read. The reading is
    /// done on the calling thread: it happens once, before the agent serves anything.
    pub fn open_with(dir: &Path, options: Options) -> Result<Arc<EmbeddedStore>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Unavailable("the embedded store must be opened inside a tokio runtime".to_string())
        })?;
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
            // The new directory's entry must be as durable as the first change made in it.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fsync_dir(parent).map_err(io_error(format!("syncing the directory {}", parent.display())))?;
        }
        let lock = lock_dir(dir)?;
        let now = Instant::now();
        let disk = Disk(options.crash_after.clone());

        let tmp = dir.join(SNAPSHOT_TMP_FILE);
        disk.allow("removing the snapshot being written")
            .and_then(|()| remove_if_exists(&tmp))
            .map_err(io_error(format!("removing {}", tmp.display())))?;
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let (mut state, snapshot_len) = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let snapshot = codec::decode_snapshot(&bytes).map_err(corrupt(&snapshot_path))?;
                let state = State::from_snapshot(snapshot, options.history_events, now)
                    .map_err(corrupt(&snapshot_path))?;
                (state, bytes.len() as u64)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (State::new(options.history_events), 0),
            Err(e) => return Err(io_error(format!("reading {}", snapshot_path.display()))(e)),
        };

        state.limit_history_bytes(options.history_bytes);

        let log_path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_error(format!("reading {}", log_path.display())))?;
        let contents = codec::decode_log(&bytes).map_err(corrupt(&log_path))?;
        let mut len = contents.valid_len as u64;
        if contents.valid_len < bytes.len() {
            tracing::warn!(
                path = %log_path.display(),
                dropped_bytes = bytes.len() - contents.valid_len,
                "cutting off the end of the cluster store's log: a change that was being written when the last process stopped, never acknowledged"
            );
            disk.allow("cutting off a torn tail")
                .and_then(|()| file.set_len(len))
                .map_err(io_error(format!("truncating {}", log_path.display())))?;
        }
        if len == 0 {
            disk.allow("writing the log's magic")
                .and_then(|()| file.write_all(LOG_MAGIC))
                .map_err(io_error(format!("writing {}", log_path.display())))?;
            len = LOG_MAGIC.len() as u64;
        }
        for batch in contents.batches {
            if batch.seq <= state.seq {
                continue;
            }
            if batch.seq != state.seq + 1 {
                return Err(corrupt(&log_path)(format!(
                    "the log continues with change {} but the state read so far ends at change {}: the snapshot is missing or older than the log",
                    batch.seq, state.seq
                )));
            }
            for op in batch.ops {
                state.apply(op, now).map_err(corrupt(&log_path))?;
            }
            state.seq = batch.seq;
        }
        // What the previous process wrote may still be only in the page cache: make it durable
        // before building on it (see the module docs).
        disk.allow("syncing the log at open")
            .and_then(|()| file.sync_all())
            .map_err(io_error(format!("syncing {}", log_path.display())))?;
        disk.allow("syncing the directory at open")
            .and_then(|()| fsync_dir(dir))
            .map_err(io_error(format!("syncing the directory {}", dir.display())))?;

        let revision = state.revision;
        let (lease_granted, wake) = watch::channel(0);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            state: RwLock::new(state),
            log: Mutex::new(Log {
                file,
                path: log_path,
                len,
                snapshot_len,
                compact_after: options.compact_after_bytes,
                retry_compaction_at: 0,
                broken: None,
                disk,
                compaction_barrier: options.compaction_barrier.clone(),
            }),
            revision: watch::Sender::new(revision),
            lease_granted,
            _lock: lock,
        });
        runtime.spawn(expire_leases(Arc::downgrade(&inner), wake));
        Ok(Arc::new(EmbeddedStore { inner }))
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Store for EmbeddedStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>>> {
        Box::pin(async move { Ok(read(&self.inner.state).kvs.get(key).cloned()) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<(Vec<KeyValue>, Revision)>> {
        Box::pin(async move {
            let state = read(&self.inner.state);
            Ok((state.list(prefix), state.revision))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Revision>> {
        let inner = self.inner.clone();
        let key = key.to_string();
        Box::pin(blocking(move || {
            inner.commit(|state, now| state.plan_put(&key, value, expect, lease, now))
        }))
    }

    fn delete<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, Result<Revision>> {
        let inner = self.inner.clone();
        let key = key.to_string();
        Box::pin(blocking(move || {
            inner.commit(|state, _| state.plan_delete(&key, expect))
        }))
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> BoxFuture<'a, Result<Watch>> {
        Box::pin(async move { open_watch(&self.inner, prefix, from) })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            let lease = inner.commit(|state, _| state.plan_grant(ttl))?;
            // Here rather than after the await: a grant whose caller went away must still be
            // timed by the expiry task.
            inner.lease_granted.send_modify(|n| *n = n.wrapping_add(1));
            Ok(lease)
        }))
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // The time the renewal arrived, not the time the lock was free: a renewal sent in
            // time must not expire the lease because a change held the lock meanwhile.
            let arrived = Instant::now();
            write(&self.inner.state).keep_alive(lease, arrived)
        })
    }

    /// Ends `lease` and deletes its keys, in one change. Revoking a lease that is already gone
    /// (expired, revoked, never granted) succeeds: what the caller asked for holds.
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        let inner = self.inner.clone();
        Box::pin(blocking(move || {
            inner.commit(|state, _| Ok((state.plan_end_lease(lease, None), ())))
        }))
    }

    fn kind(&self) -> super::StoreKind {
        super::StoreKind::Embedded
    }
}

impl Inner {
    /// One change: `plan` decides its operations against the current state (and the result to
    /// return), then they are logged, synced and applied, in that order. No operations: nothing
    /// is written.
    fn commit<T>(&self, plan: impl FnOnce(&State, Instant) -> Result<(Vec<Op>, T)>) -> Result<T> {
        let mut log = lock(&self.log);
        log.usable()?;
        let now = Instant::now();
        let (batch, out) = {
            let state = read(&self.state);
            let (ops, out) = plan(&state, now)?;
            (
                Batch {
                    seq: state.seq + 1,
                    ops,
                },
                out,
            )
        };
        if batch.ops.is_empty() {
            return Ok(out);
        }
        let frame = codec::encode_batch(&batch).map_err(StoreError::Unavailable)?;
        log.append(&frame)?;
        let revision = {
            let mut state = write(&self.state);
            for op in batch.ops {
                if let Err(reason) = state.apply(op, now) {
                    // A planned operation always applies; if one does not, memory and log
                    // disagree and only a replay of the log can tell what holds.
                    let reason =
                        format!("a logged change did not apply in memory ({reason}); restart the agent");
                    log.broken = Some(reason.clone());
                    return Err(StoreError::Unavailable(reason));
                }
            }
            state.seq = batch.seq;
            state.revision
        };
        self.revision.send_replace(revision);
        if log.wants_compaction() {
            // A copy taken under a short read lock: writing and syncing it happens with the lock
            // released, since a writer waiting behind a long-held read lock (a lease renewal)
            // would hold back every new reader too.
            let snapshot = read(&self.state).snapshot();
            if let Err(e) = log.compact(&self.dir, &snapshot) {
                // Not before the log has grown as much again: a full disk would otherwise cost a
                // whole snapshot written in vain with every change.
                log.retry_compaction_at = log.len.saturating_add(log.compact_after);
                let tmp = self.dir.join(SNAPSHOT_TMP_FILE);
                let _ = log
                    .disk
                    .allow("removing a failed snapshot")
                    .and_then(|()| remove_if_exists(&tmp));
                tracing::warn!(error = %e, dir = %self.dir.display(), "compacting the cluster store's log failed; it keeps growing until a compaction succeeds");
            }
        }
        Ok(out)
    }
}

/// The log file being appended to.
struct Log {
    file: File,
    path: PathBuf,
    /// Its length: where the next frame goes, and where to cut back to if an append fails.
    len: u64,
    snapshot_len: u64,
    compact_after: u64,
    /// After a failed compaction, the length at which to try again.
    retry_compaction_at: u64,
    /// Why the store refuses changes, after a write whose outcome on disk is unknown.
    broken: Option<String>,
    disk: Disk,
    /// See [`Options::compaction_barrier`].
    compaction_barrier: Option<Arc<std::sync::Barrier>>,
}

impl Log {
    fn usable(&self) -> Result<()> {
        match &self.broken {
            None => Ok(()),
            Some(reason) => Err(StoreError::Unavailable(format!(
                "it refuses changes after an earlier failure: {reason}"
            ))),
        }
    }

    /// Appends one frame and syncs it.
    fn append(&mut self, frame: &[u8]) -> Result<()> {
        let disk = &self.disk;
        if let Err(e) = disk.allow("appending").and_then(|()| self.file.write_all(frame)) {
            // Cut a partial frame off, or later frames would follow damage.
            let cut = disk
                .allow("cutting off a failed append")
                .and_then(|()| self.file.set_len(self.len))
                .and_then(|()| disk.allow("syncing the cut"))
                .and_then(|()| self.file.sync_data());
            let reason = match cut {
                Ok(()) => None,
                Err(cut) => Some(format!(
                    "a failed append to {} could not be cut off ({cut}); restart the agent",
                    self.path.display()
                )),
            };
            self.broken = reason;
            return Err(io_error(format!("appending to {}", self.path.display()))(e));
        }
        if let Err(e) = disk
            .allow("syncing an append")
            .and_then(|()| self.file.sync_data())
        {
            self.broken = Some(format!(
                "syncing {} failed ({e}); restart the agent so that the log is read again",
                self.path.display()
            ));
            return Err(io_error(format!("syncing {}", self.path.display()))(e));
        }
        self.len += frame.len() as u64;
        Ok(())
    }

    fn wants_compaction(&self) -> bool {
        self.len > self.compact_after && self.len > self.snapshot_len && self.len >= self.retry_compaction_at
    }

    /// Replaces the snapshot with `state` and empties the log (see the module docs for the order
    /// and why it is safe at every step).
    fn compact(&mut self, dir: &Path, snapshot: &codec::Snapshot) -> io::Result<()> {
        let bytes = codec::encode_snapshot(snapshot).map_err(io::Error::other)?;
        if let Some(barrier) = &self.compaction_barrier {
            barrier.wait();
            barrier.wait();
        }
        let tmp = dir.join(SNAPSHOT_TMP_FILE);
        let disk = &self.disk;
        disk.allow("creating a snapshot")?;
        let mut file = File::create(&tmp)?;
        disk.allow("writing a snapshot")?;
        file.write_all(&bytes)?;
        disk.allow("syncing a snapshot")?;
        file.sync_all()?;
        drop(file);
        disk.allow("renaming a snapshot")?;
        std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
        disk.allow("syncing the directory after a rename")?;
        fsync_dir(dir)?;
        self.snapshot_len = bytes.len() as u64;
        // From here the log's frames are all in the snapshot: losing them is harmless, but the
        // log must not end up with new frames after stale ones it cannot account for.
        // A truncation that fails leaves the log as it was: its frames are skipped at replay.
        let magic = LOG_MAGIC.len() as u64;
        disk.allow("emptying the log")?;
        self.file.set_len(magic)?;
        self.len = magic;
        if let Err(e) = disk
            .allow("syncing the emptied log")
            .and_then(|()| self.file.sync_all())
        {
            self.broken = Some(format!(
                "syncing {} after emptying it failed ({e}); restart the agent",
                self.path.display()
            ));
            return Err(e);
        }
        Ok(())
    }
}

/// Takes the exclusive lock on `dir`, or says who holds it.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error(format!("opening {}", path.display())))?;
    // Non-blocking: a second agent on the same directory must say so, not hang.
    // SAFETY: a plain syscall on a descriptor this function owns; the arguments are integers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_error(format!("locking {}", path.display()))(err));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "another process".to_string(),
            pid => format!("process {}", pid.chars().take(20).collect::<String>()),
        };
        return Err(StoreError::Unavailable(format!(
            "{} is in use by {holder} (it holds the lock on {}); stop that agent, or give this one another data directory",
            dir.display(),
            path.display()
        )));
    }
    // The pid is only for the message above: no sync needed.
    file.set_len(0)
        .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
        .map_err(io_error(format!("writing {}", path.display())))?;
    Ok(file)
}

/// A watch: the events under its prefix from `from` on, then each new one as it is committed.
fn open_watch(inner: &Arc<Inner>, prefix: &str, from: Revision) -> Result<Watch> {
    let mut changed = inner.revision.subscribe();
    // Seen before reading the state: a change committed after this read wakes the watch.
    changed.borrow_and_update();
    let state = read(&inner.state);
    let backlog = state.events_since(prefix, from)?;
    let next = from.max(state.revision + 1);
    drop(state);
    let watcher = Watcher {
        store: Arc::downgrade(inner),
        changed,
        prefix: prefix.to_string(),
        next,
        pending: backlog.into(),
        ended: false,
    };
    Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next_event)))
}

/// A watch's position: the events it has yet to deliver and the next revision to look for.
struct Watcher {
    /// Weak: an open watch does not keep the store (and its directory lock) alive.
    store: Weak<Inner>,
    changed: watch::Receiver<Revision>,
    prefix: String,
    next: Revision,
    pending: std::collections::VecDeque<Event>,
    ended: bool,
}

impl Watcher {
    async fn next_event(mut self) -> Option<(Result<Event>, Watcher)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            let closed = || StoreError::Unavailable("the store was closed".to_string());
            if self.changed.changed().await.is_err() {
                self.ended = true;
                return Some((Err(closed()), self));
            }
            let Some(inner) = self.store.upgrade() else {
                self.ended = true;
                return Some((Err(closed()), self));
            };
            let state = read(&inner.state);
            match state.events_since(&self.prefix, self.next) {
                Ok(events) => {
                    self.pending.extend(events);
                    self.next = self.next.max(state.revision + 1);
                }
                Err(e) => {
                    self.ended = true;
                    return Some((Err(e), self));
                }
            }
        }
    }
}

/// The task that ends expired leases, deleting their keys. It sleeps until the earliest
/// deadline or a new grant, and ends with the store.
async fn expire_leases(store: Weak<Inner>, mut granted: watch::Receiver<u64>) {
    loop {
        let next = {
            let Some(inner) = store.upgrade() else { return };
            granted.borrow_and_update();
            let (expired, mut next) = read(&inner.state).expiries(Instant::now());
            for lease in expired {
                let committer = inner.clone();
                let ended = blocking(move || {
                    committer.commit(|state, now| Ok((state.plan_end_lease(lease, Some(now)), ())))
                })
                .await;
                if let Err(e) = ended {
                    tracing::warn!(lease = lease.0, error = %e, "ending an expired lease failed; trying again");
                    let retry = Instant::now() + EXPIRY_RETRY;
                    next = Some(next.map_or(retry, |n| n.min(retry)));
                }
            }
            next
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
                    r = granted.changed() => if r.is_err() { return },
                }
            }
            None => {
                if granted.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs a change (file I/O and a sync) off the async threads. The change completes even if the
/// caller's future is dropped: it is then applied but not reported, never half-applied.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("a store operation did not complete: {e}")))?
}

// The locks are never held across a panic in this module; should one be poisoned anyway, the
// state behind it is still consistent (it is only changed by `State::apply` of whole operations).
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The gate every change to the store's files passes: open, unless a crash test set a budget of
/// changes (see [`Options::crash_after`]) and it is spent.
#[derive(Clone, Debug)]
struct Disk(Option<Arc<AtomicI64>>);

impl Disk {
    fn allow(&self, what: &str) -> io::Result<()> {
        match &self.0 {
            Some(left) if left.fetch_sub(1, Ordering::SeqCst) <= 0 => {
                Err(io::Error::other(format!("crash test: stopped before {what}")))
            }
            _ => Ok(()),
        }
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn io_error(context: String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { context, source }
}

fn corrupt(path: &Path) -> impl FnOnce(String) -> StoreError + '_ {
    move |reason| StoreError::Corrupt {
        path: path.display().to_string(),
        reason,
    }
}
