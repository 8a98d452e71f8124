//! Argument parsers shared by the subcommands.

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

/// Longest duration a flag takes: 7 days. Far above any timeout or wait an
/// operator means, and far below where adding it to a clock reading would
/// overflow (`Instant + Duration` panics on overflow, and the volume adds its
/// timeouts to the time each request is sent).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A duration in milliseconds or with a unit (`500ms`, `5s`, `2m`), at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 500ms, 5s or 2m"))?;
    let millis_per_unit: u64 = match unit {
        "ms" | "" => 1,
        "s" => 1_000,
        "m" => 60_000,
        other => return Err(format!("`{other}` is not a duration unit: use ms, s or m")),
    };
    n.checked_mul(millis_per_unit)
        .map(std::time::Duration::from_millis)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            format!(
                "`{text}` is too long: a duration may be at most {} days ({}m)",
                MAX_DURATION.as_secs() / 86_400,
                MAX_DURATION.as_secs() / 60
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(parse_volume_size("1000")
            .unwrap_err()
            .contains("multiple of 4 KiB"));
        assert!(parse_volume_size("0").is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(std::time::Duration::from_secs(5)));
        assert!(parse_duration("5h").is_err());
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
}
