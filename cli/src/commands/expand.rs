//! `basalt volume expand`: grow a running volume online, through its
//! controller (every replica grows before the answer; logged-in initiators
//! are told the new capacity).

use basalt_proto::pb::controller::VolumeExpandRequest;

use super::args::parse_volume_size;
use super::client::{block_on, connect, status_message};

#[derive(clap::Args)]
pub struct ExpandArgs {
    /// The controller's management API address.
    #[arg(long, default_value = "127.0.0.1:9600")]
    pub api: String,
    /// The new size, e.g. 20G: a multiple of 4 KiB, not below the volume's
    /// (a volume never shrinks). The same size again changes nothing.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: u64,
    #[command(flatten)]
    pub auth: super::secrets::ApiClientArgs,
}

pub fn expand(args: ExpandArgs) -> anyhow::Result<()> {
    block_on(async move {
        let mut client = connect(&args.api, &args.auth).await?;
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
