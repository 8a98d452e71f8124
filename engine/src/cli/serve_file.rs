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
use basalt_target::iscsi::{
    target_iqn, AllowList, AuthPolicy, ChapCredentials, ChapSecret, Portal, PortalConfig, Target,
    TargetConfig,
};
use basalt_target::scsi::{LuConfig, ScsiLogicalUnit};
use tokio_util::sync::CancellationToken;

/// Environment variable holding the CHAP secret initiators must know.
pub const CHAP_SECRET_ENV: &str = "BASALT_CHAP_SECRET";
/// Environment variable holding the target's own secret (mutual CHAP).
pub const CHAP_TARGET_SECRET_ENV: &str = "BASALT_CHAP_TARGET_SECRET";

/// Arguments of `basalt serve-file`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The file (or block device) to serve.
    #[arg(long)]
    pub file: PathBuf,
    /// Portal address to listen on.
    #[arg(long, default_value = "0.0.0.0:3260")]
    pub iscsi: SocketAddr,
    /// Volume name: the target is iqn.2026-11.io.basalt:<NAME>.
    #[arg(long, default_value = "vol0")]
    pub name: String,
    /// Logical block size in bytes (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    /// Capacity (e.g. 10G, 512M, 1T, or bytes): creates the file if missing
    /// and extends it sparsely if shorter. Without it the file's size is used.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Require CHAP with this user name; the secret is read from the
    /// BASALT_CHAP_SECRET environment variable (never from the command line).
    #[arg(long)]
    pub chap_user: Option<String>,
    /// Offer mutual CHAP under this target user name; the target's secret is
    /// read from BASALT_CHAP_TARGET_SECRET.
    #[arg(long, requires = "chap_user")]
    pub chap_target_user: Option<String>,
    /// Only these initiator names may log in (repeatable). Default: any.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("block size {s:?} is not supported: use 512 or 4096")),
    }
}

/// Parse `10G`, `512M`, `4096`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 10G, 512M or 4096"))?;
    let shift = match unit.trim_end_matches(['i', 'B']).to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} does not fit in 64 bits"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let auth = match &args.chap_user {
        None => AuthPolicy::None,
        Some(user) => {
            let initiator = ChapCredentials::new(user, ChapSecret::from_env(CHAP_SECRET_ENV)?)?;
            let target = match &args.chap_target_user {
                Some(t) => Some(ChapCredentials::new(
                    t,
                    ChapSecret::from_env(CHAP_TARGET_SECRET_ENV)?,
                )?),
                None => None,
            };
            AuthPolicy::chap(initiator, target)?
        }
    };
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
        LuConfig::new(args.name.clone()),
    ));
    let name = target_iqn(&args.name);
    let target = Target::new(TargetConfig {
        alias: Some(args.name.clone()),
        auth,
        allow: if args.allow.is_empty() {
            AllowList::Any
        } else {
            AllowList::Only(args.allow.clone())
        },
        ..TargetConfig::new(name.clone(), lu)
    })?;
    let portal = Portal::new(PortalConfig::default(), [target]);

    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.iscsi)
            .await
            .with_context(|| format!("binding the iSCSI portal to {} (in use? try --iscsi)", args.iscsi))?;
        eprintln!(
            "basalt: serving {} as {name} on {}",
            args.file.display(),
            listener.local_addr()?
        );
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; logging sessions out and stopping");
            signal.cancel();
        });
        portal
            .serve(listener, shutdown)
            .await
            .context("serving the iSCSI portal")
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
    }
}
