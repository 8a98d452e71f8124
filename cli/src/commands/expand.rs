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
    #[command(flatten)]
    pub target: super::cluster::VolumeTarget,
    /// The new size, e.g. 20G: a multiple of 4 KiB, not below the volume's
    /// (a volume never shrinks). The same size again changes nothing.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

pub fn expand(args: ExpandArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.target.name {
        let agent = args.target.agent_args();
        return super::cluster::volume::expand(name, args.size, &agent);
    }
    block_on(async move {
        let api = args.target.api();
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
