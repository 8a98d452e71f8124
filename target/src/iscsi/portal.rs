//! Targets and the portal that serves them.
//!
//! ```text
//!   Portal::serve(listener, shutdown)
//!     └─ accept ─► one task per TCP connection (connection.rs)
//!                    login ─► Target (by TargetName) ─► session registered
//!                    full feature phase until logout / drop / shutdown
//! ```
//!
//! A [`Target`] is one iSCSI target name with its LUN 0, authentication and
//! allow-list. It knows its logged-in sessions, so task management can reach
//! across sessions (LUN RESET, TARGET RESET) and the controller can ask how
//! many initiators are in ([`Target::session_count`]) before reverting a
//! snapshot. Registration happens at login and removal at logout or drop;
//! neither is on the I/O path.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::iscsi::login::{AllowList, AuthPolicy, ConfigError, TargetPolicy};
use crate::iscsi::session::TaskTable;
use crate::iscsi::text::TargetOffer;
use crate::lu::{ItNexus, LogicalUnit, ResetKind, ScsiCommand, ScsiResult};

/// Prefix of Basalt's target names.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.basalt";

/// The target name for volume `name`: `iqn.2026-11.io.basalt:<name>`.
pub fn target_iqn(name: &str) -> String {
    format!("{IQN_PREFIX}:{name}")
}

/// [`LogicalUnit`] in object-safe form, so one portal can serve targets over
/// different devices. Boxing the future costs one allocation per command.
/// The future owns its unit (`Arc`), so the transport can poll it once in
/// place and hand it to a task only if it does not complete at once.
pub trait DynLogicalUnit: Send + Sync + 'static {
    fn execute_owned(self: Arc<Self>, cmd: ScsiCommand) -> Pin<Box<dyn Future<Output = ScsiResult> + Send>>;
    fn reset(&self, kind: ResetKind, by: &ItNexus);
    fn nexus_added(&self, nexus: &ItNexus);
    fn nexus_removed(&self, nexus: &ItNexus);
}

impl<L: LogicalUnit> DynLogicalUnit for L {
    fn execute_owned(self: Arc<Self>, cmd: ScsiCommand) -> Pin<Box<dyn Future<Output = ScsiResult> + Send>> {
        Box::pin(async move { self.execute(cmd).await })
    }
    fn reset(&self, kind: ResetKind, by: &ItNexus) {
        LogicalUnit::reset(self, kind, by)
    }
    fn nexus_added(&self, nexus: &ItNexus) {
        LogicalUnit::nexus_added(self, nexus)
    }
    fn nexus_removed(&self, nexus: &ItNexus) {
        LogicalUnit::nexus_removed(self, nexus)
    }
}

/// Configuration of one target.
pub struct TargetConfig {
    /// Full iSCSI name (see [`target_iqn`]).
    pub name: String,
    /// Sent as TargetAlias at login, if set.
    pub alias: Option<String>,
    pub auth: AuthPolicy,
    pub allow: AllowList,
    pub lun0: Arc<dyn DynLogicalUnit>,
}

impl TargetConfig {
    /// A target with no authentication, open to every initiator.
    pub fn new<L: LogicalUnit>(name: impl Into<String>, lun0: Arc<L>) -> TargetConfig {
        TargetConfig {
            name: name.into(),
            alias: None,
            auth: AuthPolicy::None,
            allow: AllowList::Any,
            lun0,
        }
    }
}

/// What a session exposes to task management in other sessions and to the
/// target's registry.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    pub nexus: Arc<ItNexus>,
    pub tasks: Arc<TaskTable>,
    /// Cancelling it drops the session's connection.
    pub cancel: CancellationToken,
}

/// One iSCSI target: a name, LUN 0, and its logged-in sessions.
pub struct Target {
    name: String,
    /// Who may log in. Replaced whole at run time ([`Target::set_allow`]); a login takes a snapshot of
    /// it, so a change never meets a half-updated policy.
    policy: std::sync::RwLock<Arc<TargetPolicy>>,
    pub(crate) lun0: Arc<dyn DynLogicalUnit>,
    sessions: Mutex<HashMap<u16, Arc<SessionHandle>>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Target {
    pub fn new(config: TargetConfig) -> Result<Arc<Target>, ConfigError> {
        let valid = ["iqn.", "eui.", "naa."]
            .iter()
            .any(|p| config.name.starts_with(p))
            && config.name.len() <= 223
            && !config
                .name
                .contains(|c: char| c.is_whitespace() || c == '\0' || c == ',');
        if !valid {
            return Err(ConfigError::BadTargetName(config.name));
        }
        Ok(Arc::new(Target {
            name: config.name.clone(),
            policy: std::sync::RwLock::new(Arc::new(TargetPolicy {
                name: config.name,
                alias: config.alias,
                auth: config.auth,
                allow: config.allow,
            })),
            lun0: config.lun0,
            sessions: Mutex::new(HashMap::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The login policy in force now.
    pub(crate) fn policy(&self) -> Arc<TargetPolicy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who may log in now.
    pub fn allow_list(&self) -> AllowList {
        self.policy().allow.clone()
    }

    /// Replace who may log in, at run time (a CSI publication moving to another node). Sessions of
    /// initiators the new list leaves out are dropped at once: an initiator that lost access must not
    /// keep writing through a session it opened before. Returns how many were dropped.
    pub fn set_allow(&self, allow: AllowList) -> usize {
        {
            let mut policy = self.policy.write().unwrap_or_else(|e| e.into_inner());
            let mut next = TargetPolicy::clone(&policy);
            next.allow = allow.clone();
            *policy = Arc::new(next);
        }
        let mut dropped = 0;
        for session in self.sessions() {
            if !allow.allows(&session.nexus.initiator_name) {
                tracing::info!(target_name = %self.name, initiator = %session.nexus.initiator_name,
                    "closing a session of an initiator no longer allowed");
                session.cancel.cancel();
                dropped += 1;
            }
        }
        dropped
    }

    /// How many sessions are logged in to this target now.
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Arc<SessionHandle>>> {
        // Each operation is one insert/remove/iteration: a panic elsewhere
        // cannot leave the map half-updated.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a new session. An older session of the same initiator port
    /// (name + ISID) is dropped: session reinstatement (RFC 7143 §6.3.5).
    pub(crate) fn register(&self, tsih: u16, session: Arc<SessionHandle>) {
        let mut sessions = self.lock();
        for old in sessions.values() {
            if old.nexus.isid == session.nexus.isid
                && old
                    .nexus
                    .initiator_name
                    .eq_ignore_ascii_case(&session.nexus.initiator_name)
            {
                tracing::info!(target_name = %self.name(), initiator = %old.nexus.initiator_name,
                    "session reinstatement: closing the initiator's previous session");
                old.cancel.cancel();
            }
        }
        sessions.insert(tsih, session);
    }

    pub(crate) fn unregister(&self, tsih: u16) {
        self.lock().remove(&tsih);
    }

    /// Every session's handle (for resets).
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().cloned().collect()
    }
}

/// Tunables of a portal. The defaults are what `basalt serve-file` uses.
#[derive(Clone, Debug)]
pub struct PortalConfig {
    /// Target portal group tag, reported at login and in SendTargets.
    pub tpgt: u16,
    /// Send a NOP-In ping after this long without hearing from the
    /// initiator. 10 s: frequent enough to notice a vanished initiator well
    /// within a minute, rare enough to cost nothing.
    pub nop_in_interval: Duration,
    /// Drop the connection if the initiator stays silent this long after a
    /// ping. 20 s tolerates a busy or paused initiator (open-iscsi's own
    /// NOP-Out timeout is 5-15 s) yet frees a dead session's tasks (and
    /// lets the controller revert a snapshot) within half a minute.
    pub nop_in_timeout: Duration,
    /// A login must finish within this time, or the connection is dropped
    /// (so half-open connections cannot pin resources).
    pub login_timeout: Duration,
    /// On shutdown or logout, how long in-flight commands may take to finish
    /// before they are aborted.
    pub drain_timeout: Duration,
    /// Our side of parameter negotiation.
    pub offer: TargetOffer,
}

impl Default for PortalConfig {
    fn default() -> Self {
        PortalConfig {
            tpgt: 1,
            nop_in_interval: Duration::from_secs(10),
            nop_in_timeout: Duration::from_secs(20),
            login_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(10),
            offer: TargetOffer::default(),
        }
    }
}

/// A set of targets served on listening sockets.
pub struct Portal {
    pub(crate) targets: HashMap<String, Arc<Target>>,
    pub(crate) config: PortalConfig,
    next_tsih: AtomicU16,
    live_tsihs: Mutex<HashSet<u16>>,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("targets", &self.targets.keys())
            .finish_non_exhaustive()
    }
}

impl Portal {
    pub fn new(config: PortalConfig, targets: impl IntoIterator<Item = Arc<Target>>) -> Arc<Portal> {
        Arc::new(Portal {
            targets: targets.into_iter().map(|t| (t.name().to_string(), t)).collect(),
            config,
            next_tsih: AtomicU16::new(1),
            live_tsihs: Mutex::new(HashSet::new()),
        })
    }

    /// Normal sessions logged in to any of this portal's targets.
    pub fn session_count(&self) -> usize {
        self.targets.values().map(|t| t.session_count()).sum()
    }

    pub fn target(&self, name: &str) -> Option<&Arc<Target>> {
        self.targets.get(name)
    }

    fn tsihs(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.live_tsihs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A TSIH no live session uses (never 0, RFC 7143 §11.12.6).
    pub(crate) fn allocate_tsih(&self) -> Option<u16> {
        let mut live = self.tsihs();
        for _ in 0..=u16::MAX as u32 {
            let tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if tsih != 0 && live.insert(tsih) {
                return Some(tsih);
            }
        }
        None
    }

    pub(crate) fn release_tsih(&self, tsih: u16) {
        self.tsihs().remove(&tsih);
    }

    pub(crate) fn tsih_live(&self, tsih: u16) -> bool {
        self.tsihs().contains(&tsih)
    }

    /// Accept connections on `listener` until `shutdown` is cancelled, then
    /// close every connection (letting in-flight commands finish for up to
    /// `drain_timeout`) and return.
    ///
    /// Cancel safety: dropping the future stops accepting but leaves running
    /// connections to their own tasks; cancel `shutdown` for a clean stop.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        let local = listener.local_addr()?;
        tracing::info!(portal = %local, targets = ?self.targets.keys().collect::<Vec<_>>(), "iSCSI portal listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let portal = self.clone();
                    let cancel = shutdown.child_token();
                    tracker.spawn(async move {
                        crate::iscsi::connection::run(portal, stream, peer, cancel).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin, and keep serving the connections we have.
                    tracing::warn!(portal = %local, error = %e, "accept failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!(portal = %local, "iSCSI portal stopped");
        Ok(())
    }
}
