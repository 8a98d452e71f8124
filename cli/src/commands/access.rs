//! Who may log in to a target: CHAP and an initiator allow-list, shared by
//! every role that serves iSCSI (`controller`, `serve-file`).
//!
//! Secrets come only from the environment, never from the command line
//! (where `ps` and shell history would show them), and are never logged.

use basalt_target::iscsi::{AllowList, AuthPolicy, ChapCredentials, ChapSecret};

/// Environment variable holding the CHAP secret initiators must know.
pub const CHAP_SECRET_ENV: &str = "BASALT_CHAP_SECRET";
/// Environment variable holding the target's own secret (mutual CHAP).
pub const CHAP_TARGET_SECRET_ENV: &str = "BASALT_CHAP_TARGET_SECRET";

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Access {
    /// Require CHAP with this user name; the secret is read from the
    /// BASALT_CHAP_SECRET environment variable (never from the command line).
    #[arg(long)]
    pub chap_user: Option<String>,
    /// Offer mutual CHAP under this target user name; the target's secret is
    /// read from BASALT_CHAP_TARGET_SECRET.
    #[arg(long, requires = "chap_user")]
    pub chap_target_user: Option<String>,
    /// Only these initiator names may log in (repeatable). Default: any.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Nobody may log in until the management API names who may
    /// (`TargetSetAllowList`): a volume used only by the node it is
    /// attached to starts closed.
    #[arg(long, conflicts_with = "allow")]
    pub allow_none: bool,
}

impl Access {
    /// The login policy these flags (and the environment) describe.
    pub fn auth(&self) -> anyhow::Result<AuthPolicy> {
        let Some(user) = &self.chap_user else {
            return Ok(AuthPolicy::None);
        };
        let initiator = ChapCredentials::new(user, ChapSecret::from_env(CHAP_SECRET_ENV)?)?;
        let target = match &self.chap_target_user {
            Some(t) => Some(ChapCredentials::new(
                t,
                ChapSecret::from_env(CHAP_TARGET_SECRET_ENV)?,
            )?),
            None => None,
        };
        Ok(AuthPolicy::chap(initiator, target)?)
    }

    pub fn allow_list(&self) -> AllowList {
        if self.allow_none {
            AllowList::Only(Vec::new())
        } else if self.allow.is_empty() {
            AllowList::Any
        } else {
            AllowList::Only(self.allow.clone())
        }
    }
}
