//! `basalt replica`: serve one replica store over the data-path protocol.

/// Arguments of `basalt replica`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`basalt replica` is under construction in this build")
}
