//! Connecting the CLI to a controller's management API, the one place every command does it: every
//! call carries the API token (see `basalt_engine::api_auth`), and with a CA (`--api-ca` or
//! `BASALT_API_CA`) the connection is TLS, the controller checked against that CA (see
//! `basalt_engine::api_tls`). Without a CA the connection is plaintext, which a controller without
//! `--api-tls-cert` expects.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use basalt_engine::api_auth::{ApiToken, WithToken};
use basalt_engine::api_tls::{self, ConnectFailure};
use basalt_proto::pb::controller::controller_service_client::ControllerServiceClient;
use basalt_proto::pb::controller::VolumeInfoRequest;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use super::secrets::ApiClientArgs;

/// How long the CLI waits for a controller before saying it is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable naming the CA file, like `--api-ca`.
pub const CA_ENV: &str = "BASALT_API_CA";

/// A management API client that sends the token with every call.
pub type ApiClient = ControllerServiceClient<InterceptedService<Channel, WithToken>>;

/// How to reach a controller whose API serves TLS.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ApiTlsArgs {
    /// CA certificate (PEM) that signed the controller's API certificate (its --api-tls-cert): connect
    /// with TLS and check the controller against this CA. Without it, and without BASALT_API_CA, the
    /// connection is plaintext.
    #[arg(long, env = CA_ENV, value_name = "FILE")]
    pub api_ca: Option<PathBuf>,
    /// The name the controller's certificate must carry, when it is not the host of --api (e.g. --api
    /// 10.0.0.5:9600 to a certificate for vol1-controller.basalt.svc).
    #[arg(long, env = "BASALT_API_TLS_NAME", value_name = "NAME", requires = "api_ca")]
    pub api_tls_name: Option<String>,
}

impl ApiTlsArgs {
    /// The client TLS configuration, or `None` for plaintext.
    pub fn load(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let Some(path) = &self.api_ca else {
            return Ok(None);
        };
        let pem = std::fs::read(path).with_context(|| {
            format!(
                "cannot read the API CA file {} (--api-ca or {CA_ENV})",
                path.display()
            )
        })?;
        let config = api_tls::client_config(&pem, self.api_tls_name.as_deref()).with_context(|| {
            format!(
                "the API CA file {} (--api-ca or {CA_ENV}) is not usable: give the PEM certificate of the \
                 CA that signed the controller's --api-tls-cert",
                path.display()
            )
        })?;
        Ok(Some(config))
    }
}

/// A client of the controller at `api` (`host:port` or an `http://`/`https://` URL), with the token and
/// the TLS settings `args` name.
pub async fn connect(api: &str, args: &ApiClientArgs) -> anyhow::Result<ApiClient> {
    let token = args.load_token()?;
    let tls = args.tls.load()?;
    connect_with(api, token, tls, CONNECT_TIMEOUT).await
}

/// [`connect`] with the token and TLS configuration already loaded and a deadline of its own.
pub async fn connect_with(
    api: &str,
    token: ApiToken,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
) -> anyhow::Result<ApiClient> {
    let url = api_url(api, tls.is_some());
    let mut endpoint =
        Channel::from_shared(url).with_context(|| format!("{api} is not a valid API address"))?;
    let tls_on = tls.is_some();
    if let Some(config) = tls {
        endpoint = endpoint.tls_config(config).with_context(|| {
            format!("cannot set up TLS for the controller's API at {api} (check --api and --api-tls-name)")
        })?;
    }
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the controller at {api} within {timeout:?}{}",
                if tls_on {
                    ""
                } else {
                    " (if its API serves TLS, pass --api-ca FILE or set BASALT_API_CA)"
                }
            )
        })?
        .map_err(|e| anyhow::anyhow!(connect_error(api, &e, tls_on)))?;
    // A TLS server does not answer a plaintext client's HTTP/2 preface, and the HTTP/2 client does not
    // wait for an answer before `connect` returns: only a first call shows whether the two speak the
    // same protocol. A call without the token is that probe: it reaches no handler (the token check
    // refuses it first), changes nothing, and its failure is still a connection's failure, which gets
    // the same message as one at connect.
    let probe = ControllerServiceClient::new(channel.clone())
        .volume_info(VolumeInfoRequest {})
        .await;
    if let Err(status) = probe {
        if let Some(cause) = std::error::Error::source(&status) {
            anyhow::bail!(connect_error(api, cause, tls_on));
        }
    }
    Ok(ControllerServiceClient::with_interceptor(
        channel,
        WithToken(token),
    ))
}

/// The URL to connect to: an explicit scheme is kept, a bare `host:port` gets the one that matches
/// whether TLS is on.
fn api_url(api: &str, tls: bool) -> String {
    if api.starts_with("http://") || api.starts_with("https://") {
        api.to_string()
    } else if tls {
        format!("https://{api}")
    } else {
        format!("http://{api}")
    }
}

/// What to tell a person whose connection to `api` failed with `error`: what is wrong and what to do.
fn connect_error(api: &str, error: &(dyn std::error::Error + 'static), tls: bool) -> String {
    let detail = api_tls::error_chain_text(error);
    match api_tls::classify(error, tls) {
        ConnectFailure::Refused => format!(
            "cannot reach the controller's API at {api}: nothing listens there (is the volume running? \
             check --api)"
        ),
        ConnectFailure::MaybeTlsServer => format!(
            "the controller at {api} closed the connection without speaking gRPC: its API probably serves \
             TLS (--api-tls-cert); pass the CA that signed its certificate with --api-ca FILE or \
             BASALT_API_CA ({detail})"
        ),
        ConnectFailure::ServerNotTls => format!(
            "the controller at {api} does not speak TLS on its API: it was started without \
             --api-tls-cert; drop --api-ca / unset BASALT_API_CA, or start it with TLS ({detail})"
        ),
        ConnectFailure::UnknownIssuer => format!(
            "the controller at {api} presented a certificate that the CA in --api-ca / BASALT_API_CA did \
             not sign: give the CA that signed its --api-tls-cert"
        ),
        ConnectFailure::WrongName => format!(
            "the controller at {api} presented a certificate for another name: connect with the name in \
             its certificate (--api HOST:PORT) or say which name to expect with --api-tls-name ({detail})"
        ),
        ConnectFailure::Expired => format!(
            "the controller at {api} presented a certificate that is expired or not yet valid: renew its \
             --api-tls-cert (or check this machine's clock) ({detail})"
        ),
        ConnectFailure::Tls(why) => format!("TLS with the controller at {api} failed: {why}"),
        ConnectFailure::Other => format!(
            "cannot reach the controller's API at {api}: {detail} (is the volume running? check --api)"
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_gets_the_scheme_of_the_transport() {
        assert_eq!(api_url("127.0.0.1:9600", false), "http://127.0.0.1:9600");
        assert_eq!(api_url("ctl:9600", true), "https://ctl:9600");
        assert_eq!(api_url("https://ctl:9600", true), "https://ctl:9600");
        assert_eq!(api_url("http://ctl:9600", false), "http://ctl:9600");
    }

    #[test]
    fn an_unreadable_or_unusable_ca_file_is_named() {
        let missing = ApiTlsArgs {
            api_ca: Some("/nonexistent/ca.pem".into()),
            api_tls_name: None,
        };
        let err = format!("{:#}", missing.load().unwrap_err());
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("--api-ca"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let junk = ApiTlsArgs {
            api_ca: Some(path),
            api_tls_name: None,
        };
        let err = format!("{:#}", junk.load().unwrap_err());
        assert!(
            err.contains("ca.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        assert!(ApiTlsArgs::default().load().unwrap().is_none());
    }
}
