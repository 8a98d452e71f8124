//! One async lock per volume, for the endpoints that act on a host's volumes (the Docker plugin, the CSI
//! node): calls for one volume run one at a time, calls for different volumes in parallel.
//!
//! A call's host work (attach, mkfs, mount, unmount, detach) blocks and cannot be stopped halfway, so it
//! runs on tokio's blocking pool through [`Held::blocking`], which takes a share of the lock along. When
//! the caller gives up on a call (kubelet's or dockerd's deadline passes, the server drops the handler),
//! the step still running keeps the volume locked until it ends: the caller's retry waits for it instead
//! of running beside it (two mounts stacked at one target, a detach under a mount being made).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use basalt_engine::name::VolumeName;
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinError;

#[derive(Default)]
pub struct VolumeLocks(Mutex<BTreeMap<VolumeName, Arc<tokio::sync::Mutex<()>>>>);

impl VolumeLocks {
    /// Waits for `volume`'s lock; held until the call's [`Held`] and every share of it are dropped.
    pub async fn lock(&self, volume: &VolumeName) -> Held {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(volume.clone())
            .or_default()
            .clone();
        Held {
            _guard: Arc::new(lock.lock_owned().await),
        }
    }
}

/// A volume's lock as a call holds it (see the module's doc).
#[derive(Clone)]
pub struct Held {
    /// Never read: it unlocks the volume when the last share is dropped.
    _guard: Arc<OwnedMutexGuard<()>>,
}

impl Held {
    /// Runs `f` on the blocking pool with a share of the lock: the volume stays locked until `f` ends,
    /// even if the call that started it is dropped first.
    pub async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, JoinError> {
        let share = self.clone();
        tokio::task::spawn_blocking(move || {
            let _share = share;
            f()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_retry_waits_for_the_host_step_of_the_call_its_caller_gave_up_on() {
        let locks = VolumeLocks::default();
        let volume = VolumeName::new("v").unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let step_finished = finished.clone();
        let call = async {
            let held = locks.lock(&volume).await;
            held.blocking(move || {
                std::thread::sleep(Duration::from_millis(300));
                step_finished.store(true, Ordering::SeqCst);
            })
            .await
        };
        // The caller's deadline passes: the call is dropped while its step runs.
        assert!(tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err());
        let _retry = locks.lock(&volume).await;
        assert!(
            finished.load(Ordering::SeqCst),
            "the retry got the lock while the step of the call it retries still ran"
        );
    }

    #[tokio::test]
    async fn other_volumes_are_not_held_up() {
        let locks = VolumeLocks::default();
        let a = locks.lock(&VolumeName::new("a").unwrap()).await;
        let b =
            tokio::time::timeout(Duration::from_secs(5), locks.lock(&VolumeName::new("b").unwrap())).await;
        assert!(b.is_ok(), "volume b waited for volume a's lock");
        drop(a);
    }
}
