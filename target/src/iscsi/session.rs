//! Session state shared between a connection's reader, its writer, the
//! spawned command tasks and task management from other sessions.
//!
//! ```text
//!   reader ──admit──► CmdSnWindow ──in order──► spawn(LU.execute) ──► TaskTable
//!     │                                              │ completes: remove own entry,
//!     │ ABORT TASK: remove entry + abort ────────────┘ then queue its PDUs (if still there)
//!     ▼
//!   SeqState (ExpCmdSN, in-flight count) ──► writer stamps ExpCmdSN / MaxCmdSN
//! ```
//!
//! Whoever removes a task's entry from the [`TaskTable`] owns its outcome: the
//! task itself (it answers) or task management (it aborts, and the task never
//! answers). That single rule makes "abort vs. completion" races harmless.
//!
//! Also here, pure: turning a [`ScsiResult`] into Data-In / SCSI Response PDUs
//! ([`completion_pdus`]), with status in the last Data-In and residuals.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::iscsi::pdu::{self, CmdSn, DataSn, Itt, Residual, TargetPdu};
use crate::lu::{DataDirection, ScsiResult, ScsiStatus};

/// How many commands a session may have in flight (the CmdSN window we
/// advertise). 128 covers a QD32 initiator with room for bursts and keeps a
/// bound on per-session memory.
pub const QUEUE_DEPTH: u32 = 128;

/// Result of offering a CmdSN to the window.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<T> {
    /// Run these, in order (the offered item and any queued ones it freed).
    Run(Vec<T>),
    /// Held until the CmdSNs before it arrive.
    Queued,
    /// Outside [ExpCmdSN, MaxCmdSN] or already received: dropped silently,
    /// as RFC 7143 §4.2.2.1 requires.
    Dropped,
}

/// Orders non-immediate commands by CmdSN (RFC 7143 §4.2.2.1). With one
/// connection per session commands normally arrive in order and pass
/// straight through; out-of-order ones inside the window wait.
#[derive(Debug)]
pub struct CmdSnWindow<T> {
    exp: CmdSn,
    /// Slot `i` holds the command with CmdSN `exp + i`.
    waiting: VecDeque<Option<T>>,
}

impl<T> CmdSnWindow<T> {
    pub fn new(exp: CmdSn) -> Self {
        CmdSnWindow {
            exp,
            waiting: VecDeque::new(),
        }
    }

    pub fn exp_cmdsn(&self) -> CmdSn {
        self.exp
    }

    /// Offer a command. `max` is the MaxCmdSN we last advertised.
    pub fn admit(&mut self, cmdsn: CmdSn, immediate: bool, max: CmdSn, item: T) -> Admission<T> {
        if immediate {
            return Admission::Run(vec![item]);
        }
        if !(self.exp.precedes_or_eq(cmdsn) && cmdsn.precedes_or_eq(max)) {
            return Admission::Dropped;
        }
        let slot = self.exp.distance_to(cmdsn) as usize;
        if slot == 0 && self.waiting.is_empty() {
            self.exp = self.exp.next();
            return Admission::Run(vec![item]);
        }
        if self.waiting.len() <= slot {
            self.waiting.resize_with(slot + 1, || None);
        }
        if self.waiting[slot].is_some() {
            return Admission::Dropped;
        }
        self.waiting[slot] = Some(item);
        let mut ready = Vec::new();
        while let Some(Some(_)) = self.waiting.front() {
            ready.push(self.waiting.pop_front().flatten().expect("checked"));
            self.exp = self.exp.next();
        }
        if ready.is_empty() {
            Admission::Queued
        } else {
            Admission::Run(ready)
        }
    }

    /// Count `cmdsn` as received without running anything (ABORT TASK for a
    /// command that never arrived, RFC 7143 §11.5.1).
    pub fn skip(&mut self, cmdsn: CmdSn) {
        if cmdsn == self.exp && self.waiting.is_empty() {
            self.exp = self.exp.next();
        }
    }
}

/// Sequence state the writer needs to stamp ExpCmdSN / MaxCmdSN.
#[derive(Debug)]
pub struct SeqState {
    exp_cmdsn: AtomicU32,
    in_flight: AtomicU32,
    /// The MaxCmdSN last sent: never decreases (initiators ignore decreases).
    advertised_max: AtomicU32,
    idle: Notify,
}

impl SeqState {
    pub fn new(exp: CmdSn) -> SeqState {
        SeqState {
            exp_cmdsn: AtomicU32::new(exp.0),
            in_flight: AtomicU32::new(0),
            advertised_max: AtomicU32::new(exp.plus(QUEUE_DEPTH - 1).0),
            idle: Notify::new(),
        }
    }

    pub fn set_exp_cmdsn(&self, exp: CmdSn) {
        self.exp_cmdsn.store(exp.0, Ordering::Release);
    }

    pub fn exp_cmdsn(&self) -> CmdSn {
        CmdSn(self.exp_cmdsn.load(Ordering::Acquire))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn advertised_max(&self) -> CmdSn {
        CmdSn(self.advertised_max.load(Ordering::Acquire))
    }

    /// ExpCmdSN and MaxCmdSN for the next PDU: the window shrinks while
    /// commands are in flight, but what was advertised is never taken back.
    /// Called by the writer only.
    pub fn window(&self) -> (CmdSn, CmdSn) {
        let exp = self.exp_cmdsn();
        let free = QUEUE_DEPTH.saturating_sub(self.in_flight());
        let proposed = CmdSn(exp.0.wrapping_add(free).wrapping_sub(1));
        let old = self.advertised_max();
        let max = if old.precedes(proposed) { proposed } else { old };
        self.advertised_max.store(max.0, Ordering::Release);
        (exp, max)
    }

    /// Count one command in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Wait until no command is in flight.
    ///
    /// Cancel safety: safe; nothing is consumed.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A command counted in flight; dropping it (completion or abort) frees its
/// slot in the CmdSN window.
#[derive(Debug)]
pub struct InFlight(Arc<SeqState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A running command.
#[derive(Debug)]
pub struct TaskEntry {
    pub lun: u64,
    pub cmdsn: CmdSn,
    pub abort: AbortHandle,
}

/// The running commands of one session, by ITT. Locked briefly by the reader
/// (insert, abort) and by each task as it completes: a per-session lock, never
/// a global one.
#[derive(Debug, Default)]
pub struct TaskTable {
    tasks: Mutex<HashMap<u32, TaskEntry>>,
}

impl TaskTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, TaskEntry>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every operation is a single insert/remove), so poisoning is ignored.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, itt: Itt) -> bool {
        self.lock().contains_key(&itt.0)
    }

    /// Insert while spawning: `spawn` runs under the lock so that the task
    /// cannot complete before its entry exists.
    pub fn insert_with(&self, itt: Itt, lun: u64, cmdsn: CmdSn, spawn: impl FnOnce() -> AbortHandle) {
        let mut tasks = self.lock();
        let abort = spawn();
        tasks.insert(itt.0, TaskEntry { lun, cmdsn, abort });
    }

    /// Called by a task as it completes: true if it still owns its outcome.
    pub fn complete(&self, itt: Itt) -> bool {
        self.lock().remove(&itt.0).is_some()
    }

    /// ABORT TASK: true if the task was running (and is now aborted).
    pub fn abort(&self, itt: Itt) -> bool {
        match self.lock().remove(&itt.0) {
            Some(entry) => {
                entry.abort.abort();
                true
            }
            None => false,
        }
    }

    /// Abort every task on `lun` (all LUNs with `None`); returns how many.
    pub fn abort_all(&self, lun: Option<u64>) -> usize {
        let mut tasks = self.lock();
        let doomed: Vec<u32> = tasks
            .iter()
            .filter(|(_, e)| lun.is_none_or(|l| e.lun == l))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in &doomed {
            if let Some(entry) = tasks.remove(itt) {
                entry.abort.abort();
            }
        }
        doomed.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Limits on what we send, from the initiator's declarations.
#[derive(Clone, Copy, Debug)]
pub struct DataInLimits {
    /// The initiator's MaxRecvDataSegmentLength.
    pub max_segment: u32,
    /// MaxBurstLength: a Data-In sequence ends (F bit) at this many bytes.
    pub max_burst: u32,
}

/// The PDUs that finish a command: Data-In split by the initiator's segment
/// and burst limits (sharing `result.data_in`, no copy) and the status, in
/// the last Data-In when it is GOOD without sense, else in a SCSI Response.
pub fn completion_pdus(
    itt: Itt,
    direction: DataDirection,
    expected_len: u32,
    result: &ScsiResult,
    limits: DataInLimits,
) -> Vec<TargetPdu> {
    let actual = match direction {
        DataDirection::Write => u64::from(result.data_out_len),
        _ => result.data_in.len() as u64,
    };
    let residual = Residual::of(expected_len, actual);
    let data = result
        .data_in
        .slice(..result.data_in.len().min(expected_len as usize));
    let status_in_data = result.status == ScsiStatus::Good && result.sense.is_none() && !data.is_empty();
    let max_segment = limits.max_segment.max(512) as usize;
    let max_burst = limits.max_burst.max(512) as usize;

    let mut pdus = Vec::with_capacity(data.len() / max_segment + 2);
    let mut offset = 0usize;
    let mut datasn = DataSn(0);
    while offset < data.len() {
        let burst_end = (offset / max_burst + 1) * max_burst;
        let end = (offset + max_segment).min(data.len()).min(burst_end);
        let last = end == data.len();
        let status = (last && status_in_data).then_some((result.status, residual));
        pdus.push(pdu::data_in(
            itt,
            data.slice(offset..end),
            datasn,
            offset as u32,
            last || end == burst_end,
            status,
        ));
        datasn = datasn.next();
        offset = end;
    }
    if !status_in_data {
        pdus.push(pdu::scsi_response(
            itt,
            result.status,
            residual,
            result.sense.as_ref(),
        ));
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::{Opcode, StatSnUse};
    use bytes::Bytes;

    fn result(status: ScsiStatus, data_in: usize, sense: Option<&'static [u8]>) -> ScsiResult {
        ScsiResult {
            status,
            sense: sense.map(Bytes::from_static),
            data_in: Bytes::from(vec![7u8; data_in]),
            data_out_len: 0,
        }
    }

    const LIMITS: DataInLimits = DataInLimits {
        max_segment: 8192,
        max_burst: 16384,
    };

    #[test]
    fn commands_in_order_pass_straight_through() {
        let mut w = CmdSnWindow::new(CmdSn(10));
        assert_eq!(
            w.admit(CmdSn(10), false, CmdSn(20), "a"),
            Admission::Run(vec!["a"])
        );
        assert_eq!(
            w.admit(CmdSn(11), false, CmdSn(20), "b"),
            Admission::Run(vec!["b"])
        );
        assert_eq!(w.exp_cmdsn(), CmdSn(12));
    }

    #[test]
    fn out_of_order_commands_wait_for_the_gap() {
        let mut w = CmdSnWindow::new(CmdSn(1));
        assert_eq!(w.admit(CmdSn(3), false, CmdSn(9), "c"), Admission::Queued);
        assert_eq!(w.admit(CmdSn(2), false, CmdSn(9), "b"), Admission::Queued);
        assert_eq!(
            w.admit(CmdSn(1), false, CmdSn(9), "a"),
            Admission::Run(vec!["a", "b", "c"])
        );
        assert_eq!(w.exp_cmdsn(), CmdSn(4));
    }

    #[test]
    fn out_of_window_and_duplicate_commands_are_dropped() {
        let mut w = CmdSnWindow::new(CmdSn(5));
        assert_eq!(w.admit(CmdSn(4), false, CmdSn(9), "old"), Admission::Dropped);
        assert_eq!(w.admit(CmdSn(10), false, CmdSn(9), "beyond"), Admission::Dropped);
        assert_eq!(w.admit(CmdSn(7), false, CmdSn(9), "x"), Admission::Queued);
        assert_eq!(w.admit(CmdSn(7), false, CmdSn(9), "dup"), Admission::Dropped);
        assert_eq!(
            w.admit(CmdSn(3), true, CmdSn(9), "imm"),
            Admission::Run(vec!["imm"]),
            "immediate"
        );
        assert_eq!(w.exp_cmdsn(), CmdSn(5));
    }

    #[test]
    fn window_wraps_around_the_serial_space() {
        let mut w = CmdSnWindow::new(CmdSn(u32::MAX));
        assert_eq!(
            w.admit(CmdSn(u32::MAX), false, CmdSn(5), 1),
            Admission::Run(vec![1])
        );
        assert_eq!(w.admit(CmdSn(0), false, CmdSn(5), 2), Admission::Run(vec![2]));
    }

    #[test]
    fn max_cmdsn_shrinks_with_load_but_is_never_taken_back() {
        let seq = Arc::new(SeqState::new(CmdSn(1)));
        assert_eq!(seq.window(), (CmdSn(1), CmdSn(QUEUE_DEPTH)));
        let guards: Vec<_> = (0..10).map(|_| seq.start()).collect();
        seq.set_exp_cmdsn(CmdSn(11));
        assert_eq!(
            seq.window(),
            (CmdSn(11), CmdSn(QUEUE_DEPTH)),
            "10 in flight: no growth"
        );
        drop(guards);
        assert_eq!(seq.window(), (CmdSn(11), CmdSn(QUEUE_DEPTH + 10)));
    }

    #[test]
    fn good_read_puts_status_in_the_last_data_in() {
        let pdus = completion_pdus(
            Itt(1),
            DataDirection::Read,
            20000,
            &result(ScsiStatus::Good, 20000, None),
            LIMITS,
        );
        let shape: Vec<_> = pdus
            .iter()
            .map(|p| (p.data.len(), p.bhs.u32_at(40), p.bhs.0[1], p.bhs.u32_at(36)))
            .collect();
        // 8192 + 8192 (end of the 16 KiB burst: F) + 3616 (F, S).
        assert_eq!(
            shape,
            vec![(8192, 0, 0x00, 0), (8192, 8192, 0x80, 1), (3616, 16384, 0x81, 2)]
        );
        assert_eq!(pdus[2].statsn, StatSnUse::Advance);
        assert_eq!(pdus[0].statsn, StatSnUse::Reserved);
    }

    #[test]
    fn short_read_reports_underflow_and_long_read_is_truncated_with_overflow() {
        let pdus = completion_pdus(
            Itt(1),
            DataDirection::Read,
            4096,
            &result(ScsiStatus::Good, 512, None),
            LIMITS,
        );
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].bhs.0[1], 0x80 | 0x02 | 0x01);
        assert_eq!(pdus[0].bhs.u32_at(44), 3584);
        let pdus = completion_pdus(
            Itt(1),
            DataDirection::Read,
            36,
            &result(ScsiStatus::Good, 96, None),
            LIMITS,
        );
        assert_eq!(pdus[0].data.len(), 36);
        assert_eq!(pdus[0].bhs.0[1], 0x80 | 0x04 | 0x01);
        assert_eq!(pdus[0].bhs.u32_at(44), 60);
    }

    #[test]
    fn check_condition_goes_in_a_scsi_response_with_sense() {
        let pdus = completion_pdus(
            Itt(9),
            DataDirection::Read,
            512,
            &result(ScsiStatus::CheckCondition, 0, Some(&[0x70, 0, 5])),
            LIMITS,
        );
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].bhs.opcode_value(), Opcode::ScsiResponse as u8);
        assert_eq!(pdus[0].bhs.0[3], ScsiStatus::CheckCondition as u8);
        assert_eq!(&pdus[0].data[..], &[0, 3, 0x70, 0, 5]);
    }

    #[test]
    fn write_residual_compares_data_out_len_with_expected_length() {
        let mut r = result(ScsiStatus::Good, 0, None);
        r.data_out_len = 1024;
        let pdus = completion_pdus(Itt(2), DataDirection::Write, 4096, &r, LIMITS);
        assert_eq!(pdus.len(), 1);
        assert_eq!(pdus[0].bhs.0[1], 0x80 | 0x02);
        assert_eq!(pdus[0].bhs.u32_at(44), 3072);
    }
}
