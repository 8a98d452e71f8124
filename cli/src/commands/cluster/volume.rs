//! `basalt volume create|ls|inspect|rm|expand|attach|detach` against the node agent: the cluster's
//! volumes, created and placed by the agents (as opposed to `volume up`, which runs one volume here).

use std::collections::BTreeMap;

use anyhow::bail;
use basalt_agent::api::views::{CreateVolume, Qos, VolumeView};
use basalt_agent::model::QosSpec;

use super::super::args::{parse_size, parse_volume_size};
use super::super::qos::QosFlags;
use super::{block_on, human_size, or_dash, print_json, table, AgentArgs};

/// QoS limits at creation, as the API takes them (rates only; no flag: no limit).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct QosArgs {
    /// Read I/Os per second.
    #[arg(long)]
    pub qos_read_iops: Option<u64>,
    /// Write I/Os per second.
    #[arg(long)]
    pub qos_write_iops: Option<u64>,
    /// I/Os per second, reads and writes together.
    #[arg(long)]
    pub qos_iops: Option<u64>,
    /// Read bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    pub qos_read_bps: Option<u64>,
    /// Write bytes per second (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    pub qos_write_bps: Option<u64>,
    /// Bytes per second, reads and writes together.
    #[arg(long, value_parser = parse_size)]
    pub qos_bps: Option<u64>,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The volume's name (1 to 63 of a-z, 0-9, '-', '.').
    pub name: String,
    /// Its size, e.g. 10G (a multiple of 4 KiB). A clone (--from-snapshot) defaults to its source's.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: Option<u64>,
    /// Number of replicas, each on a distinct node (or pool, on a one-host cluster).
    #[arg(long, default_value_t = 3)]
    pub replicas: u8,
    /// Fewest read-write replicas with which the volume serves I/O (default: a majority).
    #[arg(long)]
    pub min_healthy: Option<u8>,
    /// Only nodes with this label hold replicas: KEY=VALUE, repeatable.
    #[arg(long, value_parser = parse_label)]
    pub selector: Vec<(String, String)>,
    /// Replicas go to distinct values of this node label where possible (default: zone).
    #[arg(long)]
    pub spread_key: Option<String>,
    /// Make the volume a clone of a snapshot: VOLUME/SNAPSHOT.
    #[arg(long, value_name = "VOLUME/SNAPSHOT")]
    pub from_snapshot: Option<String>,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub agent: AgentArgs,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE (e.g. zone=a)")),
    }
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// Only volumes in this phase (creating, ready, degraded, deleting).
    #[arg(long)]
    pub phase: Option<String>,
    /// Only volumes with a replica or the controller on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only volumes whose selector has KEY=VALUE.
    #[arg(long)]
    pub label: Option<String>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(clap::Args)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    pub name: String,
    /// The node (the initiator's host) that uses the volume.
    #[arg(long)]
    pub node: String,
    #[command(flatten)]
    pub agent: AgentArgs,
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    if args.size.is_none() && args.from_snapshot.is_none() {
        bail!("--size is required (e.g. --size 10G), unless --from-snapshot VOLUME/SNAPSHOT makes a clone");
    }
    let q = &args.qos;
    let req = CreateVolume {
        name: args.name.clone(),
        size_bytes: args.size,
        replicas: Some(args.replicas),
        min_healthy: args.min_healthy,
        selector: args.selector.iter().cloned().collect::<BTreeMap<_, _>>(),
        spread_key: args.spread_key.clone(),
        qos: Qos(QosSpec {
            read_iops: q.qos_read_iops,
            write_iops: q.qos_write_iops,
            total_iops: q.qos_iops,
            read_bytes_per_sec: q.qos_read_bps,
            write_bytes_per_sec: q.qos_write_bps,
            total_bytes_per_sec: q.qos_bps,
        }),
        from_snapshot: args.from_snapshot.clone(),
        // Open to any initiator at its URL, anywhere: the CLI's volumes are used by hand.
        topology: Default::default(),
        access: Default::default(),
    };
    block_on(async move {
        let v = args.agent.client()?.create_volume(&req).await?;
        if args.agent.json {
            return print_json(&v);
        }
        println!(
            "volume {} created ({}, {} replicas); its services are starting: `basalt volume inspect {}` shows progress",
            v.name,
            human_size(v.size_bytes),
            v.replicas,
            v.name
        );
        print_placement(&v);
        Ok(())
    })
}

fn print_placement(v: &VolumeView) {
    let rows: Vec<Vec<String>> = v
        .placement
        .replicas
        .iter()
        .map(|r| {
            let status = v.statuses.get(&format!("replica-{}", r.id));
            vec![
                format!("replica-{}", r.id),
                r.node.to_string(),
                r.pool.clone(),
                r.port.to_string(),
                or_dash(status.map(|s| format!("{:?}", s.state).to_lowercase())),
                or_dash(status.and_then(replica_mode)),
            ]
        })
        .chain(v.placement.controller.iter().map(|c| {
            vec![
                "controller".to_string(),
                c.node.to_string(),
                "-".into(),
                format!("{},{}", c.iscsi_port, c.api_port),
                or_dash(
                    v.statuses
                        .get("controller")
                        .map(|s| format!("{:?}", s.state).to_lowercase()),
                ),
                or_dash(
                    v.statuses
                        .get("controller")
                        .and_then(|s| s.report.as_ref())
                        .map(|r| format!("epoch {}", r.epoch)),
                ),
            ]
        }))
        .collect();
    println!(
        "{}",
        table(&["SERVICE", "NODE", "POOL", "PORT", "STATE", "MODE"], &rows)
    );
    for w in &v.warnings {
        eprintln!("warning: {w}");
    }
}

/// A replica's mode as its controller reports it, with the progress of a rebuild or hydration:
/// `rw`, `wo 42% rebuilt`, `err`, `rw 10% hydrated`.
fn replica_mode(s: &basalt_agent::model::ServiceStatus) -> Option<String> {
    let percent = |p: &basalt_agent::model::Progress| p.done_bytes.saturating_mul(100) / p.total_bytes.max(1);
    let mut out = format!("{:?}", s.mode?).to_lowercase();
    if let Some(p) = &s.rebuild {
        out.push_str(&format!(" {}% rebuilt", percent(p)));
    }
    if let Some(p) = &s.hydration {
        out.push_str(&format!(" {}% hydrated", percent(p)));
    }
    Some(out)
}

/// The phase; while deleting, with the nodes that have not yet removed their parts.
fn phase(v: &VolumeView) -> String {
    let p = serde_json::to_value(v.phase)
        .ok()
        .and_then(|p| p.as_str().map(str::to_string))
        .unwrap_or_default();
    if v.cleanup_pending.is_empty() {
        p
    } else {
        let nodes: Vec<&str> = v.cleanup_pending.iter().map(|n| n.as_str()).collect();
        format!("{p} (pending: {})", nodes.join(","))
    }
}

pub fn ls(args: LsArgs) -> anyhow::Result<()> {
    block_on(async move {
        let mut filters = Vec::new();
        if let Some(p) = &args.phase {
            filters.push(("phase", p.as_str()));
        }
        if let Some(n) = &args.node {
            filters.push(("node", n.as_str()));
        }
        if let Some(l) = &args.label {
            filters.push(("label", l.as_str()));
        }
        let list = args.agent.client()?.list_volumes(&filters).await?;
        if args.agent.json {
            return print_json(&list);
        }
        let rows: Vec<Vec<String>> = list
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    human_size(v.size_bytes),
                    v.replicas.to_string(),
                    phase(v),
                    or_dash(v.attached_to.as_ref().map(ToString::to_string)),
                    or_dash(v.iscsi_url.clone()),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["NAME", "SIZE", "REPLICAS", "PHASE", "ATTACHED", "URL"], &rows)
        );
        Ok(())
    })
}

pub fn inspect(args: NameArgs) -> anyhow::Result<()> {
    block_on(async move {
        let v = args.agent.client()?.inspect_volume(&args.name).await?;
        if args.agent.json {
            return print_json(&v);
        }
        println!("name:        {}", v.name);
        println!("uuid:        {}", v.uuid);
        println!(
            "size:        {} ({} bytes)",
            human_size(v.size_bytes),
            v.size_bytes
        );
        println!("phase:       {}", phase(&v));
        println!("replicas:    {}", v.replicas);
        println!(
            "attached:    {}",
            or_dash(v.attached_to.as_ref().map(ToString::to_string))
        );
        println!("url:         {}", or_dash(v.iscsi_url.clone()));
        if let Some(s) = &v.source {
            println!("clone of:    {}/{}", s.volume, s.snapshot);
        }
        println!();
        print_placement(&v);
        for (service, s) in &v.statuses {
            if let Some(m) = &s.message {
                eprintln!("{service} on {}: {m}", s.node);
            }
        }
        Ok(())
    })
}

/// A change answered with the volume's view: print it, or one line.
fn changed(agent: &AgentArgs, v: &VolumeView, what: &str) -> anyhow::Result<()> {
    if agent.json {
        return print_json(v);
    }
    println!("volume {} {what}", v.name);
    Ok(())
}

pub fn rm(args: NameArgs) -> anyhow::Result<()> {
    block_on(async move {
        let v = args.agent.client()?.delete_volume(&args.name).await?;
        changed(
            &args.agent,
            &v,
            "is being deleted: each node's agent stops its services and removes its data (a node that is \
             down finishes when it is back; `volume inspect` shows the nodes pending)",
        )
    })
}

pub fn expand(name: &str, size: u64, agent: &AgentArgs) -> anyhow::Result<()> {
    block_on(async move {
        let v = agent.client()?.expand_volume(name, size).await?;
        changed(agent, &v, &format!("grows to {}", human_size(v.size_bytes)))
    })
}

/// `volume qos NAME`: the given rates replace those kinds' limits (all limits with `clear`) in the
/// volume's record, which the agent applies at its controller; no flag and no `clear`: show them.
pub fn qos(name: &str, clear: bool, flags: &QosFlags<false>, agent: &AgentArgs) -> anyhow::Result<()> {
    block_on(async move {
        let client = agent.client()?;
        let current = client.inspect_volume(name).await?;
        let v = if clear || !flags.is_empty() {
            let base = if clear { QosSpec::default() } else { current.qos };
            let spec = flags.agent_spec(base)?;
            client.set_qos(name, &Qos(spec)).await?
        } else {
            current
        };
        if agent.json {
            return print_json(&v);
        }
        println!(
            "volume {}: QoS limits in force: {}",
            v.name,
            describe_spec(&v.qos)
        );
        Ok(())
    })
}

/// A volume's limits as a person reads them: `read_iops 500/s, write_bytes_per_sec 1048576/s`, or `none`.
fn describe_spec(q: &QosSpec) -> String {
    let parts: Vec<String> = [
        ("read_iops", q.read_iops),
        ("write_iops", q.write_iops),
        ("total_iops", q.total_iops),
        ("read_bytes_per_sec", q.read_bytes_per_sec),
        ("write_bytes_per_sec", q.write_bytes_per_sec),
        ("total_bytes_per_sec", q.total_bytes_per_sec),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k} {v}/s")))
    .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

pub fn attach(args: AttachArgs) -> anyhow::Result<()> {
    block_on(async move {
        let v = args.agent.client()?.attach_volume(&args.name, &args.node).await?;
        changed(&args.agent, &v, &format!("is attached to {}", args.node))
    })
}

pub fn detach(args: NameArgs) -> anyhow::Result<()> {
    block_on(async move {
        let v = args.agent.client()?.detach_volume(&args.name).await?;
        changed(&args.agent, &v, "is detached")
    })
}
