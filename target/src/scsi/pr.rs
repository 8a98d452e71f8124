//! Persistent reservations (SPC-4 §5.12) as a synchronous state machine.
//!
//! The logical unit owns one [`PersistentReservations`] behind its state
//! lock. PERSISTENT RESERVE OUT service actions are methods that either
//! change the state and return the unit attentions to queue for other
//! nexuses, or return a [`PrError`] and change nothing. Whether a command
//! conflicts with the current reservation is [`PersistentReservations::allows`],
//! driven by the command table's [`PrAccess`] column.
//!
//! Registrations are keyed by I_T nexus (initiator name + ISID + target portal
//! group), so they survive a session's logout and come back when the same
//! initiator port logs in again, as SPC-4 requires.
//!
//! APTPL (persist through power loss) is not offered: REPORT CAPABILITIES
//! clears PTPL_C and a PERSISTENT RESERVE OUT with APTPL=1 fails with INVALID
//! FIELD IN PARAMETER LIST, so no initiator believes a registration outlives a
//! restart of the target when it does not.
//!
//! ```text
//!   type        non-registrant   registrant (not holder)   holder
//!   WE          reads only       reads only                all
//!   EA          nothing          nothing                   all
//!   WE-RO/AR    reads only       all                       all
//!   EA-RO/AR    nothing          all                       all
//! ```

use crate::lu::ItNexus;
use crate::scsi::sense::Asc;
use crate::scsi::table::PrAccess;

/// A reservation type (the TYPE field of PERSISTENT RESERVE OUT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 1,
            PrType::ExclusiveAccess => 3,
            PrType::WriteExclusiveRegistrantsOnly => 5,
            PrType::ExclusiveAccessRegistrantsOnly => 6,
            PrType::WriteExclusiveAllRegistrants => 7,
            PrType::ExclusiveAccessAllRegistrants => 8,
        }
    }

    /// Every registrant holds an all-registrants reservation.
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants (not only the holder) may access the medium.
    fn registrants_allowed(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Reads by others are blocked.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// A reservation key (8 bytes chosen by the initiator; 0 means none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReservationKey(pub u64);

/// One registered I_T nexus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub nexus: ItNexus,
    pub key: ReservationKey,
}

/// The persistent reservation in effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The nexus that reserved; for all-registrants types every registrant
    /// is a holder and this is only who created it.
    pub holder: ItNexus,
    pub ty: PrType,
}

/// Why a PERSISTENT RESERVE OUT was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrError {
    #[error("reservation conflict: the key does not match this nexus's registration or the LU is reserved")]
    Conflict,
    #[error("invalid field in parameter list at byte {0}")]
    InvalidParam(u16),
    #[error("invalid field in CDB at byte {0}")]
    InvalidCdb(u16),
    #[error("release with a type or scope different from the reservation's")]
    InvalidRelease,
}

/// Unit attentions a PR OUT action asks the LU to queue.
pub type Attentions = Vec<(ItNexus, Asc)>;

/// All registrations and the reservation of one logical unit.
#[derive(Debug, Default)]
pub struct PersistentReservations {
    /// PRGENERATION: bumped by every REGISTER, CLEAR, PREEMPT (SPC-4 §6.16.2).
    pub generation: u32,
    /// In registration order, which READ KEYS reports.
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
}

impl PersistentReservations {
    pub fn key_of(&self, nexus: &ItNexus) -> Option<ReservationKey> {
        self.registrations
            .iter()
            .find(|r| &r.nexus == nexus)
            .map(|r| r.key)
    }

    /// Whether `nexus` holds the reservation.
    pub fn is_holder(&self, nexus: &ItNexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.ty.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => &r.holder == nexus,
        }
    }

    /// Whether a command of class `access` from `nexus` may run.
    pub fn allows(&self, nexus: &ItNexus, access: PrAccess) -> bool {
        let Some(r) = &self.reservation else { return true };
        if access == PrAccess::Allowed || self.is_holder(nexus) {
            return true;
        }
        if r.ty.registrants_allowed() && self.key_of(nexus).is_some() {
            return true;
        }
        access == PrAccess::Read && !r.ty.exclusive_access()
    }

    fn check_key(&self, nexus: &ItNexus, key: ReservationKey) -> Result<(), PrError> {
        match self.key_of(nexus) {
            Some(k) if k == key => Ok(()),
            _ => Err(PrError::Conflict),
        }
    }

    /// REGISTER (`ignore_existing` false) and REGISTER AND IGNORE EXISTING KEY.
    pub fn register(
        &mut self,
        nexus: &ItNexus,
        key: ReservationKey,
        new_key: ReservationKey,
        ignore_existing: bool,
    ) -> Result<Attentions, PrError> {
        let current = self.key_of(nexus);
        if !ignore_existing {
            match current {
                None if key.0 != 0 => return Err(PrError::Conflict),
                Some(k) if k != key => return Err(PrError::Conflict),
                _ => {}
            }
        }
        let mut attentions = Vec::new();
        match (current, new_key.0) {
            // Unregistering an unregistered nexus does nothing (and does
            // not bump the generation).
            (None, 0) => return Ok(attentions),
            (None, _) => self.registrations.push(Registration {
                nexus: nexus.clone(),
                key: new_key,
            }),
            (Some(_), 0) => attentions = self.unregister(nexus),
            (Some(_), _) => {
                for r in self.registrations.iter_mut().filter(|r| &r.nexus == nexus) {
                    r.key = new_key;
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(attentions)
    }

    /// Remove `nexus`'s registration, releasing its reservation if it held
    /// it (SPC-4 §5.12.11.2.3).
    fn unregister(&mut self, nexus: &ItNexus) -> Attentions {
        let was_holder = self.is_holder(nexus);
        self.registrations.retain(|r| &r.nexus != nexus);
        let mut attentions = Vec::new();
        if let Some(r) = self.reservation.clone() {
            let release = if r.ty.all_registrants() {
                self.registrations.is_empty()
            } else {
                was_holder
            };
            if release {
                self.reservation = None;
                if matches!(
                    r.ty,
                    PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
                ) {
                    attentions = self.to_registrants_except(nexus, Asc::RESERVATIONS_RELEASED);
                }
            } else if r.ty.all_registrants() && &r.holder == nexus {
                // Someone else is still a holder: keep the reservation, but
                // record a registered nexus as its creator.
                self.reservation = Some(Reservation {
                    holder: self.registrations[0].nexus.clone(),
                    ty: r.ty,
                });
            }
        }
        attentions
    }

    fn to_registrants_except(&self, nexus: &ItNexus, asc: Asc) -> Attentions {
        self.registrations
            .iter()
            .filter(|r| &r.nexus != nexus)
            .map(|r| (r.nexus.clone(), asc))
            .collect()
    }

    /// RESERVE.
    pub fn reserve(&mut self, nexus: &ItNexus, key: ReservationKey, ty: PrType) -> Result<(), PrError> {
        self.check_key(nexus, key)?;
        match &self.reservation {
            Some(r) if self.is_holder(nexus) && r.ty == ty => Ok(()),
            Some(_) => Err(PrError::Conflict),
            None => {
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    ty,
                });
                Ok(())
            }
        }
    }

    /// RELEASE.
    pub fn release(
        &mut self,
        nexus: &ItNexus,
        key: ReservationKey,
        ty: PrType,
    ) -> Result<Attentions, PrError> {
        self.check_key(nexus, key)?;
        let Some(r) = self.reservation.clone() else {
            return Ok(Vec::new());
        };
        if !self.is_holder(nexus) {
            return Ok(Vec::new());
        }
        if r.ty != ty {
            return Err(PrError::InvalidRelease);
        }
        self.reservation = None;
        Ok(
            if matches!(r.ty, PrType::WriteExclusive | PrType::ExclusiveAccess) {
                Vec::new()
            } else {
                self.to_registrants_except(nexus, Asc::RESERVATIONS_RELEASED)
            },
        )
    }

    /// CLEAR: drop every registration and the reservation.
    pub fn clear(&mut self, nexus: &ItNexus, key: ReservationKey) -> Result<Attentions, PrError> {
        self.check_key(nexus, key)?;
        let attentions = self.to_registrants_except(nexus, Asc::RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        self.generation = self.generation.wrapping_add(1);
        Ok(attentions)
    }

    /// PREEMPT and PREEMPT AND ABORT (the transport aborts the preempted
    /// nexuses' tasks; the state change is the same).
    pub fn preempt(
        &mut self,
        nexus: &ItNexus,
        key: ReservationKey,
        victim: ReservationKey,
        ty: PrType,
    ) -> Result<Attentions, PrError> {
        self.check_key(nexus, key)?;
        let attentions = match self.reservation.clone() {
            Some(r) if r.ty.all_registrants() && victim.0 == 0 => {
                // Preempting an all-registrants reservation with key 0
                // removes every other registrant and takes the LU over.
                let removed = self.remove_where(nexus, |_| true);
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    ty,
                });
                removed
            }
            Some(r) if !r.ty.all_registrants() && self.key_of(&r.holder) == Some(victim) => {
                let mut attentions = self.remove_where(nexus, |k| k == victim);
                if r.ty != ty {
                    // Registrants that survive learn the type changed.
                    for reg in self.registrations.iter().filter(|reg| &reg.nexus != nexus) {
                        attentions.push((reg.nexus.clone(), Asc::RESERVATIONS_RELEASED));
                    }
                }
                self.reservation = Some(Reservation {
                    holder: nexus.clone(),
                    ty,
                });
                attentions
            }
            _ => {
                if victim.0 == 0 {
                    return Err(PrError::InvalidParam(8));
                }
                if !self.registrations.iter().any(|r| r.key == victim) {
                    return Err(PrError::Conflict);
                }
                self.remove_where(nexus, |k| k == victim)
            }
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(attentions)
    }

    /// Remove the registrations (other than `keep`'s) whose key matches;
    /// each removed nexus gets REGISTRATIONS PREEMPTED.
    fn remove_where(&mut self, keep: &ItNexus, matches: impl Fn(ReservationKey) -> bool) -> Attentions {
        let mut removed = Vec::new();
        self.registrations.retain(|r| {
            let remove = &r.nexus != keep && matches(r.key);
            if remove {
                removed.push((r.nexus.clone(), Asc::REGISTRATIONS_PREEMPTED));
            }
            !remove
        });
        if let Some(r) = &self.reservation {
            if !r.ty.all_registrants() && removed.iter().any(|(n, _)| n == &r.holder) {
                self.reservation = None;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(name: &str) -> ItNexus {
        ItNexus {
            initiator_name: name.into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            tpgt: 1,
        }
    }

    const K1: ReservationKey = ReservationKey(0x1111);
    const K2: ReservationKey = ReservationKey(0x2222);
    const NONE: ReservationKey = ReservationKey(0);

    #[test]
    fn register_needs_the_current_key_unless_ignoring_it() {
        let mut pr = PersistentReservations::default();
        let a = nexus("a");
        assert_eq!(pr.register(&a, K2, K1, false), Err(PrError::Conflict));
        pr.register(&a, NONE, K1, false).unwrap();
        assert_eq!(pr.register(&a, K2, K2, false), Err(PrError::Conflict));
        pr.register(&a, K2, K2, true).unwrap();
        assert_eq!(pr.key_of(&a), Some(K2));
        assert_eq!(pr.generation, 2);
    }

    #[test]
    fn write_exclusive_lets_others_read_but_not_write() {
        let mut pr = PersistentReservations::default();
        let (a, b) = (nexus("a"), nexus("b"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&a, K1, PrType::WriteExclusive).unwrap();
        assert!(pr.allows(&b, PrAccess::Read));
        assert!(!pr.allows(&b, PrAccess::Write));
        assert!(pr.allows(&a, PrAccess::Write));
    }

    #[test]
    fn registrants_only_types_admit_registrants_and_block_others() {
        let mut pr = PersistentReservations::default();
        let (a, b, c) = (nexus("a"), nexus("b"), nexus("c"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&a, K1, PrType::ExclusiveAccessRegistrantsOnly)
            .unwrap();
        assert!(pr.allows(&b, PrAccess::Write));
        assert!(!pr.allows(&c, PrAccess::Read));
        assert!(pr.allows(&c, PrAccess::Allowed));
    }

    #[test]
    fn holder_unregistering_releases_a_registrants_only_reservation_with_attention() {
        let mut pr = PersistentReservations::default();
        let (a, b) = (nexus("a"), nexus("b"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&a, K1, PrType::WriteExclusiveRegistrantsOnly).unwrap();
        let ua = pr.register(&a, K1, NONE, false).unwrap();
        assert!(pr.reservation.is_none());
        assert_eq!(ua, vec![(b, Asc::RESERVATIONS_RELEASED)]);
    }

    #[test]
    fn all_registrants_reservation_lasts_until_the_last_registrant_leaves() {
        let mut pr = PersistentReservations::default();
        let (a, b) = (nexus("a"), nexus("b"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&a, K1, PrType::WriteExclusiveAllRegistrants).unwrap();
        assert!(pr.is_holder(&b));
        pr.register(&a, K1, NONE, false).unwrap();
        assert!(pr.reservation.is_some());
        pr.register(&b, K2, NONE, false).unwrap();
        assert!(pr.reservation.is_none());
    }

    #[test]
    fn release_with_the_wrong_type_is_an_invalid_release() {
        let mut pr = PersistentReservations::default();
        let a = nexus("a");
        pr.register(&a, NONE, K1, false).unwrap();
        pr.reserve(&a, K1, PrType::ExclusiveAccess).unwrap();
        assert_eq!(
            pr.release(&a, K1, PrType::WriteExclusive),
            Err(PrError::InvalidRelease)
        );
        assert_eq!(pr.release(&a, K1, PrType::ExclusiveAccess), Ok(vec![]));
    }

    #[test]
    fn preempt_takes_over_the_reservation_and_removes_the_victims() {
        let mut pr = PersistentReservations::default();
        let (a, b) = (nexus("a"), nexus("b"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&a, K1, PrType::ExclusiveAccess).unwrap();
        let ua = pr.preempt(&b, K2, K1, PrType::WriteExclusive).unwrap();
        assert_eq!(ua, vec![(a.clone(), Asc::REGISTRATIONS_PREEMPTED)]);
        assert_eq!(pr.key_of(&a), None);
        assert!(pr.is_holder(&b));
        assert_eq!(pr.reservation.as_ref().unwrap().ty, PrType::WriteExclusive);
    }

    #[test]
    fn preempting_an_unknown_key_conflicts() {
        let mut pr = PersistentReservations::default();
        let a = nexus("a");
        pr.register(&a, NONE, K1, false).unwrap();
        assert_eq!(
            pr.preempt(&a, K1, K2, PrType::WriteExclusive),
            Err(PrError::Conflict)
        );
        assert_eq!(
            pr.preempt(&a, K1, NONE, PrType::WriteExclusive),
            Err(PrError::InvalidParam(8))
        );
    }

    #[test]
    fn clear_removes_everything_and_tells_the_others() {
        let mut pr = PersistentReservations::default();
        let (a, b) = (nexus("a"), nexus("b"));
        pr.register(&a, NONE, K1, false).unwrap();
        pr.register(&b, NONE, K2, false).unwrap();
        pr.reserve(&b, K2, PrType::ExclusiveAccess).unwrap();
        assert_eq!(pr.clear(&a, K2), Err(PrError::Conflict));
        let ua = pr.clear(&a, K1).unwrap();
        assert_eq!(ua, vec![(b, Asc::RESERVATIONS_PREEMPTED)]);
        assert!(pr.registrations.is_empty() && pr.reservation.is_none());
    }
}
