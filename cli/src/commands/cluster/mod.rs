//! The CLI's cluster commands: clients of a node agent's REST API (`basalt_agent::client`), as opposed
//! to the per-controller commands that speak gRPC to one running volume.
//!
//! Every command takes `--agent URL` (default `http://127.0.0.1:9700`, or `BASALT_AGENT`), the token
//! from `--agent-token-file` / `BASALT_AGENT_TOKEN_FILE` or `BASALT_AGENT_TOKEN` (else the default
//! agent's generated `./basalt-data/_agent/api-token`, for an agent on this host), `--agent-ca` /
//! `BASALT_AGENT_CA` for an agent serving HTTPS, and `--json` for the API's own JSON instead of a table.

pub mod node;
pub mod snapshot;
pub mod volume;

use std::path::PathBuf;

pub use super::client::block_on;
use anyhow::Context;
use basalt_agent::client::{self, AgentClient};

/// How to reach the agent: its URL, its token, the CA of its certificate.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentConn {
    /// The node agent's API URL (https:// when it serves TLS, with --agent-ca).
    #[arg(long, env = client::AGENT_ENV, default_value = client::DEFAULT_AGENT)]
    pub agent: String,
    /// File holding the agent's API token (its config's token_file, or DATA_DIR/api-token when it
    /// generated one). Without it: BASALT_AGENT_TOKEN (the token itself), then, for an agent on this
    /// host, ./basalt-data/_agent/api-token.
    #[arg(long, env = client::TOKEN_FILE_ENV, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the agent's tls_cert_file: speak HTTPS and check the agent
    /// against this CA.
    #[arg(long, env = client::CA_ENV, value_name = "FILE")]
    pub agent_ca: Option<PathBuf>,
}

impl AgentConn {
    pub fn client(&self) -> anyhow::Result<AgentClient> {
        let token = client::load_token(self.agent_token_file.as_deref(), &self.agent)?;
        let mut c = AgentClient::new(&self.agent, None)?.with_token(token);
        if let Some(ca) = &self.agent_ca {
            let pem = std::fs::read(ca).with_context(|| {
                format!(
                    "cannot read the agent CA file {} (--agent-ca or {})",
                    ca.display(),
                    client::CA_ENV
                )
            })?;
            c = c.with_ca(&pem, &ca.display().to_string())?;
        }
        Ok(c)
    }
}

/// Where the agent is and how to talk to it.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub conn: AgentConn,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl AgentArgs {
    pub fn client(&self) -> anyhow::Result<AgentClient> {
        self.conn.client()
    }
}

/// The controller's management API address when `--api` is not given.
pub const DEFAULT_CONTROLLER_API: &str = "127.0.0.1:9600";

/// Which volume a command that exists in both forms acts on (`volume expand`, `volume qos`): a cluster
/// volume by NAME through the node agent, or the volume whose controller is at `--api`.
#[derive(clap::Args)]
pub struct VolumeTarget {
    /// A cluster volume, through the node agent (`--agent`); without it, the volume whose controller
    /// is at `--api`.
    #[arg(conflicts_with = "api")]
    pub name: Option<String>,
    /// The controller's management API address (default 127.0.0.1:9600).
    #[arg(long)]
    pub api: Option<String>,
    /// The node agent (with NAME).
    #[command(flatten)]
    pub agent: AgentConn,
    /// Print the agent's JSON answer (with NAME).
    #[arg(long)]
    pub json: bool,
}

impl VolumeTarget {
    /// The agent form's arguments.
    pub fn agent_args(&self) -> AgentArgs {
        AgentArgs {
            conn: self.agent.clone(),
            json: self.json,
        }
    }

    pub fn api(&self) -> &str {
        self.api.as_deref().unwrap_or(DEFAULT_CONTROLLER_API)
    }
}

/// Print `value` as one line of JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value).context("encoding the answer")?);
    Ok(())
}

/// Rows as a table whose columns are as wide as their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Bytes for a person, in the largest unit they reach: `10 GiB`, `1.5 TiB`, `100 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        let size = 1u64 << shift;
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes >> shift)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// `-` for nothing.
pub fn or_dash(s: Option<String>) -> String {
    s.unwrap_or_else(|| "-".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a-long-name".into(), "1".into()],
                vec!["b".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME         SIZE\na-long-name  1\nb            22");
    }

    #[test]
    fn sizes_read_as_units() {
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size((3 << 30) + 4096), "3.0 GiB");
    }
}
