//! Online expansion: grow every replica, then the volume, while initiators
//! stay logged in.
//!
//! ```text
//!  1. validate          a multiple of 4096 bytes, not smaller, within the store's limit
//!  2. ask               ResizeCheck to every active replica, I/O going on: any refusal
//!                        (shrink, a device too small) refuses the expansion, nothing changed
//!  3. grow              the Resize barrier: writes in flight drain, new I/O waits, every
//!                        active replica grows durably; one that fails is dropped (its rebuild
//!                        grows it first), and the volume's size is raised as the barrier goes out
//!  4. answer            once every replica still active holds the new size
//! ```
//!
//! The target reads the size per command and raises CAPACITY DATA HAS
//! CHANGED on every nexus (see `basalt_target::scsi`); a replica that was
//! down, or being prepared for a rebuild, misses the barrier and is grown by
//! its rebuild before anything is copied to it (see `rebuild`). A controller
//! that dies mid-way leaves some replicas grown: the next one serves the
//! largest size among its replicas and grows the others (see `controller`),
//! so an expansion that was started is finished, never undone.
//!
//! An expansion is idempotent: the same size again answers
//! [`Expansion::Unchanged`], and a replica asked to grow to the size it
//! already has says yes, so an expansion retried after a lost answer
//! completes.

use basalt_proto::{BLOCK_SIZE, MAX_VOLUME_BYTES};

use super::core::{ControlOp, VolumeError};
use super::Volume;

/// What an expansion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expansion {
    /// The volume already had that size.
    Unchanged { size_bytes: u64 },
    /// Every active replica grew from `from` to `to` bytes; `dropped` are the
    /// replicas that failed to and were dropped (address, why), to be grown
    /// by their rebuild.
    Grown {
        from: u64,
        to: u64,
        dropped: Vec<(String, String)>,
    },
}

/// Why an expansion did not happen. Every variant but [`ExpandError::Volume`]
/// and [`ExpandError::NoneGrew`] changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error(
        "{requested} bytes is not a whole number of the replicas' {BLOCK_SIZE}-byte blocks; \
         ask for a multiple of {BLOCK_SIZE} (e.g. 20G)"
    )]
    Unaligned { requested: u64 },
    #[error(
        "the volume holds {size} bytes, more than the {requested} asked for: a volume can grow, never shrink"
    )]
    Shrink { size: u64, requested: u64 },
    #[error(
        "{requested} bytes is beyond the largest volume Basalt supports ({MAX_VOLUME_BYTES} bytes, 1 PiB)"
    )]
    TooLarge { requested: u64 },
    #[error("no replica is active to grow; the volume is degraded (see `basalt volume info`)")]
    NoReplica,
    #[error("not expanded, nothing changed: {}", .refusals.iter().map(|(a, e)| format!("{a} cannot grow: {e}")).collect::<Vec<_>>().join("; "))]
    Refused { refusals: Vec<(String, String)> },
    #[error("the expansion could not run: {0}")]
    Volume(VolumeError),
    #[error(
        "no replica grew to {to} bytes, every one failed and was dropped ({}); the volume is degraded \
         until they are rebuilt",
        .dropped.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; ")
    )]
    NoneGrew { to: u64, dropped: Vec<(String, String)> },
}

/// The checks of step 1, before any replica is asked: what the volume
/// itself can tell.
pub fn validate(size: u64, requested: u64) -> Result<Option<u64>, ExpandError> {
    if !requested.is_multiple_of(BLOCK_SIZE) {
        return Err(ExpandError::Unaligned { requested });
    }
    if requested < size {
        return Err(ExpandError::Shrink { size, requested });
    }
    if requested > MAX_VOLUME_BYTES {
        return Err(ExpandError::TooLarge { requested });
    }
    Ok((requested > size).then_some(requested))
}

impl Volume {
    /// Grow the volume to `size_bytes` online (see the module docs). Answers
    /// once every replica still active holds the new size.
    ///
    /// Cancellation: dropping the future after the barrier went out does not
    /// stop it; the volume grows all the same.
    pub async fn expand(&self, size_bytes: u64) -> Result<Expansion, ExpandError> {
        let _one_at_a_time = self.expanding.lock().await;
        let from = self.size_bytes();
        let Some(to) = validate(from, size_bytes)? else {
            return Ok(Expansion::Unchanged { size_bytes: from });
        };
        let addresses = |results: &[(usize, Result<bytes::Bytes, String>)], addrs: &[String]| {
            results
                .iter()
                .filter_map(|(c, r)| {
                    let addr = addrs
                        .get(*c)
                        .cloned()
                        .unwrap_or_else(|| format!("replica #{}", c + 1));
                    r.as_ref().err().map(|e| (addr, e.clone()))
                })
                .collect::<Vec<_>>()
        };
        let addrs = self.addresses().await?;
        let checked = self
            .control(ControlOp::ResizeCheck(to))
            .await
            .map_err(ExpandError::Volume)?;
        if checked.is_empty() {
            return Err(ExpandError::NoReplica);
        }
        let refusals = addresses(&checked, &addrs);
        if !refusals.is_empty() {
            return Err(ExpandError::Refused { refusals });
        }
        let grown = self
            .control(ControlOp::Resize(to))
            .await
            .map_err(ExpandError::Volume)?;
        let dropped = addresses(&grown, &addrs);
        if dropped.len() == grown.len() {
            return Err(ExpandError::NoneGrew { to, dropped });
        }
        for (addr, why) in &dropped {
            tracing::warn!(replica = %addr, error = %why, "replica failed to grow: dropped, its rebuild grows it");
        }
        tracing::info!(from, to, grown = grown.len() - dropped.len(), "volume expanded");
        Ok(Expansion::Grown { from, to, dropped })
    }

    async fn addresses(&self) -> Result<Vec<String>, ExpandError> {
        let status = self.status().await.ok_or_else(|| {
            ExpandError::Volume(VolumeError::Unavailable("the volume is shutting down".into()))
        })?;
        Ok(status.replicas.into_iter().map(|r| r.address).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_is_checked_against_the_volume_before_any_replica_is_asked() {
        let g = 1u64 << 30;
        assert_eq!(validate(10 * g, 20 * g).unwrap(), Some(20 * g));
        assert_eq!(
            validate(10 * g, 10 * g).unwrap(),
            None,
            "the same size: nothing to do"
        );
        assert!(matches!(
            validate(10 * g, 5 * g),
            Err(ExpandError::Shrink { size, requested }) if size == 10 * g && requested == 5 * g
        ));
        assert!(matches!(
            validate(10 * g, 20 * g + 512),
            Err(ExpandError::Unaligned { .. })
        ));
        assert!(matches!(
            validate(10 * g, MAX_VOLUME_BYTES + BLOCK_SIZE),
            Err(ExpandError::TooLarge { .. })
        ));
        // Unaligned is reported before shrink: the first thing wrong with the number.
        assert!(matches!(validate(10 * g, 1), Err(ExpandError::Unaligned { .. })));
    }
}
