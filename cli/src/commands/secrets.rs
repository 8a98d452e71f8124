//! Where the volume's secret and the management API's token come from.
//!
//! Both come from a file (`--secret-file`, `--api-token-file` / `--token-file`) or, when no file is
//! named, from the environment (`BASALT_VOLUME_SECRET`, `BASALT_API_TOKEN`): never from the command line,
//! where `ps` and shell history would show them, and never into a log line or an error message. A role
//! that needs one and finds neither refuses to start, with a message that says how to give it: a replica
//! that accepted anyone, or a controller whose API obeyed anyone, would be the hole this closes.
//! `basalt volume up` generates both once per volume and hands them to its children through the
//! environment.

use std::path::{Path, PathBuf};

use anyhow::Context;
use basalt_engine::api_auth::ApiToken;
use basalt_proto::auth::VolumeSecret;

/// Environment variable holding the volume's secret.
pub const SECRET_ENV: &str = "BASALT_VOLUME_SECRET";
/// Environment variable holding the management API's token.
pub const TOKEN_ENV: &str = "BASALT_API_TOKEN";
/// Environment variable holding a clone's SOURCE volume's secret (see [`CloneSourceSecretArgs`]).
pub const CLONE_SOURCE_SECRET_ENV: &str = "BASALT_CLONE_SOURCE_SECRET";

/// How to make a secret or a token, for the messages that ask for one.
const HOW_TO_GENERATE: &str =
    "e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE; chmod 600 FILE`";

/// The volume's secret, for every role that talks on the data path.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SecretArgs {
    /// File holding the volume's secret (at least 16 bytes), the same for the controller and every
    /// replica of the volume. Without it, the BASALT_VOLUME_SECRET environment variable is used; with
    /// neither, the command refuses to start. `basalt volume up` generates one per volume.
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The secret, from the file or the environment.
    pub fn load(&self) -> anyhow::Result<VolumeSecret> {
        self.load_from(|name| std::env::var_os(name))
    }

    fn load_from(&self, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> anyhow::Result<VolumeSecret> {
        load_secret(self.secret_file.as_deref(), "--secret-file", SECRET_ENV, "volume secret", env)?.ok_or_else(
            || {
                anyhow::anyhow!(
                    "no volume secret: pass --secret-file PATH or set {SECRET_ENV}; the controller and every \
                     replica of a volume need the same secret ({HOW_TO_GENERATE}; `basalt volume up` makes one \
                     for you)"
                )
            },
        )
    }
}

/// The secret of the volume a clone replica copies (`basalt replica --clone-from`): the SOURCE
/// volume's, which its replicas check, and not the clone's own (`--secret-file`), which the clone's
/// controller and replicas share. Only a clone that is still reading its source needs it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct CloneSourceSecretArgs {
    /// File holding the SOURCE volume's secret, for a clone (--clone-from) to authenticate to the
    /// source replicas; needed until the clone is hydrated, also after a restart. Without it, the
    /// BASALT_CLONE_SOURCE_SECRET environment variable.
    #[arg(long, value_name = "PATH")]
    pub clone_source_secret_file: Option<PathBuf>,
}

impl CloneSourceSecretArgs {
    /// The source volume's secret, from the file or the environment; `None` if neither gives one.
    pub fn load(&self) -> anyhow::Result<Option<VolumeSecret>> {
        self.load_from(|name| std::env::var_os(name))
    }

    fn load_from(
        &self,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> anyhow::Result<Option<VolumeSecret>> {
        load_secret(
            self.clone_source_secret_file.as_deref(),
            "--clone-source-secret-file",
            CLONE_SOURCE_SECRET_ENV,
            "source volume secret",
            env,
        )
    }

    /// What to say when a clone needs the source's secret and has none.
    pub fn missing() -> anyhow::Error {
        anyhow::anyhow!(
            "no secret for the clone's source volume: pass --clone-source-secret-file PATH or set \
             {CLONE_SOURCE_SECRET_ENV} to the SOURCE volume's secret (the one its replicas were started with; \
             --secret-file is the clone's own)"
        )
    }
}

/// A secret from `file` (named `flag` in messages) or else the environment variable `env_name`;
/// `None` if neither gives one. The message of an unusable one names where it came from, never its
/// content.
fn load_secret(
    file: Option<&Path>,
    flag: &str,
    env_name: &str,
    what: &str,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> anyhow::Result<Option<VolumeSecret>> {
    let (bytes, origin) = match file {
        Some(path) => (read_private(path, what)?, format!("{flag} {}", path.display())),
        None => match env(env_name).filter(|v| !v.is_empty()) {
            Some(value) => (value.into_encoded_bytes(), env_name.to_string()),
            None => return Ok(None),
        },
    };
    VolumeSecret::new(bytes)
        .map(Some)
        .with_context(|| format!("the {what} from {origin} is not usable"))
}

/// Reads a file holding a secret or a token, warning (once, without its content) when others than its
/// owner may read it.
pub fn read_private(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the {what} file may be read by others than its owner; `chmod 600` it"
            );
        }
    }
    Ok(bytes)
}

/// The management API's token, for the controller that checks it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ApiTokenArgs {
    /// File holding the token every management API call must carry (`Authorization: Bearer ...`).
    /// Without it, the BASALT_API_TOKEN environment variable; with neither, the controller refuses to
    /// start. `basalt volume up` generates one per volume.
    #[arg(long, value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
}

impl ApiTokenArgs {
    pub fn load(&self) -> anyhow::Result<ApiToken> {
        load_token(self.api_token_file.as_deref(), "--api-token-file", |name| {
            std::env::var_os(name)
        })
    }
}

/// What a CLI command needs to call a controller's management API: the token it sends, and the CA
/// to check the controller with when its API serves TLS.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ApiClientArgs {
    /// File holding the controller's API token (`volume up` prints where its token is). Without it, the
    /// BASALT_API_TOKEN environment variable.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: super::client::ApiTlsArgs,
}

impl ApiClientArgs {
    pub fn load_token(&self) -> anyhow::Result<ApiToken> {
        load_token(self.token_file.as_deref(), "--token-file", |name| {
            std::env::var_os(name)
        })
    }
}

fn load_token(
    file: Option<&Path>,
    flag: &str,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> anyhow::Result<ApiToken> {
    let (bytes, origin) = match file {
        Some(path) => (
            read_private(path, "API token")?,
            format!("{flag} {}", path.display()),
        ),
        None => match env(TOKEN_ENV).filter(|v| !v.is_empty()) {
            Some(value) => (value.into_encoded_bytes(), TOKEN_ENV.to_string()),
            None => anyhow::bail!(
                "no management API token: pass {flag} PATH or set {TOKEN_ENV} ({HOW_TO_GENERATE}; \
                 `basalt volume up` makes one and prints where it is)"
            ),
        },
    };
    ApiToken::new(bytes).with_context(|| format!("the API token from {origin} is not usable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_secret_says_how_to_give_one() {
        let err = SecretArgs::default().load_from(|_| None).unwrap_err().to_string();
        assert!(err.contains("--secret-file") && err.contains(SECRET_ENV), "{err}");
    }

    #[test]
    fn the_secret_comes_from_the_file_first_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-the-file-0123456789\n").unwrap();
        let from_env = |_: &str| Some("from-the-environment-0123".into());
        let args = SecretArgs {
            secret_file: Some(path),
        };
        assert_eq!(
            args.load_from(from_env).unwrap().expose(),
            b"from-the-file-0123456789"
        );
        let env_only = SecretArgs::default().load_from(from_env).unwrap();
        assert_eq!(env_only.expose(), b"from-the-environment-0123");
    }

    #[test]
    fn a_short_secret_is_refused_without_showing_it() {
        let err = SecretArgs::default()
            .load_from(|_| Some("hunter2".into()))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("at least 16") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn the_clone_source_secret_is_its_own_variable_and_optional() {
        let none = CloneSourceSecretArgs::default().load_from(|_| None).unwrap();
        assert!(none.is_none());
        // The clone's own secret in the environment is not taken for the source's.
        let env = |name: &str| {
            (name == CLONE_SOURCE_SECRET_ENV)
                .then(|| "the-source-volume-secret".into())
                .or_else(|| (name == SECRET_ENV).then(|| "the-clone-volume-secret0".into()))
        };
        let secret = CloneSourceSecretArgs::default().load_from(env).unwrap().unwrap();
        assert_eq!(secret.expose(), b"the-source-volume-secret");
        let err = CloneSourceSecretArgs::default()
            .load_from(|_| Some("hunter2".into()))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(CLONE_SOURCE_SECRET_ENV) && !text.contains("hunter2"),
            "{text}"
        );
        let missing = CloneSourceSecretArgs::missing().to_string();
        assert!(missing.contains("--clone-source-secret-file") && missing.contains(CLONE_SOURCE_SECRET_ENV));
    }

    #[test]
    fn a_missing_token_file_is_named() {
        let err = load_token(Some(Path::new("/nonexistent/token")), "--token-file", |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/token"));
        let err = load_token(None, "--token-file", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--token-file") && err.contains(TOKEN_ENV), "{err}");
    }
}
