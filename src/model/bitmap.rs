//! The bitmap codec of change event headers: `changedFields`, `nulledFields` and `diffFields`
//! list field positions as hex strings (`0x...`, least significant bit = field 0 of the
//! schema, or of a compound's sub-record after a `p-` prefix). The source side reads them with
//! the writer schema; the emulator writes them. Both share this one codec, so the two cannot
//! drift apart.
//!
//! Reading is tolerant (either case, odd digit counts, a missing `0x`); writing produces the
//! form Salesforce sends: `0x`, upper-case, two digits per byte, most significant byte first.

/// The set bit positions of a hex string (`0x` prefix optional), least significant = 0.
/// Accepts either case and odd digit counts.
pub fn set_bits(hex: &str) -> Option<Vec<usize>> {
    let digits = hex_digits(hex)?;
    let mut bits = Vec::new();
    for_each_set_bit(digits, |b| bits.push(b));
    Some(bits)
}

/// The hex digits of a bitmap (`0x`/`0X` prefix and surrounding space removed), or `None` if
/// there are none or any is not a hex digit.
pub fn hex_digits(hex: &str) -> Option<&[u8]> {
    let t = hex.trim();
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t)
        .as_bytes();
    (!digits.is_empty() && digits.iter().all(u8::is_ascii_hexdigit)).then_some(digits)
}

/// Calls `f` with each set bit of hex digits checked by [`hex_digits`], least significant
/// first. Allocates nothing: the decoder calls it once per bitmap of every event.
pub fn for_each_set_bit(digits: &[u8], mut f: impl FnMut(usize)) {
    for (k, &c) in digits.iter().rev().enumerate() {
        let mut nibble = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => 0,
        };
        while nibble != 0 {
            let b = nibble.trailing_zeros() as usize;
            f(k * 4 + b);
            nibble &= nibble - 1;
        }
    }
}

/// Encodes field positions as Salesforce writes a bitmap: `0x` + upper-case hex, two digits
/// per byte, most significant byte first, no padding beyond the highest byte.
pub fn encode_bits(bits: impl IntoIterator<Item = usize>) -> String {
    let mut bytes: Vec<u8> = Vec::new();
    for bit in bits {
        let byte = bit / 8;
        if bytes.len() <= byte {
            bytes.resize(byte + 1, 0);
        }
        bytes[byte] |= 1 << (bit % 8);
    }
    if bytes.is_empty() {
        bytes.push(0);
    }
    let mut s = String::from("0x");
    for b in bytes.iter().rev() {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documented_forms() {
        assert_eq!(set_bits("0x06"), Some(vec![1, 2]));
        assert_eq!(set_bits("0X6"), Some(vec![1, 2]));
        assert_eq!(set_bits("650004E0").map(|b| b.len()), Some(8));
        assert_eq!(set_bits("0x"), None);
        assert_eq!(set_bits("0xZZ"), None);
        assert_eq!(encode_bits([1, 2]), "0x06");
        assert_eq!(encode_bits([8]), "0x0100");
        assert_eq!(encode_bits([]), "0x00");
    }

    proptest! {
        #[test]
        fn encode_then_decode_bits(bits in proptest::collection::btree_set(0usize..200, 0..20)) {
            let s = encode_bits(bits.iter().copied());
            prop_assert!(s.len() % 2 == 0, "even digit count: {}", s);
            prop_assert_eq!(s.to_uppercase().replace("0X", "0x"), s.clone());
            let mut got = set_bits(&s).expect("hex");
            got.sort();
            prop_assert_eq!(got, bits.into_iter().collect::<Vec<_>>());
        }
    }
}
