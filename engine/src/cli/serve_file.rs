//! `basalt serve-file`: expose a plain file as an iSCSI LUN.

/// Arguments of `basalt serve-file`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`basalt serve-file` is under construction in this build")
}
