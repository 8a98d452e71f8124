//! `basalt agent`: the node agent, one per host (see `basalt_agent`).
//!
//! Reads its YAML config (`--config`/`-f`; with none, every default: an
//! embedded store, one pool under `./basalt-data`, the API on
//! 127.0.0.1:9700), registers the node, runs the volumes the store assigns
//! to it and serves the REST API, until SIGTERM or Ctrl-C.
//!
//! Stopping the agent does not stop the volumes: their replicas and
//! controllers keep serving, and the next agent started on the same data
//! directory adopts them (`basalt_agent::runtime::process`). Ctrl-C in a
//! terminal reaches the whole foreground process group, services included,
//! which then stop cleanly too; SIGTERM to the agent alone leaves them
//! running.

use std::path::PathBuf;

use anyhow::Context;
use basalt_agent::config::Config;

/// Arguments of `basalt agent`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The agent's YAML config file (every key has a default; without a
    /// file, all defaults).
    #[arg(long = "config", short = 'f', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the default config, every key commented, and exit.
    #[arg(long, conflicts_with = "config")]
    print_default_config: bool,
    /// Serve only the CSI controller (`endpoints.csi_controller`), as the
    /// CSI controller pod of a cluster does: no node is registered, no
    /// volume runs here.
    #[arg(long)]
    csi_controller_only: bool,
}

/// Worker threads of the agent: it mostly waits on the store, its services
/// and API clients, so two keep a slow request from delaying a reconcile pass.
const WORKER_THREADS: usize = 2;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", Config::default_yaml());
        return Ok(());
    }
    let config = Config::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // shutdown_signal() spawns its watcher task, so it must run inside the runtime.
        if args.csi_controller_only {
            basalt_agent::csi::serve::run_controller_only(config, super::shutdown_signal()).await
        } else {
            basalt_agent::daemon::run(config, super::shutdown_signal()).await
        }
    })
}
