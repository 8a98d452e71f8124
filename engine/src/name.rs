//! Volume names: checked once, here, for every way a name enters Basalt.
//!
//! A volume's name becomes part of its iSCSI target name
//! (`iqn.2026-11.io.basalt:NAME`), of its data directory (`volume up`'s
//! `DATA/NAME`), of command lines (`volume up` passes it to the controller it
//! starts) and, through the node agent, of container volume names. A
//! [`VolumeName`] can only be built from a name that is valid in all of them,
//! so code holding one never checks again.
//!
//! The rules, and why:
//! * **Characters `a-z`, `0-9`, `-` and `.`.** RFC 3720 §3.2.6.2 allows, after
//!   the stringprep of RFC 3722 (which folds upper case to lower case), only
//!   lower-case letters, digits, `-`, `.` and `:` in an iSCSI name (plus
//!   non-ASCII characters we do not take: they do not survive every
//!   filesystem, shell and log). `:` is left out too: it separates the fields
//!   of an IQN, and `docker run -v NAME:/path` would split a volume name at
//!   it. Upper case is refused rather than folded, so that two spellings
//!   never name one target.
//! * **Starts and ends with a letter or a digit.** No `.` or `..` (a data
//!   directory outside `DATA`), no leading `-` (read as a flag by the
//!   controller `volume up` starts), no trailing `.` or `-` (which DNS names
//!   refuse).
//! * **At most [`VolumeName::MAX_LEN`] (63) characters**: a DNS label's
//!   limit, so the name can also be a Kubernetes label value or host name;
//!   the target name stays far below the 223 bytes RFC 3720 allows.

use std::fmt;
use std::str::FromStr;

/// A volume name that is valid everywhere Basalt uses it (see the module docs).
/// Deserializing checks the rules too: a record read back from a store or a
/// request body cannot smuggle in a bad name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

/// Why a string is not a volume name. Every message ends with the rules
/// ([`VolumeName::RULES`]), so whoever typed it knows what to type instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a volume name cannot be empty; {}", VolumeName::RULES)]
    Empty,
    #[error("volume name {name:?} is {len} characters long, more than {max}; {rules}", max = VolumeName::MAX_LEN, rules = VolumeName::RULES)]
    TooLong { name: String, len: usize },
    #[error("volume name {name:?} has upper case; use {lower:?} instead ({rules})", rules = VolumeName::RULES)]
    UpperCase { name: String, lower: String },
    #[error("volume name {name:?} contains {found:?}, which is not allowed; {rules}", rules = VolumeName::RULES)]
    Character { name: String, found: char },
    #[error("volume name {name:?} must start and end with a letter or a digit; {rules}", rules = VolumeName::RULES)]
    Edge { name: String },
}

impl VolumeName {
    /// Longest name: a DNS label's limit (see the module docs).
    pub const MAX_LEN: usize = 63;

    /// The rules in words, for error messages and `--help`.
    pub const RULES: &'static str =
        "a volume name is 1 to 63 characters from a-z, 0-9, '-' and '.', starting and \
                                     ending with a letter or a digit";

    /// Check `name` against the rules of the module docs.
    pub fn new(name: &str) -> Result<VolumeName, NameError> {
        let owned = || name.to_string();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let len = name.chars().count();
        if len > Self::MAX_LEN {
            return Err(NameError::TooLong { name: owned(), len });
        }
        if name.chars().any(|c| c.is_ascii_uppercase())
            && name.chars().all(|c| Self::allowed(c.to_ascii_lowercase()))
        {
            return Err(NameError::UpperCase {
                name: owned(),
                lower: name.to_ascii_lowercase(),
            });
        }
        if let Some(found) = name.chars().find(|&c| !Self::allowed(c)) {
            return Err(NameError::Character { name: owned(), found });
        }
        let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !alphanumeric(name.chars().next()) || !alphanumeric(name.chars().last()) {
            return Err(NameError::Edge { name: owned() });
        }
        Ok(VolumeName(owned()))
    }

    fn allowed(c: char) -> bool {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The volume's iSCSI target name, `iqn.2026-11.io.basalt:NAME`.
    pub fn iqn(&self) -> String {
        basalt_target::iscsi::portal::target_iqn(&self.0)
    }
}

impl FromStr for VolumeName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<VolumeName, NameError> {
        VolumeName::new(s)
    }
}

impl TryFrom<String> for VolumeName {
    type Error = NameError;

    fn try_from(s: String) -> Result<VolumeName, NameError> {
        VolumeName::new(&s)
    }
}

impl From<VolumeName> for String {
    fn from(name: VolumeName) -> String {
        name.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<std::path::Path> for VolumeName {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_case_names_with_digits_dashes_and_dots_are_volume_names() {
        for name in [
            "demo",
            "vol1",
            "pvc-0b5c3a1e-4f2d-4c1b-9e7a-2d8f6a1c3b4e",
            "a",
            "db.prod-2",
            "9",
        ] {
            let v = VolumeName::new(name).unwrap();
            assert_eq!(v.as_str(), name);
            assert_eq!(v.iqn(), format!("iqn.2026-11.io.basalt:{name}"));
        }
        let longest = VolumeName::new(&"a".repeat(VolumeName::MAX_LEN)).unwrap();
        assert!(
            longest.iqn().len() <= 223,
            "RFC 3720 §3.2.6.1: an iSCSI name is at most 223 bytes"
        );
    }

    #[test]
    fn names_that_break_the_target_name_or_the_data_directory_are_refused() {
        for bad in [
            "bad name!",
            "a/b",
            "a:b",
            "a_b",
            "tab\there",
            "nul\0",
            "café",
            "..",
            ".",
            ".hidden",
            "-flag",
            "trailing-",
            "trailing.",
            "",
        ] {
            let err = VolumeName::new(bad).expect_err(bad);
            let message = err.to_string();
            assert!(
                message.contains("a-z, 0-9, '-' and '.'") && message.contains("63 characters"),
                "{bad:?}: the message says what is allowed: {message}"
            );
        }
    }

    #[test]
    fn each_refusal_says_what_was_wrong() {
        assert_eq!(VolumeName::new(""), Err(NameError::Empty));
        assert!(matches!(
            VolumeName::new("bad name!"),
            Err(NameError::Character { found: ' ', .. })
        ));
        assert!(matches!(
            VolumeName::new(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
        assert!(matches!(VolumeName::new(".."), Err(NameError::Edge { .. })));
        let upper = VolumeName::new("Demo-1").unwrap_err();
        assert_eq!(
            upper,
            NameError::UpperCase {
                name: "Demo-1".into(),
                lower: "demo-1".into()
            }
        );
        assert!(upper.to_string().contains("use \"demo-1\" instead"), "{upper}");
    }
}
