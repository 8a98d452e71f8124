//! How CSI's names and ids map onto Basalt's (pure functions).
//!
//! * A volume's `volume_id` is its Basalt name. The CO's `name` (any Unicode string) becomes that name
//!   as it is when it already is a valid volume name (Kubernetes' `pvc-<uuid>` is), else
//!   `csi-` and 32 hex digits of its SHA-256: the same CSI name always maps to the same volume, which
//!   is what makes CreateVolume idempotent by name without a lookup table.
//! * A snapshot's `snapshot_id` is `VOLUME/SNAPSHOT`, the form the REST API takes for clones; its
//!   snapshot name follows the same rule as a volume's (the replicas' snapshot-name rules).

use basalt_engine::name::VolumeName;
use sha2::{Digest, Sha256};

use crate::api::snapshots::check_snapshot_name;
use crate::model::SnapshotRef;

/// Most bytes of a CSI name: the spec lets a plugin refuse longer ones (128 is what COs send at most).
pub const MAX_CSI_NAME: usize = 128;

/// Characters the spec bans in names (control characters other than common whitespace).
fn banned(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F)
}

/// Why a CSI name is refused, for INVALID_ARGUMENT.
pub fn check_csi_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field} is required"));
    }
    if name.len() > MAX_CSI_NAME {
        return Err(format!(
            "{field} is {} bytes; this plugin takes at most {MAX_CSI_NAME}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| banned(*c)) {
        return Err(format!(
            "{field} holds the control character U+{:04X}, which the CSI spec bans in names",
            c as u32
        ));
    }
    Ok(())
}

/// The hashed form of `name`: `csi-` and 32 hex digits (128 bits: no two names a CO makes collide).
fn hashed(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("csi-{}", basalt_proto::auth::hex(&digest[..16]))
}

/// The Basalt volume a CSI volume name maps to.
pub fn volume_name(csi_name: &str) -> VolumeName {
    VolumeName::new(csi_name).unwrap_or_else(|_| {
        VolumeName::new(&hashed(csi_name)).expect("csi- and hex digits make a valid volume name")
    })
}

/// The snapshot name a CSI snapshot name maps to (on its source volume).
pub fn snapshot_name(csi_name: &str) -> String {
    if check_snapshot_name(csi_name).is_ok() {
        csi_name.to_string()
    } else {
        hashed(csi_name)
    }
}

/// `VOLUME/SNAPSHOT`.
pub fn snapshot_id(snapshot: &SnapshotRef) -> String {
    format!("{}/{}", snapshot.volume, snapshot.snapshot)
}

/// A snapshot id this plugin could have made, or `None` (the CO's id names nothing of ours).
pub fn parse_snapshot_id(id: &str) -> Option<SnapshotRef> {
    let (volume, snapshot) = id.split_once('/')?;
    let volume = VolumeName::new(volume).ok()?;
    check_snapshot_name(snapshot).ok()?;
    Some(SnapshotRef {
        volume,
        snapshot: snapshot.to_string(),
    })
}

/// A volume id this plugin could have made, or `None`.
pub fn parse_volume_id(id: &str) -> Option<VolumeName> {
    VolumeName::new(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kubernetes_names_are_kept_and_others_hashed() {
        let pvc = "pvc-0b8f2f2c-4a6e-4b43-9d0a-5f8b1b7c9e11";
        assert_eq!(volume_name(pvc).as_str(), pvc);
        let odd = volume_name("My Volume/1");
        assert!(odd.as_str().starts_with("csi-") && odd.as_str().len() == 36);
        assert_eq!(
            odd,
            volume_name("My Volume/1"),
            "the same name maps to the same volume"
        );
        assert_ne!(odd, volume_name("My Volume/2"));
        assert_eq!(snapshot_name("snapshot-1"), "snapshot-1");
        assert!(snapshot_name("snap shot").starts_with("csi-"));
    }

    #[test]
    fn names_the_spec_bans_are_refused() {
        assert!(check_csi_name("name", "").unwrap_err().contains("required"));
        assert!(check_csi_name("name", "a\u{7}b").unwrap_err().contains("U+0007"));
        assert!(check_csi_name("name", &"a".repeat(129)).is_err());
        assert!(check_csi_name("name", "tab\tand space ok").is_ok());
    }

    proptest! {
        #[test]
        fn every_csi_name_maps_to_a_valid_volume_and_snapshot(name in "\\PC{1,64}") {
            prop_assert!(VolumeName::new(volume_name(&name).as_str()).is_ok());
            prop_assert!(check_snapshot_name(&snapshot_name(&name)).is_ok());
        }

        #[test]
        fn snapshot_ids_round_trip(volume in "[a-z][a-z0-9]{0,20}", snap in "[A-Za-z0-9][A-Za-z0-9_.-]{0,30}") {
            let r = SnapshotRef { volume: VolumeName::new(&volume).unwrap(), snapshot: snap };
            prop_assert_eq!(parse_snapshot_id(&snapshot_id(&r)), Some(r));
        }
    }
}
