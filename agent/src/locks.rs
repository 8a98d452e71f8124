//! One async lock per volume, for the endpoints that act on a host's volumes (the Docker plugin, the CSI
//! node): calls for one volume run one at a time, calls for different volumes in parallel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use basalt_engine::name::VolumeName;
use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct VolumeLocks(Mutex<BTreeMap<VolumeName, Arc<tokio::sync::Mutex<()>>>>);

impl VolumeLocks {
    /// Waits for `volume`'s lock; held until the guard is dropped.
    pub async fn lock(&self, volume: &VolumeName) -> OwnedMutexGuard<()> {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(volume.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}
