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

/// A duration in milliseconds or with a unit (`500ms`, `5s`, `2m`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 500ms, 5s or 2m"))?;
    Ok(match unit {
        "ms" | "" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        other => return Err(format!("`{other}` is not a duration unit: use ms, s or m")),
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
}
