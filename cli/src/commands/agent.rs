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
}

/// Worker threads of the agent: it mostly waits on the store, its services
/// and API clients, so two keep a slow request from delaying a reconcile pass.
const WORKER_THREADS: usize = 2;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.print_default_config {
        anyhow::bail!(
            "--print-default-config needs the agent-config branch (not merged into this build yet)"
        );
    }
    let config = seam_load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        // shutdown_signal() spawns its watcher task, so it must run inside the runtime.
        basalt_agent::daemon::run(config, super::shutdown_signal()).await
    })
}

// SEAM(agent-config): `Config::load` and `Config::default_yaml` come with the agent-config branch; until it
// is merged the agent runs with these built-in defaults only, and refuses a config file.
fn seam_load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    use basalt_agent::config::*;
    use basalt_agent::model::{NodeName, PortRange};
    if let Some(p) = path {
        anyhow::bail!(
            "{}: config files are not read by this build yet (agent-config branch); run without --config",
            p.display()
        );
    }
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name = NodeName::new(host.trim())
        .or_else(|_| NodeName::new("node"))
        .map_err(anyhow::Error::msg)?;
    let data_dir = PathBuf::from("basalt-data");
    Ok(Config {
        node: NodeConfig {
            name,
            address: "127.0.0.1".parse()?,
            labels: Default::default(),
            ports: PortRange {
                first: 7100,
                last: 7999,
            },
        },
        pools: vec![PoolConfig {
            name: "default".into(),
            kind: PoolKindConfig::Directory(data_dir.join("pools/default")),
            capacity_bytes: None,
        }],
        data_dir,
        cluster: ClusterConfig::Embedded,
        endpoints: EndpointsConfig {
            api: Some(ApiEndpoint {
                listen: "127.0.0.1:9700".parse()?,
                token_file: None,
                tls_cert_file: None,
                tls_key_file: None,
            }),
            docker: None,
            csi: None,
        },
        runtime: RuntimeConfig::Process { binary: None },
        failover: FailoverConfig {
            replica_grace: std::time::Duration::from_secs(300),
        },
    })
}
