//! Starting a volume controller: survey the replicas, fence every older
//! controller, choose the replica that holds the latest data, reconcile the
//! others with it, then serve.
//!
//! 1. Survey: every replica that answers within the startup wait, with the
//!    volume's UUID (`--volume-id`, or the one most replicas share) and size,
//!    is usable; the others are logged with the reason and left in ERR (they
//!    are re-added when they answer again). Every connection proves the
//!    volume's secret both ways (`basalt_proto::auth`).
//!    Membership: each replica reports the membership it last recorded
//!    (`replica add` / `rm` write one to every active replica); the newest
//!    one found -- highest generation, ties broken by the epoch it was
//!    written at -- names the volume's replicas, whatever `--replica` says: a
//!    listed replica that is not a member is not used (the log says why), a
//!    member missing from the list is surveyed and used all the same. When
//!    no replica has recorded one (a new volume), the list is the membership.
//!    The volume's size is the largest among the usable members: an
//!    expansion is acknowledged only once every active replica grew, so the
//!    largest is the latest (one that was started and not finished counts
//!    too: it is finished, never undone). `--size` is the size of a new
//!    volume: smaller than the replicas' is fine (they were expanded since;
//!    logged), larger is refused -- a restart is not an expansion, `basalt
//!    volume expand` is.
//! 2. Fence: every usable replica is raised to a new epoch, one above every
//!    epoch seen, before any I/O: from then on it refuses every frame of an
//!    older controller, so a controller cut off by a partition can never
//!    write again. Then every usable replica smaller than the volume (it
//!    missed an expansion) is grown to its size, before anything is read
//!    from or copied to it.
//! 3. Choose: at least `--min-healthy` (a majority) must be usable -- writes
//!    are acknowledged only by a majority, so a majority always contains a
//!    replica holding every acknowledged write. The reference is the one at
//!    the highest `(epoch, revision)` before the raise: the epoch says which
//!    controller it last served, the revision how many of its flushes it made
//!    durable (survivors are flushed when a replica drops, so a dropped
//!    replica is behind).
//! 4. Reconcile: every other usable replica is brought in line with the
//!    reference by a delta rebuild (only blocks whose checksums differ
//!    travel) before the portal opens. Divergent histories are never merged:
//!    the reference wins, and each decision is logged with its reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use basalt_proto::auth::VolumeSecret;
use basalt_proto::frame::{Message, ReplyError};
use basalt_proto::pb::replica::Membership;
use basalt_proto::{Epoch, VolumeId};

use crate::name::VolumeName;
use crate::volume::core::CoreConfig;
use crate::volume::link::{Handshaken, LinkError};
use crate::volume::rebuild::Rebuilder;
use crate::volume::{StartReplica, Volume, VolumeSpec};

/// What a controller is asked to serve.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub name: VolumeName,
    pub size_bytes: u64,
    pub replicas: Vec<String>,
    /// The volume's UUID; `None` to take the one most replicas report.
    pub volume_id: Option<VolumeId>,
    /// Fewest read-write replicas to serve; `None`: a majority of the members.
    pub min_healthy: Option<usize>,
    pub replica_timeout: Duration,
    /// How long to wait for every replica to answer at start before going
    /// on with those that did.
    pub startup_wait: Duration,
    /// The volume's secret: the controller proves it to every replica, and
    /// every replica proves it back.
    pub secret: VolumeSecret,
}

/// Why the controller cannot start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "only {usable} of {configured} replicas are reachable, and --min-healthy is {min_healthy}: without a \
         majority no replica is known to hold every acknowledged write, so the volume is not served ({details}). \
         Start the missing replicas, or lower --min-healthy if you accept the risk"
    )]
    TooFewReplicas {
        usable: usize,
        configured: usize,
        min_healthy: usize,
        details: String,
    },
    #[error(
        "the replicas disagree on the volume UUID ({found}); pass --volume-id to say which volume this controller \
         serves"
    )]
    AmbiguousVolume { found: String },
    #[error("--min-healthy is {min_healthy}, but the volume has {members} replicas; give at most {members}")]
    MinHealthy { min_healthy: usize, members: usize },
    #[error(
        "--size is {asked} bytes but the replicas hold a {holds}-byte volume: a controller does not grow a volume \
         when it starts. Start it with --size {holds} (or less) and grow the volume with `basalt volume expand \
         --api ADDR --size SIZE`"
    )]
    LargerThanReplicas { asked: u64, holds: u64 },
}

/// The volume's size: the largest of the usable replicas' (`None` when no
/// replica is usable: then `--size`, for a new volume). A `--size` above it
/// is refused: growing the volume is an expansion's job, which asks every
/// replica first.
pub fn volume_size(asked: u64, usable: impl IntoIterator<Item = u64>) -> Result<u64, StartError> {
    match usable.into_iter().max() {
        None => Ok(asked),
        Some(holds) if asked > holds => Err(StartError::LargerThanReplicas { asked, holds }),
        Some(holds) => Ok(holds),
    }
}

/// The newest of the memberships the replicas recorded: the highest generation, ties broken by the
/// epoch it was written at (two controllers that each recorded the same generation: the newer one wins).
pub fn newest_membership<'a>(found: impl IntoIterator<Item = &'a Membership>) -> Option<&'a Membership> {
    found.into_iter().max_by_key(|m| (m.generation, m.epoch))
}

/// Which replicas a controller uses, given its `--replica` list and the newest recorded membership.
#[derive(Debug, PartialEq, Eq)]
pub struct MemberPlan {
    /// The volume's replicas: the listed members in list order, then members the list lacks.
    pub members: Vec<String>,
    /// Listed replicas that are not members: not used.
    pub not_members: Vec<String>,
    /// Members the list lacks: used all the same.
    pub unlisted: Vec<String>,
}

/// The replicas to use: the membership's when one was recorded, else the list (a new volume).
pub fn plan_members(listed: &[String], newest: Option<&Membership>) -> MemberPlan {
    let Some(m) = newest else {
        return MemberPlan {
            members: listed.to_vec(),
            not_members: Vec::new(),
            unlisted: Vec::new(),
        };
    };
    let (kept, not_members): (Vec<String>, Vec<String>) =
        listed.iter().cloned().partition(|a| m.members.contains(a));
    let unlisted: Vec<String> = m
        .members
        .iter()
        .filter(|a| !listed.contains(a))
        .cloned()
        .collect();
    MemberPlan {
        members: kept.into_iter().chain(unlisted.iter().cloned()).collect(),
        not_members,
        unlisted,
    }
}

/// Survey, choose, fence, and start the volume.
pub async fn assemble(config: &ControllerConfig) -> Result<Assembled, StartError> {
    let surveyed = survey(&config.replicas, &config.secret, config.startup_wait).await;

    // Which volume is this? The one asked for, or the one most replicas hold.
    let volume = match config.volume_id {
        Some(v) => v,
        None => {
            let mut counts: HashMap<VolumeId, usize> = HashMap::new();
            for h in surveyed.iter().flatten() {
                *counts.entry(h.identity.volume).or_default() += 1;
            }
            let top = counts.values().copied().max().unwrap_or(0);
            let leaders: Vec<VolumeId> = counts
                .iter()
                .filter(|(_, c)| **c == top)
                .map(|(v, _)| *v)
                .collect();
            match leaders.as_slice() {
                [] => VolumeId(uuid::Uuid::nil()),
                [v] => *v,
                many => {
                    let found = many.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(StartError::AmbiguousVolume { found });
                }
            }
        }
    };

    // Whose replicas? The newest membership any replica of this volume recorded.
    let newest = newest_membership(
        surveyed
            .iter()
            .flatten()
            .filter(|h| h.identity.volume == volume)
            .filter_map(|h| h.membership.as_ref()),
    )
    .cloned();
    let plan = plan_members(&config.replicas, newest.as_ref());
    if let Some(m) = &newest {
        for addr in &plan.not_members {
            tracing::warn!(
                replica = %addr, generation = m.generation, written_at_epoch = m.epoch,
                "replica listed in --replica is not used: it is not a member of the volume (removed with \
                 `basalt replica rm`; the newest recorded membership is {})", m.members.join(", ")
            );
        }
        for addr in &plan.unlisted {
            tracing::info!(
                replica = %addr, generation = m.generation,
                "replica missing from --replica is used: it is a member of the volume (added with \
                 `basalt replica add`)"
            );
        }
    }
    let mut by_address: HashMap<String, Result<Handshaken, LinkError>> =
        config.replicas.iter().cloned().zip(surveyed).collect();
    let unlisted = survey(&plan.unlisted, &config.secret, config.startup_wait).await;
    by_address.extend(plan.unlisted.iter().cloned().zip(unlisted));
    let addresses = plan.members;
    let min_healthy = config
        .min_healthy
        .unwrap_or(CoreConfig::majority(addresses.len()));
    if min_healthy == 0 || min_healthy > addresses.len() {
        return Err(StartError::MinHealthy {
            min_healthy,
            members: addresses.len(),
        });
    }
    let surveyed = addresses.iter().map(|a| {
        by_address.remove(a).unwrap_or_else(|| {
            Err(LinkError::Protocol {
                addr: a.clone(),
                detail: "not surveyed".into(),
            })
        })
    });

    let mut decisions: Vec<Result<Handshaken, String>> = surveyed
        .map(|s| {
            let h = s.map_err(|e| format!("unreachable: {e}"))?;
            let id = h.identity;
            if id.volume != volume {
                return Err(format!("holds volume {}, not {volume}", id.volume));
            }
            Ok(h)
        })
        .collect();

    let sizes = decisions.iter().flatten().map(|h| h.identity.size_bytes);
    let size = volume_size(config.size_bytes, sizes)?;
    if size > config.size_bytes {
        tracing::info!(
            size_bytes = size,
            asked = config.size_bytes,
            "the replicas hold a volume expanded past --size: serving it at its size"
        );
    }

    let highest_epoch = decisions
        .iter()
        .filter_map(|d| d.as_ref().ok())
        .map(|h| h.identity.epoch)
        .max();
    let epoch = highest_epoch.unwrap_or_default().next();

    // Fence first: raise every usable replica to the new epoch before any
    // I/O, the ones that are behind too -- an older controller that could
    // still reach them must not gather a majority of acknowledgements there.
    for (addr, d) in addresses.iter().zip(decisions.iter_mut()) {
        if let Ok(h) = d {
            let before = h.identity;
            if let Err(e) = h.raise_epoch(addr, epoch).await {
                *d = Err(format!("could not raise its epoch: {e}"));
            } else {
                // Remember what it held before we raised it: that is what
                // says how far it had got.
                h.identity = before;
            }
        }
    }

    // A replica that missed an expansion (it was down, or the controller
    // died half-way through one) grows now, before it is read or rebuilt.
    for (addr, d) in addresses.iter().zip(decisions.iter_mut()) {
        if let Ok(h) = d {
            if h.identity.size_bytes < size {
                let from = h.identity.size_bytes;
                let grow = Message::Resize {
                    size_bytes: size,
                    check_only: false,
                };
                match h.request(addr, epoch, grow).await {
                    Ok(Message::ResizeOk { size_bytes }) if size_bytes == size => {
                        tracing::info!(replica = %addr, from, to = size, "replica missed an expansion: grown");
                        h.identity.size_bytes = size;
                    }
                    Ok(other) => *d = Err(format!("answered a grow to {size} bytes with {other:?}")),
                    Err(e) => {
                        *d = Err(format!(
                            "missed an expansion and could not grow to {size} bytes: {e}"
                        ))
                    }
                }
            }
        }
    }

    // Writes are acknowledged only once a majority holds them, so among a
    // majority of the replicas at least one holds every acknowledged write:
    // fewer reachable than --min-healthy and we cannot know which is latest.
    let usable = decisions.iter().filter(|d| d.is_ok()).count();
    if usable < min_healthy {
        let details = addresses
            .iter()
            .zip(&decisions)
            .filter_map(|(a, d)| d.as_ref().err().map(|why| format!("{a}: {why}")))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(StartError::TooFewReplicas {
            usable,
            configured: addresses.len(),
            min_healthy,
            details,
        });
    }

    // The reference is the replica that got furthest: the highest epoch (the
    // newest controller it served), then the highest revision (the most
    // flushes of it made durable; survivors are flushed whenever a replica
    // drops, so a dropped replica is behind). Every other replica is
    // reconciled with it before the volume serves: a delta rebuild, where
    // only blocks whose checksums differ travel -- typically the blocks a
    // dead controller wrote after its last flush, or what a dropped replica
    // missed. Nothing is merged silently: each choice is logged with why.
    let reference = decisions
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            d.as_ref()
                .ok()
                .map(|h| (i, (h.identity.epoch, h.identity.revision)))
        })
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .expect("at least min_healthy >= 1 usable replicas");
    let (best_epoch, best_rev) = {
        let id = decisions[reference].as_ref().expect("usable").identity;
        (id.epoch, id.revision)
    };
    let mut reconcile = Vec::new();
    let replicas = decisions
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let addr = &addresses[i];
            match d {
                Ok(h) if i == reference => {
                    tracing::info!(
                        replica = %addr, epoch = epoch.0, was_epoch = best_epoch.0, revision = best_rev.0,
                        "replica chosen as the reference: it holds the latest data"
                    );
                    StartReplica::Ready(h)
                }
                Ok(h) => {
                    let (e, r) = (h.identity.epoch, h.identity.revision);
                    let why = if (e, r) < (best_epoch, best_rev) {
                        format!("behind the reference ({e}, {r} < {best_epoch}, {best_rev}); rebuilding what it missed")
                    } else {
                        "as far as the reference; reconciling blocks written after the last flush".to_string()
                    };
                    tracing::info!(replica = %addr, reason = %why, "replica reconciled with the reference");
                    reconcile.push(i);
                    StartReplica::Unusable { cause: why }
                }
                Err(cause) => {
                    tracing::warn!(replica = %addr, reason = %cause, "replica not used");
                    StartReplica::Unusable { cause }
                }
            }
        })
        .collect();
    let spec = VolumeSpec {
        name: config.name.clone(),
        volume,
        epoch,
        addresses,
        secret: config.secret.clone(),
        membership_generation: newest.map_or(0, |m| m.generation),
    };
    tracing::info!(volume = %volume, epoch = epoch.0, size_bytes = size, healthy = usable, "volume assembled");
    let core = CoreConfig {
        replica_timeout: config.replica_timeout,
        min_healthy,
    };
    Ok(Assembled {
        volume: Volume::start(spec, size, replicas, core),
        reconcile,
    })
}

/// A started volume, and the replicas to reconcile before serving.
pub struct Assembled {
    pub volume: Volume,
    /// Indexes of up-to-date replicas to bring in line with the reference.
    pub reconcile: Vec<usize>,
}

/// Reconcile the replicas `assemble` set aside and wait (up to `limit`)
/// until they are RW again. Serving before that would let reads of an
/// unflushed block return one value and then another.
pub async fn reconcile(assembled: &Assembled, rebuilder: &std::sync::Arc<Rebuilder>, limit: Duration) {
    let volume = &assembled.volume;
    let Some(status) = volume.status().await else {
        return;
    };
    for &i in &assembled.reconcile {
        rebuilder.start(volume, i, status.replicas[i].address.clone());
    }
    let deadline = Instant::now() + limit;
    while assembled
        .reconcile
        .iter()
        .any(|&i| rebuilder.progress(i).is_some())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Say Hello to every replica (in parallel), retrying those that do not
/// answer until `wait` has passed.
async fn survey(
    addrs: &[String],
    secret: &VolumeSecret,
    wait: Duration,
) -> Vec<Result<Handshaken, LinkError>> {
    let deadline = Instant::now() + wait;
    let tasks = addrs.iter().map(|addr| {
        let addr = addr.clone();
        async move {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(200), Duration::from_secs(3));
                // A writer from the start: this connection becomes the data
                // link, and taking over as writer also shuts out whatever an
                // older controller still has in flight to this replica.
                match Handshaken::connect_writer(
                    &addr,
                    VolumeId(uuid::Uuid::nil()),
                    Epoch(0),
                    secret,
                    attempt,
                )
                .await
                {
                    Ok(h) => return Ok(h),
                    // A replica that does not know our secret (or finds ours wrong) will not learn it by
                    // being asked again: say so at once.
                    Err(
                        e @ (LinkError::NotProven { .. }
                        | LinkError::Refused {
                            error: ReplyError::AuthFailed,
                            ..
                        }),
                    ) => return Err(e),
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(e) => {
                        tracing::debug!(replica = %addr, error = %e, "replica not answering yet; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    futures::future::join_all(tasks).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(generation: u64, epoch: u64, members: &[&str]) -> Membership {
        Membership {
            generation,
            members: members.iter().map(|s| s.to_string()).collect(),
            epoch,
        }
    }

    fn list(addrs: &[&str]) -> Vec<String> {
        addrs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_highest_generation_wins_and_the_epoch_breaks_ties() {
        let old = membership(2, 9, &["a", "b", "c"]);
        let new = membership(3, 4, &["a", "b"]);
        let tie_newer_epoch = membership(3, 5, &["a", "c"]);
        assert_eq!(
            newest_membership([&old, &new]),
            Some(&new),
            "generation first, not epoch"
        );
        assert_eq!(
            newest_membership([&new, &tie_newer_epoch, &old]),
            Some(&tie_newer_epoch)
        );
        assert_eq!(newest_membership(std::iter::empty()), None);
    }

    #[test]
    fn without_a_recorded_membership_the_list_is_the_membership() {
        let plan = plan_members(&list(&["a", "b", "c"]), None);
        assert_eq!(plan.members, list(&["a", "b", "c"]));
        assert!(plan.not_members.is_empty() && plan.unlisted.is_empty());
    }

    #[test]
    fn a_removed_replica_in_a_stale_list_is_not_used_and_an_added_one_is() {
        // `replica rm c`, then `replica add d`: the controller restarts with the original list.
        let m = membership(2, 7, &["a", "b", "d"]);
        let plan = plan_members(&list(&["a", "b", "c"]), Some(&m));
        assert_eq!(plan.members, list(&["a", "b", "d"]));
        assert_eq!(plan.not_members, list(&["c"]));
        assert_eq!(plan.unlisted, list(&["d"]));
    }

    #[test]
    fn the_largest_replica_sets_the_size_and_a_larger_size_flag_is_refused() {
        let g = 1u64 << 30;
        assert_eq!(volume_size(10 * g, [10 * g, 10 * g]).unwrap(), 10 * g);
        // Expanded since the controller was first started with --size 10G.
        assert_eq!(volume_size(10 * g, [20 * g, 20 * g, 20 * g]).unwrap(), 20 * g);
        // One replica missed the expansion: it is grown, not the volume shrunk.
        assert_eq!(volume_size(10 * g, [20 * g, 10 * g]).unwrap(), 20 * g);
        // A new volume: nothing usable yet.
        assert_eq!(volume_size(10 * g, []).unwrap(), 10 * g);
        assert!(matches!(
            volume_size(30 * g, [20 * g, 20 * g]),
            Err(StartError::LargerThanReplicas { asked, holds }) if asked == 30 * g && holds == 20 * g
        ));
    }
}
