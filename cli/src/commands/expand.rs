//! `basalt volume expand`: grow a running volume online, through its
//! controller (every replica grows before the answer; logged-in initiators
//! are told the new capacity). `volume expand NAME --size S` (no `--api`)
//! asks the node agent instead, which records the size for the volume's
//! controller to apply.

use basalt_proto::pb::controller::VolumeExpandRequest;

use super::args::parse_volume_size;
use super::client::{block_on, connect, status_message};

#[derive(clap::Args)]
pub struct ExpandArgs {
    /// A cluster volume to grow through the node agent (`--agent`); without
    /// it, the volume whose controller is at `--api`.
    #[arg(conflicts_with = "api")]
    pub name: Option<String>,
    /// The controller's management API address (default 127.0.0.1:9600).
    #[arg(long)]
    pub api: Option<String>,
    /// The node agent's API URL (with NAME).
    #[arg(long, env = basalt_agent::client::AGENT_ENV, default_value = basalt_agent::client::DEFAULT_AGENT)]
    pub agent: String,
    /// Print the agent's JSON answer (with NAME).
    #[arg(long)]
    pub json: bool,
    /// The new size, e.g. 20G: a multiple of 4 KiB, not below the volume's
    /// (a volume never shrinks). The same size again changes nothing.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

/// The controller's address when `--api` is not given.
const DEFAULT_API: &str = "127.0.0.1:9600";

pub fn expand(args: ExpandArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.name {
        let agent = super::cluster::AgentArgs {
            agent: args.agent.clone(),
            token_file: args.auth.token_file.clone(),
            json: args.json,
        };
        return super::cluster::volume::expand(name, args.size, &agent);
    }
    block_on(async move {
        let api = args.api.as_deref().unwrap_or(DEFAULT_API);
        let mut client = connect(api, &args.auth).await?;
        let reply = client
            .volume_expand(VolumeExpandRequest {
                new_size_bytes: args.size,
            })
            .await
            .map_err(status_message)?
            .into_inner();
        println!("{}", reply.message);
        Ok(())
    })
}
