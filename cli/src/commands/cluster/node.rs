//! `basalt node ls|inspect|cordon|uncordon|drain`: the cluster's nodes, through the agent's API.

use super::{block_on, human_size, print_json, table, AgentArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// List the nodes: up or down, cordoned, pools, replicas held.
    Ls {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Show one node: labels, pools with capacity, used and free bytes, replicas and controllers.
    Inspect {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// No new replica or controller is placed on the node.
    Cordon {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Undo cordon and drain.
    Uncordon {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Cordon the node and move its replicas elsewhere.
    Drain {
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

fn state(n: &basalt_agent::api::views::NodeView) -> String {
    let mut s = match (n.up, n.down_since_unix) {
        (true, _) => "up".to_string(),
        (false, None) => "down".to_string(),
        (false, Some(since)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("down({})", elapsed(now.saturating_sub(since)))
        }
    };
    if n.draining {
        s.push_str(",draining");
    } else if n.cordoned {
        s.push_str(",cordoned");
    }
    s
}

/// `42s`, `5m12s`, `3h05m`: how long a node has been down, as `node ls` shows it.
fn elapsed(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn print_node(n: &basalt_agent::api::views::NodeView) {
    println!("name:        {}", n.name);
    println!("state:       {}", state(n));
    println!("address:     {}", n.address);
    println!("api:         {}", n.api_url);
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "labels:      {}",
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        }
    );
    println!("ports:       {}-{}", n.ports.first, n.ports.last);
    println!("initiator:   {}", n.initiator);
    println!();
    let pools: Vec<Vec<String>> = n
        .pools
        .iter()
        .map(|p| {
            let (kind, path) = match &p.kind {
                basalt_agent::model::PoolKind::Directory(d) => ("directory", d.display().to_string()),
                basalt_agent::model::PoolKind::BlockDevice(d) => ("device", d.display().to_string()),
            };
            vec![
                p.name.clone(),
                kind.into(),
                path,
                human_size(p.capacity_bytes),
                human_size(p.used_bytes),
                human_size(p.free_bytes),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["POOL", "KIND", "PATH", "CAPACITY", "USED", "FREE"], &pools)
    );
    if !n.replicas.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = n
            .replicas
            .iter()
            .map(|r| {
                vec![
                    r.volume.clone(),
                    r.id.to_string(),
                    r.pool.clone(),
                    r.port.to_string(),
                ]
            })
            .collect();
        println!("{}", table(&["VOLUME", "REPLICA", "POOL", "PORT"], &rows));
    }
    if !n.controllers.is_empty() {
        println!("\ncontrollers: {}", n.controllers.join(", "));
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    block_on(async move {
        let (name, agent, action) = match args.command {
            NodeCommand::Ls { agent } => {
                let nodes = agent.client()?.list_nodes().await?;
                if agent.json {
                    return print_json(&nodes);
                }
                let rows: Vec<Vec<String>> = nodes
                    .nodes
                    .iter()
                    .map(|n| {
                        let capacity: u64 = n.pools.iter().map(|p| p.capacity_bytes).sum();
                        let free: u64 = n.pools.iter().map(|p| p.free_bytes).sum();
                        vec![
                            n.name.to_string(),
                            state(n),
                            n.address.clone(),
                            n.pools.len().to_string(),
                            human_size(capacity),
                            human_size(free),
                            n.replicas.len().to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["NAME", "STATE", "ADDRESS", "POOLS", "CAPACITY", "FREE", "REPLICAS"],
                        &rows
                    )
                );
                return Ok(());
            }
            NodeCommand::Inspect { name, agent } => {
                let node = agent.client()?.inspect_node(&name).await?;
                if agent.json {
                    return print_json(&node);
                }
                print_node(&node);
                return Ok(());
            }
            NodeCommand::Cordon { name, agent } => (name, agent, "cordon"),
            NodeCommand::Uncordon { name, agent } => (name, agent, "uncordon"),
            NodeCommand::Drain { name, agent } => (name, agent, "drain"),
        };
        let node = agent.client()?.node_action(&name, action).await?;
        if agent.json {
            return print_json(&node);
        }
        println!("node {} is now {}", node.name, state(&node));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::elapsed;

    #[test]
    fn down_times_read_at_a_glance() {
        assert_eq!(elapsed(0), "0s");
        assert_eq!(elapsed(59), "59s");
        assert_eq!(elapsed(312), "5m12s");
        assert_eq!(elapsed(3600 + 5 * 60 + 59), "1h05m");
        assert_eq!(elapsed(50 * 3600), "50h00m");
    }
}
