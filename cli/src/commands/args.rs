//! Argument parsers shared by the subcommands.

pub use basalt_engine::units::{parse_duration, parse_size};

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
}
