//! Mode pages (SPC-4 §7.5, SBC-3 §6.4): what MODE SENSE reports and which
//! bits MODE SELECT may change.
//!
//! Three pages exist: Caching (0x08), Control (0x0A) and Informational
//! Exceptions Control (0x1C). Each page is rendered from [`ModeState`] for
//! the current and default values, and from a fixed mask for the changeable
//! values. MODE SELECT accepts a page only if every bit outside the mask
//! equals the current value. Two bits are changeable: WCE (write cache
//! enable), with which cleared every write is made durable before it
//! completes (FUA), which is what an initiator turning the cache off expects;
//! and SWP (software write protect), which makes the unit refuse writes. Saved
//! values are not supported (no page survives a restart).

use crate::scsi::sense::{Asc, Failure, SenseKey};

/// The mode parameters a logical unit lets initiators change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page WCE: writes may complete before they are durable.
    pub write_cache_enabled: bool,
    /// Control page SWP: the initiator asked for the medium to be write
    /// protected (writes fail with DATA PROTECT until it clears the bit).
    pub software_write_protect: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            write_cache_enabled: true,
            software_write_protect: false,
        }
    }
}

/// Page control (MODE SENSE byte 2 bits 7..6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
}

pub const CACHING_PAGE: u8 = 0x08;
pub const CONTROL_PAGE: u8 = 0x0A;
pub const INFORMATIONAL_EXCEPTIONS_PAGE: u8 = 0x1C;
pub const ALL_PAGES: u8 = 0x3F;

/// Page codes in the order "all pages" returns them.
pub const PAGES: [u8; 3] = [CACHING_PAGE, CONTROL_PAGE, INFORMATIONAL_EXCEPTIONS_PAGE];

const WCE: u8 = 0x04;
/// Control page byte 4.
const SWP: u8 = 0x08;

/// One page's bytes for the given page control.
pub fn page(code: u8, pc: PageControl, state: ModeState) -> Option<Vec<u8>> {
    let state = match pc {
        PageControl::Default => ModeState::default(),
        _ => state,
    };
    let mut p = match code {
        CACHING_PAGE => {
            let mut p = vec![0u8; 20];
            if state.write_cache_enabled {
                p[2] |= WCE;
            }
            p
        }
        CONTROL_PAGE => {
            let mut p = vec![0u8; 12];
            // QUEUE ALGORITHM MODIFIER 1: commands may be reordered, which
            // is true (many run concurrently).
            p[3] = 0x10;
            if state.software_write_protect {
                p[4] |= SWP;
            }
            // BUSY TIMEOUT PERIOD: unlimited.
            p[8] = 0xFF;
            p[9] = 0xFF;
            p
        }
        INFORMATIONAL_EXCEPTIONS_PAGE => {
            let mut p = vec![0u8; 12];
            // DEXCPT: informational exception reporting is disabled (there
            // is no failure prediction to report).
            p[2] = 0x08;
            p
        }
        _ => return None,
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    if pc == PageControl::Changeable {
        for b in &mut p[2..] {
            *b = 0;
        }
        match code {
            CACHING_PAGE => p[2] = WCE,
            CONTROL_PAGE => p[4] = SWP,
            _ => {}
        }
    }
    Some(p)
}

/// Apply a MODE SELECT parameter list's pages (after the header and block
/// descriptors) to `state`. `offset` is where the pages start in the
/// parameter list, for the sense field pointer.
pub fn select(pages: &[u8], offset: usize, state: ModeState) -> Result<ModeState, Failure> {
    let mut next = state;
    let mut at = 0usize;
    while at < pages.len() {
        if pages.len() - at < 2 {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let code = pages[at] & 0x3F;
        if pages[at] & 0x40 != 0 {
            // SPF: no subpages exist here.
            return Err(Failure::invalid_param_field((offset + at) as u16, Some(6)));
        }
        let len = usize::from(pages[at + 1]) + 2;
        if at + len > pages.len() {
            return Err(Failure::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let given = &pages[at..at + len];
        let Some(current) = page(code, PageControl::Current, next) else {
            return Err(Failure::invalid_param_field((offset + at) as u16, Some(5)));
        };
        if current.len() != len {
            return Err(Failure::invalid_param_field((offset + at + 1) as u16, None));
        }
        let changeable = page(code, PageControl::Changeable, next).expect("page exists");
        for i in 2..len {
            if (given[i] ^ current[i]) & !changeable[i] != 0 {
                return Err(Failure::invalid_param_field((offset + at + i) as u16, None));
            }
        }
        match code {
            CACHING_PAGE => next.write_cache_enabled = given[2] & WCE != 0,
            CONTROL_PAGE => next.software_write_protect = given[4] & SWP != 0,
            _ => {}
        }
        at += len;
    }
    Ok(next)
}

/// Reject page control 3 (saved values), which this LU does not keep.
pub fn page_control(byte2: u8) -> Result<PageControl, Failure> {
    match byte2 >> 6 {
        0 => Ok(PageControl::Current),
        1 => Ok(PageControl::Changeable),
        2 => Ok(PageControl::Default),
        _ => Err(Failure::check(
            SenseKey::IllegalRequest,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wce_and_swp_are_changeable() {
        let ch = page(CACHING_PAGE, PageControl::Changeable, ModeState::default()).unwrap();
        assert_eq!(ch[2], WCE);
        assert!(ch[3..].iter().all(|b| *b == 0));
        let ctl = page(CONTROL_PAGE, PageControl::Changeable, ModeState::default()).unwrap();
        assert_eq!(ctl[4], SWP);
        assert!(ctl[2..].iter().enumerate().all(|(i, b)| i == 2 || *b == 0));
    }

    #[test]
    fn select_can_turn_the_write_cache_off() {
        let mut p = page(CACHING_PAGE, PageControl::Current, ModeState::default()).unwrap();
        p[2] &= !WCE;
        let s = select(&p, 4, ModeState::default()).unwrap();
        assert!(!s.write_cache_enabled);
    }

    #[test]
    fn select_refuses_to_change_a_fixed_bit() {
        let mut p = page(CONTROL_PAGE, PageControl::Current, ModeState::default()).unwrap();
        p[2] |= 0x04; // D_SENSE
        let err = select(&p, 4, ModeState::default()).unwrap_err();
        let Failure::Check(s) = err else { panic!() };
        assert_eq!(s.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
        assert_eq!(s.field.unwrap().byte, 6);
    }
}
