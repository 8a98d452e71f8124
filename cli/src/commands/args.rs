//! Argument parsers shared by the subcommands.

use std::time::Duration;

pub use basalt_engine::units::{parse_duration, parse_size};

/// The longest `--busy-poll`: past a few milliseconds a volume that is busy polls through its gaps
/// anyway, and one that is not only burns the CPU longer.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// `--busy-poll` of the data-path processes (controller, replica, serve-file).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct BusyPoll {
    /// After each message, stay awake this long looking for the next one before the process sleeps
    /// (e.g. 200us, 1ms; 0 never polls). On a virtual machine a wake-up costs a process more than a
    /// 4 KiB write; a volume under steady I/O stays awake between its messages instead, yielding
    /// the CPU at every turn to anything else that wants it. An idle volume sleeps: the poll stops this
    /// long after the last message. The agent's environment carries it to the services it runs as
    /// processes.
    #[arg(
        long,
        env = "BASALT_BUSY_POLL",
        value_name = "DURATION",
        default_value = "500us",
        value_parser = parse_busy_poll
    )]
    pub busy_poll: Duration,
}

impl BusyPoll {
    /// Start the poller on the current runtime (a zero budget starts nothing).
    pub fn start(&self) {
        basalt_poll::start(self.busy_poll);
    }
}

/// A `--busy-poll` budget: a number with a unit of us, ms (or µs), or 0.
pub fn parse_busy_poll(text: &str) -> Result<Duration, String> {
    let (n, unit) = basalt_engine::units::number_and_unit(text)
        .ok_or_else(|| format!("`{text}` is not a poll budget: use e.g. 200us, 1ms, or 0 to never poll"))?;
    let budget = match unit {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "" if n == 0 => Duration::ZERO,
        "" => {
            return Err(format!(
                "`{text}` needs a unit: e.g. {n}us or {n}ms (or 0 to never poll)"
            ))
        }
        other => return Err(format!("`{other}` is not a unit of a poll budget: use us or ms")),
    };
    if budget > MAX_BUSY_POLL {
        return Err(format!(
            "`{text}` is longer than a poll budget may be ({}ms): a busy volume stays awake with far less",
            MAX_BUSY_POLL.as_millis()
        ));
    }
    Ok(budget)
}

/// A volume size: a non-zero multiple of 4 KiB (the replicas' block size).
pub fn parse_volume_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size == 0 || size % 4096 != 0 {
        return Err(format!(
            "a volume size must be a non-zero multiple of 4 KiB (4096 bytes); `{text}` is {size} bytes"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_sizes_are_whole_blocks() {
        assert_eq!(parse_volume_size("10G"), Ok(10 << 30));
        assert!(parse_volume_size("1000")
            .unwrap_err()
            .contains("multiple of 4 KiB"));
        assert!(parse_volume_size("0").is_err());
        assert!(parse_volume_size("ten").unwrap_err().contains("not a size"));
    }

    #[test]
    fn poll_budgets_take_microseconds_milliseconds_or_zero() {
        assert_eq!(parse_busy_poll("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_busy_poll("150µs"), Ok(Duration::from_micros(150)));
        assert_eq!(parse_busy_poll("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_busy_poll("0"), Ok(Duration::ZERO));
        assert_eq!(parse_busy_poll("0us"), Ok(Duration::ZERO));
        assert!(parse_busy_poll("200")
            .unwrap_err()
            .contains("needs a unit: e.g. 200us"));
        assert!(parse_busy_poll("1s").unwrap_err().contains("not a unit"));
        assert!(parse_busy_poll("11ms").unwrap_err().contains("longer than"));
        assert!(parse_busy_poll("fast").unwrap_err().contains("not a poll budget"));
        assert!(parse_busy_poll("-1us").unwrap_err().contains("not a poll budget"));
    }
}
