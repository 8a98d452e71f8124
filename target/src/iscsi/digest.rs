//! CRC32C digests and the 4-byte padding of iSCSI segments (RFC 7143 §5.3, §11.1).
//!
//! A header digest covers the BHS and any AHS; a data digest covers the data
//! segment *including* its zero padding. The digest is the Castagnoli CRC
//! (iSCSI's "CRC32C"), sent least significant byte first, which is what Linux
//! (`cpu_to_le32`), libiscsi and SCST put on the wire.

/// Bytes of padding that bring `len` up to a multiple of 4.
pub const fn pad_len(len: usize) -> usize {
    (4 - (len % 4)) % 4
}

/// Zero bytes used as padding; at most 3 are ever needed.
pub const PADDING: [u8; 3] = [0; 3];

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// CRC32C over the concatenation of `chunks`.
pub fn crc32c(chunks: &[&[u8]]) -> u32 {
    chunks
        .iter()
        .fold(0, |crc, chunk| crc32c::crc32c_append(crc, chunk))
}

/// The data digest of a segment: CRC32C over the data and its padding.
pub fn data_digest(data: &[u8]) -> u32 {
    crc32c(&[data, &PADDING[..pad_len(data.len())]])
}

/// A digest as it appears on the wire.
pub fn to_wire(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

/// Read a digest from the wire.
pub fn from_wire(bytes: [u8; 4]) -> u32 {
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_rfc_3720_test_vector() {
        // RFC 3720 appendix B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        // 32 bytes of 0xff.
        assert_eq!(crc32c(&[&[0xffu8; 32]]), 0x62a8_ab43);
    }

    #[test]
    fn digest_over_chunks_equals_digest_over_concatenation() {
        let whole: Vec<u8> = (0..100u8).collect();
        assert_eq!(crc32c(&[&whole[..33], &whole[33..]]), crc32c(&[&whole]));
    }

    #[test]
    fn data_digest_covers_padding() {
        assert_eq!(data_digest(b"abcde"), crc32c(&[b"abcde\0\0\0"]));
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(5), 3);
        assert_eq!(pad_len(8), 0);
    }
}
