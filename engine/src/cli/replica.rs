//! `basalt replica`: serve one replica store over the data-path protocol.
//!
//! Opens the store in `--dir` (creating it if the directory holds none),
//! serves data and control on `--listen`, metrics on `--metrics`, and on
//! SIGTERM or Ctrl-C stops accepting, finishes what it accepted, flushes and
//! exits 0. Once listening it prints `listening <addr>` on stdout (and
//! `metrics <addr>` if enabled), so that scripts and tests can use port 0.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use basalt_proto::VolumeId;
use basalt_replica::server::{bind_metrics, serve_metrics, Metrics, Server};
use basalt_replica::store::Store;
use tokio_util::sync::CancellationToken;

/// The store's allocation unit: a volume is a whole number of 4 KiB blocks.
const BLOCK_SIZE: u64 = 4096;

/// Arguments of `basalt replica`.
#[derive(clap::Args)]
pub struct Args {
    /// Host directory of the replica store (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Volume size: bytes, or with a binary suffix K, M, G, T (`10G`, `512M`);
    /// a multiple of 4096. Must match the size of an existing store.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Address for the data-path protocol (data and control), e.g. `0.0.0.0:7100`.
    #[arg(long)]
    listen: SocketAddr,
    /// Address for Prometheus metrics (`GET /metrics`); off if not given.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Volume UUID: required to match an existing store; a new store gets a
    /// random one if not given.
    #[arg(long)]
    volume_id: Option<uuid::Uuid>,
}

/// Parses `10G`, `512M`, `1T`, `4096`, ... into bytes (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => {
                    return Err(format!(
                        "unknown size suffix {c:?} in {text:?}: use K, M, G, T or plain bytes"
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 10G, 512M, 1T or a number of bytes"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 || bytes % BLOCK_SIZE != 0 {
        return Err(format!(
            "{text:?} = {bytes} bytes is not a positive multiple of {BLOCK_SIZE} bytes; round it to a whole \
             number of 4 KiB blocks"
        ));
    }
    Ok(bytes)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("basalt-replica")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let (dir, size, volume) = (args.dir.clone(), args.size, args.volume_id.map(VolumeId));
    let store = tokio::task::spawn_blocking(move || Store::open_or_create(&dir, size, volume))
        .await
        .context("opening the store")?
        .with_context(|| format!("cannot open the replica store in {}", args.dir.display()))?;
    let store = Arc::new(store);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();

    let server = Server::bind(args.listen, store.clone(), metrics.clone()).await?;
    let mut announce = format!("listening {}\n", server.local_addr());
    if let Some(addr) = args.metrics {
        let listener = bind_metrics(addr).await.with_context(|| {
            format!("cannot listen for metrics on {addr}; pick another --metrics address")
        })?;
        announce.push_str(&format!("metrics {}\n", listener.local_addr()?));
        tokio::spawn(serve_metrics(listener, metrics, store.clone(), shutdown.clone()));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(announce.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    drop(stdout);

    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = server.run(shutdown.clone()).await;
    shutdown.cancel();
    result.context("the replica server failed")
}

/// Cancels `shutdown` on SIGTERM or SIGINT (Ctrl-C).
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop the replica with SIGKILL");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_accept_binary_suffixes_and_plain_bytes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("8192"), Ok(8192));
    }

    #[test]
    fn sizes_that_are_not_whole_blocks_are_refused_with_the_reason() {
        let err = parse_size("1000").unwrap_err();
        assert!(err.contains("multiple of 4096"), "{err}");
        assert!(parse_size("0").unwrap_err().contains("positive"));
        assert!(parse_size("10X").unwrap_err().contains("suffix"));
        assert!(parse_size("1.5G").unwrap_err().contains("not a size"));
        assert!(parse_size("99999999999T").unwrap_err().contains("too large"));
    }
}
