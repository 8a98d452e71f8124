//! Sizes and durations as people type them (`10G`, `512M`, `30s`, `5m`), for
//! command-line flags and the agent's configuration file alike, and the
//! reverse for messages: one set of rules wherever Basalt reads a size.

use std::time::Duration;

/// Parses a size: bytes (`4096`), or a number with a binary unit suffix
/// (`512K`, `10M`, `1G`, `2T`, also `GiB`/`G`/`g` forms).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a size: expected a number with an optional unit, like 10G or 512M")
    })?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!(
                "`{other}` in `{text}` is not a size unit: use K, M, G, T or P (powers of 1024)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Binary units from the largest down, for [`format_size`].
const SIZE_UNITS: [(u32, &str); 5] = [(50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];

/// A size for people: in the largest binary unit it reaches, exact when that
/// unit divides it (`10 GiB`), else to one decimal (`1.5 GiB`). Sizes in
/// configuration files are written with [`format_size_exact`] instead, so
/// they read back to the same number.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in SIZE_UNITS {
        let one = 1u64 << shift;
        if bytes >= one {
            if bytes.is_multiple_of(one) {
                return format!("{} {unit}", bytes >> shift);
            }
            // Display only: the rounding of a float is harmless here.
            return format!("{:.1} {unit}", bytes as f64 / one as f64);
        }
    }
    format!("{bytes} B")
}

/// A size that [`parse_size`] reads back to the same number: the largest
/// unit that divides it (`10G`), else bytes.
pub fn format_size_exact(bytes: u64) -> String {
    for (shift, unit) in SIZE_UNITS {
        let one = 1u64 << shift;
        if bytes >= one && bytes.is_multiple_of(one) {
            return format!("{}{}", bytes >> shift, &unit[..1]);
        }
    }
    bytes.to_string()
}

/// Longest duration a flag takes: 7 days. Far above any timeout or wait an
/// operator means, and far below where adding it to a clock reading would
/// overflow (`Instant + Duration` panics on overflow, and the volume adds its
/// timeouts to the time each request is sent).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Milliseconds per duration unit, the largest first (for
/// [`format_duration`]).
const DURATION_UNITS: [(u64, &str); 4] = [(3_600_000, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")];

/// A duration in milliseconds or with a unit (`500ms`, `5s`, `2m`, `1h`), at
/// most [`MAX_DURATION`]. A bare number is milliseconds, as the engine's
/// timeout flags take them; readers where a bare number is ambiguous (the
/// agent's configuration) refuse it first with [`has_duration_unit`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(text)
        .ok_or_else(|| format!("`{text}` is not a duration: use e.g. 500ms, 5s, 2m or 1h"))?;
    let millis_per_unit: u64 = match unit {
        "" => 1,
        other => match DURATION_UNITS.iter().find(|(_, name)| *name == other) {
            Some((millis, _)) => *millis,
            None => return Err(format!("`{other}` is not a duration unit: use ms, s, m or h")),
        },
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            format!(
                "`{text}` is too long: a duration may be at most {} days ({}m)",
                MAX_DURATION.as_secs() / 86_400,
                MAX_DURATION.as_secs() / 60
            )
        })
}

/// `text` (trimmed) split into its leading whole number and what follows it (the unit, maybe empty);
/// `None` if it does not start with a number that fits a u64.
pub fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    Some((number.parse().ok()?, unit))
}

/// Whether `text` ends in a unit (anything after its digits), rather than
/// being a bare number that [`parse_duration`] reads as milliseconds.
pub fn has_duration_unit(text: &str) -> bool {
    text.trim()
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .chars()
        .next()
        .is_some()
}

/// A duration that [`parse_duration`] reads back to the same value (to the
/// millisecond): the largest unit that divides it (`2h`, `5m`, `30s`,
/// `250ms`).
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    for (per, unit) in DURATION_UNITS {
        let per = u128::from(per);
        if millis >= per && millis.is_multiple_of(per) {
            return format!("{}{unit}", millis / per);
        }
    }
    format!("{millis}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert!(parse_size("ten").unwrap_err().contains("not a size"));
        assert!(parse_size("10X").unwrap_err().contains("not a size unit"));
        assert!(parse_size("99999999999P").unwrap_err().contains("too large"));
    }

    #[test]
    fn sizes_print_for_people() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size_exact(10 << 30), "10G");
        assert_eq!(format_size_exact(1000), "1000");
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5d").is_err());
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn a_bare_number_has_no_unit() {
        assert!(!has_duration_unit("3600"));
        assert!(!has_duration_unit(" 60 "));
        assert!(has_duration_unit("60m"));
        assert!(has_duration_unit("1h"));
        assert!(has_duration_unit("ten"));
    }

    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        for absurd in [
            "307445734561825861m",
            "18446744073709551615s",
            "18446744073709551615",
            "10081m",
            "604800001ms",
        ] {
            let err = parse_duration(absurd).expect_err(absurd);
            assert!(
                err.contains("too long") && err.contains("7 days"),
                "{absurd}: {err}"
            );
        }
        assert_eq!(
            parse_duration("10080m"),
            Ok(MAX_DURATION),
            "7 days is still accepted"
        );
        assert!(parse_duration("99999999999999999999s")
            .unwrap_err()
            .contains("not a duration"));
    }

    proptest! {
        #[test]
        fn exact_sizes_read_back(bytes in any::<u64>()) {
            prop_assert_eq!(parse_size(&format_size_exact(bytes)), Ok(bytes));
        }

        #[test]
        fn durations_read_back(millis in 0..=MAX_DURATION.as_millis() as u64) {
            let d = Duration::from_millis(millis);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
