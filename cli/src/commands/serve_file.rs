//! `basalt serve-file`: expose a plain file (or a host block device) as LUN 0
//! of an iSCSI target, `iqn.2026-11.io.basalt:<name>`.
//!
//! The whole stack of the front door without replication: iSCSI portal →
//! SCSI logical unit → [`FileDevice`]. Used by tests and benchmarks (it is
//! what is compared with Debian's tgt), and as a simple target in its own
//! right. Stops cleanly on SIGINT / SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use basalt_target::file::{FileDevice, FileDeviceOptions};
use basalt_target::iscsi::{Portal, PortalConfig, Target, TargetConfig};
use basalt_target::scsi::{LuConfig, ScsiLogicalUnit};

/// Arguments of `basalt serve-file`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The file (or block device) to serve.
    #[arg(long)]
    pub file: PathBuf,
    /// Portal address to listen on.
    #[arg(long, default_value = "0.0.0.0:3260")]
    pub iscsi: SocketAddr,
    /// Volume name: the target is iqn.2026-11.io.basalt:<NAME> (1 to 63
    /// characters from a-z, 0-9, '-' and '.', starting and ending with a
    /// letter or a digit).
    #[arg(long, default_value = "vol0")]
    pub name: basalt_engine::name::VolumeName,
    /// Logical block size in bytes (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    /// Capacity (e.g. 10G, 512M, 1T, or bytes): creates the file if missing
    /// and extends it sparsely if shorter. Without it the file's size is used.
    #[arg(long, value_parser = super::args::parse_size)]
    pub size: Option<u64>,
    #[command(flatten)]
    pub access: super::access::Access,
    /// Threads that run the iSCSI sessions and the page-cache I/O (FUA writes, flushes and large
    /// transfers run on a separate blocking pool). One keeps a command's receive, I/O and response on
    /// one thread; raise it only for a target that needs more than one core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub io_threads: u16,
    #[command(flatten)]
    pub busy_poll: super::args::BusyPoll,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size {s:?} is not supported: use 512 or 4096")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let auth = args.access.auth()?;
    let device = FileDevice::open(
        &args.file,
        FileDeviceOptions {
            size: args.size,
            logical_block_size: args.block_size,
        },
    )
    .with_context(|| format!("opening {} for serve-file", args.file.display()))?;
    let lu = Arc::new(ScsiLogicalUnit::new(
        Arc::new(device),
        LuConfig::new(args.name.to_string()),
    ));
    let name = args.name.iqn();
    let target = Target::new(TargetConfig {
        alias: Some(args.name.to_string()),
        auth,
        allow: args.access.allow_list(),
        ..TargetConfig::new(name.clone(), lu)
    })?;
    let portal = Portal::new(PortalConfig::default(), [target]);

    let runtime =
        basalt_poll::runtime(args.io_threads, "basalt-serve-file").context("starting the tokio runtime")?;
    runtime.block_on(async move {
        args.busy_poll.start();
        let listener = tokio::net::TcpListener::bind(args.iscsi)
            .await
            .with_context(|| format!("binding the iSCSI portal to {} (in use? try --iscsi)", args.iscsi))?;
        eprintln!(
            "basalt: serving {} as {name} on {}",
            args.file.display(),
            listener.local_addr()?
        );
        let shutdown = super::shutdown_signal();
        portal
            .serve(listener, shutdown)
            .await
            .context("serving the iSCSI portal")
    })
}
