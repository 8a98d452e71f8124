//! `basalt snapshot create|ls|rm|revert|holds|release`: a volume's snapshots,
//! through its controller (every replica takes, lists, merges or reverts
//! together), and the holds clones of the volume have on them.

use basalt_proto::pb::controller::{
    SnapshotHoldsRequest, SnapshotListRequest, SnapshotReleaseRequest, SnapshotRequest,
};

use super::client::{block_on, connect, status_message};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(clap::Args)]
pub struct Common {
    /// The controller's management API address.
    #[arg(long, default_value = "127.0.0.1:9600")]
    pub api: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
    /// A cluster volume, through the node agent (`--agent`) instead of a
    /// controller's --api (create, ls, rm and revert).
    #[arg(long, conflicts_with = "api")]
    pub volume: Option<String>,
    /// The node agent (with --volume).
    #[command(flatten)]
    pub agent: super::cluster::AgentConn,
}

/// The agent form of a command given `--volume`: the volume, what to do, how to reach the agent.
fn agent_form(
    command: &SnapshotCommand,
) -> anyhow::Result<
    Option<(
        String,
        super::cluster::snapshot::SnapshotOp,
        super::cluster::AgentArgs,
    )>,
> {
    use super::cluster::snapshot::SnapshotOp;
    let (common, op) = match command {
        SnapshotCommand::Create { name, common } => (common, SnapshotOp::Create(name.clone())),
        SnapshotCommand::Ls { common } => (common, SnapshotOp::List),
        SnapshotCommand::Rm { name, common } => (common, SnapshotOp::Delete(name.clone())),
        SnapshotCommand::Revert { name, common } => (common, SnapshotOp::Revert(name.clone())),
        SnapshotCommand::Holds { common } | SnapshotCommand::Release { common, .. } => {
            if common.volume.is_some() {
                anyhow::bail!(
                    "`snapshot holds` and `snapshot release` speak to a controller: use --api, not --volume"
                );
            }
            return Ok(None);
        }
    };
    let Some(volume) = common.volume.clone() else {
        return Ok(None);
    };
    let agent = super::cluster::AgentArgs {
        conn: common.agent.clone(),
        json: common.json,
    };
    Ok(Some((volume, op, agent)))
}

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of the volume on every replica.
    Create {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// List the snapshot chain, oldest first.
    Ls {
        #[command(flatten)]
        common: Common,
    },
    /// Delete a snapshot (its blocks merge into the next one, online).
    Rm {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Revert the volume to a snapshot: later writes and snapshots are
    /// discarded. Refused while initiators are logged in.
    Revert {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// List the holds clones have on this volume's snapshots (a held
    /// snapshot cannot be deleted until its clones are hydrated).
    Holds {
        #[command(flatten)]
        common: Common,
    },
    /// Release a clone's hold on a snapshot by hand: for a clone that was
    /// abandoned before it was hydrated (it can then never be).
    Release {
        name: String,
        /// The holder, as `basalt snapshot holds` lists it.
        #[arg(long)]
        holder: String,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some((volume, op, agent)) = agent_form(&args.command)? {
        return super::cluster::snapshot::run(&volume, op, &agent);
    }
    block_on(async move {
        match args.command {
            SnapshotCommand::Ls { common } => {
                let mut client = connect(&common.api, &common.auth).await?;
                let reply = client
                    .snapshot_list(SnapshotListRequest {})
                    .await
                    .map_err(status_message)?
                    .into_inner();
                if common.json {
                    let snaps: Vec<_> = reply
                        .snapshots
                        .iter()
                        .map(|s| {
                            serde_json::json!({"name": s.name, "created_unix": s.created_unix,
                                "parent": s.parent, "allocated_bytes": s.allocated_bytes})
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"snapshots": snaps, "divergent": reply.divergent})
                    );
                } else {
                    println!(
                        "{:<24} {:<22} {:<24} {:>14}",
                        "NAME", "CREATED (UTC)", "PARENT", "ALLOCATED"
                    );
                    for s in &reply.snapshots {
                        println!(
                            "{:<24} {:<22} {:<24} {:>14}",
                            s.name,
                            format_unix(s.created_unix),
                            if s.parent.is_empty() { "-" } else { &s.parent },
                            s.allocated_bytes
                        );
                    }
                    for d in &reply.divergent {
                        eprintln!("warning: {d}");
                    }
                }
                Ok(())
            }
            SnapshotCommand::Create { name, common } => chain_op(Op::Create, name, common).await,
            SnapshotCommand::Rm { name, common } => chain_op(Op::Delete, name, common).await,
            SnapshotCommand::Revert { name, common } => chain_op(Op::Revert, name, common).await,
            SnapshotCommand::Holds { common } => holds(common).await,
            SnapshotCommand::Release { name, holder, common } => release(name, holder, common).await,
        }
    })
}

enum Op {
    Create,
    Delete,
    Revert,
}

async fn chain_op(op: Op, name: String, common: Common) -> anyhow::Result<()> {
    let mut client = connect(&common.api, &common.auth).await?;
    let request = SnapshotRequest { name: name.clone() };
    let (reply, done) = match op {
        Op::Create => (client.snapshot_create(request).await, "created"),
        Op::Delete => (client.snapshot_delete(request).await, "deleted"),
        Op::Revert => (client.snapshot_revert(request).await, "reverted to"),
    };
    let reply = reply.map_err(status_message)?.into_inner();
    if common.json {
        println!(
            "{}",
            serde_json::json!({"snapshot": name, "result": done, "dropped": reply.dropped})
        );
    } else {
        println!("snapshot {name} {done}");
        for d in &reply.dropped {
            eprintln!("warning: replica {d} failed the operation and was dropped from the volume");
        }
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, without a date library.
fn format_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `basalt snapshot holds`.
async fn holds(common: Common) -> anyhow::Result<()> {
    let mut client = connect(&common.api, &common.auth).await?;
    let reply = client
        .snapshot_holds(SnapshotHoldsRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    if common.json {
        let holds: Vec<_> = reply
            .holds
            .iter()
            .map(|h| {
                serde_json::json!({"snapshot": h.snapshot, "holder": h.holder,
                    "since_unix": h.since_unix, "replicas": h.replicas})
            })
            .collect();
        println!("{}", serde_json::json!({ "holds": holds }));
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:<48} REPLICAS",
        "SNAPSHOT", "SINCE (UTC)", "HOLDER"
    );
    for h in &reply.holds {
        println!(
            "{:<24} {:<22} {:<48} {}",
            h.snapshot,
            format_unix(h.since_unix),
            h.holder,
            h.replicas.join(",")
        );
    }
    Ok(())
}

/// `basalt snapshot release`.
async fn release(name: String, holder: String, common: Common) -> anyhow::Result<()> {
    let mut client = connect(&common.api, &common.auth).await?;
    let reply = client
        .snapshot_release(SnapshotReleaseRequest { name, holder })
        .await
        .map_err(status_message)?
        .into_inner();
    if common.json {
        println!("{}", serde_json::json!({ "message": reply.message }));
    } else {
        println!("{}", reply.message);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(super::format_unix(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_unix(1_795_000_000), "2026-11-18 11:06:40");
    }
}
