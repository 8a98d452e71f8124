//! The iSCSI transport (RFC 7143): portal, login, sessions, PDUs.
//!
//! ```text
//!   portal.rs      listener, targets, session registry (how many are logged in)
//!   redirect.rs    a portal that only answers logins with "moved to ADDRESS"
//!   connection.rs  one TCP connection: reader task + writer task, R2T, Data-In
//!   session.rs     CmdSN window, running-task table, result → PDUs   (pure)
//!   login.rs       login state machine, CHAP                         (pure)
//!   text.rs        key=value text and parameter negotiation          (pure)
//!   pdu.rs         framing, typed PDUs, serial numbers               (pure)
//!   digest.rs      CRC32C and padding                                (pure)
//! ```
//!
//! The transport hands whole commands to a [`crate::lu::LogicalUnit`] and
//! knows nothing about CDBs. Basalt negotiates ErrorRecoveryLevel 0 and one
//! connection per session: every error is recovered by dropping the
//! connection, which keeps the state machines small.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use basalt_target::iscsi::*;
//! # async fn demo<L: basalt_target::lu::LogicalUnit>(lu: Arc<L>) -> std::io::Result<()> {
//! let target = Target::new(TargetConfig::new(target_iqn("vol0"), lu)).expect("valid name");
//! let portal = Portal::new(PortalConfig::default(), [target.clone()]);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:3260").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(portal.clone().serve(listener, shutdown.clone()));
//! // ... later: refuse a revert while initiators are logged in.
//! assert_eq!(target.session_count(), 0);
//! shutdown.cancel();
//! # Ok(()) }
//! ```

pub mod connection;
pub mod digest;
pub mod fuzz;
pub mod login;
pub mod pdu;
pub mod portal;
pub mod redirect;
pub mod session;
pub mod text;

pub use connection::ConnectionError;
pub use login::{AllowList, AuthPolicy, ChapCredentials, ChapSecret, ConfigError};
pub use portal::{target_iqn, DynLogicalUnit, Portal, PortalConfig, Target, TargetConfig, IQN_PREFIX};
pub use text::TargetOffer;
