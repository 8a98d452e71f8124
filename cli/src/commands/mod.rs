//! Subcommands of the `basalt` binary, one module each.

pub mod access;
pub mod agent;
pub mod args;
pub mod client;
pub mod cluster;
pub mod controller;
pub mod expand;
pub mod health;
pub mod qos;
pub mod replica;
pub mod secrets;
pub mod serve_file;
pub mod snapshot;
pub mod volume;

/// Structured logs to stderr; `RUST_LOG` selects the level (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on SIGTERM or Ctrl-C (SIGINT): every long-running role
/// shuts down cleanly on either (stop accepting, finish, flush, close).
/// Must be called inside a tokio runtime.
pub fn shutdown_signal() -> tokio_util::sync::CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; stop this process with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
                cancel.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
        }
        cancel.cancel();
    });
    token
}
