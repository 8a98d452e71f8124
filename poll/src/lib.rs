//! The data path's runtime: a thread that polls briefly before it sleeps.
//!
//! A replicated write at queue depth 1 is a chain of hand-offs between processes: the initiator to the
//! controller, the controller to each replica, each replica back, the controller back. Each hand-off to a
//! process that sleeps is a wake-up, and on a virtual machine a wake-up that crosses CPUs is an
//! inter-processor interrupt and, when the other vCPU halted, a trip through the hypervisor to run it again:
//! more than everything the hop carries costs (`benches/README.md`, "Polling instead of sleeping"). A process that is still awake when the message
//! arrives costs none of it: the sender only queues the bytes, and the receiver finds them at its next look.
//!
//! So the data-path processes (controller, replica, `serve-file`) do what Linux's `haltpoll` idle governor
//! and NAPI busy polling do, in user space: after each message they stay awake for a short budget (500 µs by
//! default, `--busy-poll`), looking for the next one, and sleep only when the budget passes with nothing to
//! do. Two rules keep that cheap:
//!
//! * **It only polls while the volume is busy.** The data path calls [`activity`] for every message (or
//!   socket read) it handles; the poller stops its budget after the last one and costs nothing after
//!   that. An idle volume sleeps exactly as before.
//! * **It never takes a CPU from anyone who wants it.** Each turn of the poll is one `sched_yield` (any
//!   runnable thread on this CPU goes first) and one non-blocking look at the runtime's sockets and timers
//!   ([`tokio::task::yield_now`] makes a current-thread runtime poll its I/O driver without sleeping before it
//!   runs the poller again). A replica that needs the CPU the controller polls on gets it at once.
//!
//! The poller is a task on the runtime, so it sees everything the runtime would wake for (sockets, timers,
//! other threads' wake-ups) as soon as the runtime does, and no wake-up is lost or delayed by it: the poller
//! only ever replaces a sleep with a look. It keeps one thread of a multi-threaded runtime awake; the
//! data-path processes run one thread (`--io-threads 1`), which it covers whole.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The process-wide poller state: the data path of one process reports [`activity`] from wherever it runs.
struct State {
    /// A poller was started in this process; until then [`activity`] does nothing.
    enabled: AtomicBool,
    /// The budget, in nanoseconds.
    budget: AtomicU64,
    /// Poll until this instant (nanoseconds since [`epoch`]).
    deadline: AtomicU64,
    /// The poller is polling; [`activity`] then only moves the deadline, without a wake-up.
    polling: AtomicBool,
    /// Wakes the poller out of its sleep on the first activity after an idle spell.
    wake: Notify,
}

static STATE: State = State {
    enabled: AtomicBool::new(false),
    budget: AtomicU64::new(0),
    deadline: AtomicU64::new(0),
    polling: AtomicBool::new(false),
    wake: Notify::const_new(),
};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The data path handled a message: keep polling for the next one for the budget from now.
///
/// Cheap enough for every message: a clock read and two atomic operations, and a wake-up of the
/// poller only on the first activity after it went to sleep. Does nothing in a process without a poller
/// (tests, the agent, a volume started with `--busy-poll 0`).
pub fn activity() {
    if !STATE.enabled.load(Ordering::Relaxed) {
        return;
    }
    let until = now_ns().saturating_add(STATE.budget.load(Ordering::Relaxed));
    STATE.deadline.fetch_max(until, Ordering::SeqCst);
    if !STATE.polling.load(Ordering::SeqCst) {
        STATE.wake.notify_one();
    }
}

/// Start this process's poller on the current runtime: it stays awake `budget` after the last
/// [`activity`]. Call it once, from inside the runtime the data path runs on; a second call, or a zero
/// budget, starts nothing and changes nothing.
pub fn start(budget: Duration) {
    if budget.is_zero() || STATE.enabled.swap(true, Ordering::SeqCst) {
        return;
    }
    // An activity between the swap and this store polls for no time at all: harmless, and only at start.
    let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
    STATE.budget.store(budget, Ordering::Relaxed);
    tokio::spawn(poll());
}

/// Sleep until the data path is active, then look for work until its budget passes, yielding the CPU at
/// every turn; again and again.
async fn poll() {
    loop {
        STATE.wake.notified().await;
        STATE.polling.store(true, Ordering::SeqCst);
        loop {
            if now_ns() >= STATE.deadline.load(Ordering::SeqCst) {
                // An activity that saw `polling` still set did not wake us: look at the deadline once more
                // after clearing it, so that activity is either seen here or wakes the next sleep.
                STATE.polling.store(false, Ordering::SeqCst);
                if now_ns() >= STATE.deadline.load(Ordering::SeqCst) {
                    break;
                }
                STATE.polling.store(true, Ordering::SeqCst);
            }
            // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
            unsafe { libc::sched_yield() };
            tokio::task::yield_now().await;
        }
    }
}

/// Build the runtime a data-path process runs on: `threads` I/O threads (one: a current-thread runtime, on
/// which every hand-off between the process's tasks stays on one thread), with its poller started by
/// [`start`] from inside it.
pub fn runtime(threads: u16, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.into())
            .thread_name(name)
            .enable_all()
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// The poller is one per process, so its whole life is one test: idle, busy, idle again.
    #[test]
    fn a_busy_runtime_stays_awake_until_its_budget_passes_then_sleeps_again() {
        let budget = Duration::from_millis(800);
        let rt = runtime(1, "basalt-poll-test").expect("a runtime");
        rt.block_on(async move {
            let metrics = tokio::runtime::Handle::current().metrics();
            let parks = || metrics.worker_park_count(0);
            activity(); // before a poller exists: nothing happens
            start(budget);

            // Idle: the runtime sleeps while it waits for a timer, as without a poller.
            let before = parks();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(parks() > before, "an idle runtime must sleep");
            assert!(!STATE.polling.load(Ordering::SeqCst));

            // Busy: after an activity the runtime polls, and whatever it waits for arrives without it ever
            // going to sleep: a timer, a message from another thread's socket, a blocking-pool result.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = listener.local_addr().expect("address");
            let sender = std::thread::spawn(move || {
                let (mut peer, _) = listener.accept().expect("accept");
                std::thread::sleep(Duration::from_millis(50));
                peer.write_all(b"ping").expect("send");
            });
            let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
            let started = Instant::now();
            activity();
            tokio::task::yield_now().await;
            let before = parks();
            assert!(
                STATE.polling.load(Ordering::SeqCst),
                "an activity starts the poll"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut ping = [0u8; 4];
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut ping)
                .await
                .expect("the ping");
            assert_eq!(&ping, b"ping");
            let answer = tokio::task::spawn_blocking(|| {
                std::thread::sleep(Duration::from_millis(20));
                42
            })
            .await
            .expect("the blocking task");
            assert_eq!(answer, 42);
            assert!(
                started.elapsed() < budget,
                "the waits took {:?}, longer than the budget: this machine is too slow for the test to \
                 tell polling from sleeping",
                started.elapsed()
            );
            assert_eq!(parks(), before, "a runtime within its budget must not sleep");
            sender.join().expect("the sender");

            // Idle again: the poll ends a budget after the last activity, and the runtime sleeps.
            tokio::time::sleep(budget + Duration::from_millis(50)).await;
            assert!(
                !STATE.polling.load(Ordering::SeqCst),
                "the poll must end once its budget passed"
            );
            let before = parks();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(parks() > before, "the runtime must sleep again");
        });
    }
}
