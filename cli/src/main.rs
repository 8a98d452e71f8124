//! `basalt`: the one binary. Each subcommand is a role (replica, controller,
//! file-backed target) or a client of a running volume; each lives in its own
//! module under `cli/`.

use clap::{Parser, Subcommand};

mod commands;

#[derive(Parser)]
#[command(
    name = "basalt",
    version,
    about = "Basalt: replicated block storage served over iSCSI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one replica of a volume from a host directory or a raw block device.
    Replica(commands::replica::Args),
    /// Expose a plain file as an iSCSI LUN (for tests and benchmarks).
    ServeFile(commands::serve_file::Args),
    /// Serve one replicated volume over iSCSI (the target controller).
    Controller(commands::controller::Args),
    /// Run a whole volume locally, or look at a running one.
    Volume(commands::volume::Args),
    /// Create, list, delete and revert a volume's snapshots.
    Snapshot(commands::snapshot::Args),
    /// The node agent: provisions and runs this host's volumes, serves the REST API.
    Agent(commands::agent::Args),
    /// Probe a controller (--api) or a replica (--replica): exit 0 if healthy, 1 otherwise.
    Health(commands::health::Args),
    /// List, inspect, cordon, uncordon and drain the cluster's nodes (node agent).
    Node(commands::cluster::node::Args),
}

fn main() -> std::process::ExitCode {
    commands::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replica(args) => commands::replica::run(args),
        Command::ServeFile(args) => commands::serve_file::run(args),
        Command::Controller(args) => commands::controller::run(args),
        Command::Volume(args) => commands::volume::run(args),
        Command::Snapshot(args) => commands::snapshot::run(args),
        Command::Health(args) => commands::health::run(args),
        Command::Agent(args) => commands::agent::run(args),
        Command::Node(args) => commands::cluster::node::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain: what failed and why.
            eprintln!("basalt: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
