//! Connecting the CLI to a controller's management API.

use std::time::Duration;

use anyhow::Context;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use tonic::transport::Channel;

/// How long the CLI waits for a controller before saying it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the controller at `api` (`host:port` or an `http://` URL).
pub async fn connect(api: &str) -> anyhow::Result<ControllerServiceClient<Channel>> {
    let url = if api.starts_with("http") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    tokio::time::timeout(CONNECT_TIMEOUT, ControllerServiceClient::connect(url))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the controller at {api} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| {
            format!("cannot reach the controller's API at {api} (is the volume running? check --api)")
        })
}

/// Run `f` on a one-thread runtime (the CLI's commands are single requests).
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(f)
}

/// A gRPC status as a message for a person: the controller's own words.
pub fn status_message(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
