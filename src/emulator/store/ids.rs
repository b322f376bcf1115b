//! Record ids the org hands out: the key prefix of the object, a fixed pod part, a sequence
//! number in base 62, and Salesforce's case checksum (the 18-character form). It owns the id
//! layout only; which number comes next is the caller's.

use crate::model::id::id18;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A 15-character id: key prefix, a fixed pod part, and `n` in base 62.
fn id15(prefix: &str, n: u64) -> String {
    let mut digits = [b'0'; 10];
    let mut v = n;
    for d in digits.iter_mut().rev() {
        *d = BASE62[(v % 62) as usize];
        v /= 62;
    }
    format!(
        "{prefix}5g{}",
        std::str::from_utf8(&digits).unwrap_or("0000000000")
    )
}

/// The 18-character id number `n` of `prefix` gets.
pub fn new_id(prefix: &str, n: u64) -> String {
    id18(&id15(prefix, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_a_correct_checksum() {
        // A published example: 001A0000006Vm9r -> 001A0000006Vm9rIAC.
        assert_eq!(id18("001A0000006Vm9r"), "001A0000006Vm9rIAC");
        let id = id18(&id15("001", 12345));
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("001"));
        // The layout query locators and Bulk job ids share: prefix, `5g`, ten base-62 digits.
        assert_eq!(new_id("750", 1), id18("7505g0000000001"));
        assert_eq!(new_id("01g", 63), id18("01g5g0000000011"));
    }
}
