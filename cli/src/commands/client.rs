//! Connecting the CLI to a controller's management API: every call carries the API token (see
//! `basalt_engine::api_auth`).

use std::time::Duration;

use anyhow::Context;
use basalt_engine::api_auth::WithToken;
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::secrets::ClientTokenArgs;

/// How long the CLI waits for a controller before saying it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A management API client that sends the token with every call.
pub type ApiClient = ControllerServiceClient<InterceptedService<Channel, WithToken>>;

/// A client of the controller at `api` (`host:port` or an `http://` URL), sending the token `auth` names.
pub async fn connect(api: &str, auth: &ClientTokenArgs) -> anyhow::Result<ApiClient> {
    let token = auth.load()?;
    let url = if api.starts_with("http") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    let endpoint = Channel::from_shared(url).with_context(|| format!("{api} is not a valid API address"))?;
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the controller at {api} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| {
            format!("cannot reach the controller's API at {api} (is the volume running? check --api)")
        })?;
    Ok(ControllerServiceClient::with_interceptor(
        channel,
        WithToken(token),
    ))
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
