//! `basalt snapshot create|ls|rm|revert --volume NAME [SNAP]`: a cluster volume's snapshots, through the
//! agent (which calls the volume's controller).

use super::{block_on, print_json, table, AgentArgs};

/// What to do with a snapshot.
pub enum SnapshotOp {
    Create(String),
    List,
    Delete(String),
    Revert(String),
}

pub fn run(volume: &str, op: SnapshotOp, agent: &AgentArgs) -> anyhow::Result<()> {
    block_on(async move {
        let client = agent.client()?;
        let (result, done) = match op {
            SnapshotOp::List => {
                let list = client.list_snapshots(volume).await?;
                if agent.json {
                    return print_json(&list);
                }
                let rows: Vec<Vec<String>> = list
                    .snapshots
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.created_unix.to_string(),
                            if s.parent.is_empty() {
                                "-".into()
                            } else {
                                s.parent.clone()
                            },
                            s.allocated_bytes.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "CREATED (UNIX)", "PARENT", "ALLOCATED"], &rows)
                );
                for d in &list.divergent {
                    eprintln!("warning: {d}");
                }
                return Ok(());
            }
            SnapshotOp::Create(s) => (client.create_snapshot(volume, &s).await?, "created"),
            SnapshotOp::Delete(s) => (client.delete_snapshot(volume, &s).await?, "deleted"),
            SnapshotOp::Revert(s) => (client.revert_snapshot(volume, &s).await?, "reverted to"),
        };
        if agent.json {
            return print_json(&result);
        }
        println!("volume {}: snapshot {} {done}", result.volume, result.snapshot);
        for d in &result.dropped {
            eprintln!("warning: replica {d} failed the operation and was dropped from the volume");
        }
        Ok(())
    })
}
