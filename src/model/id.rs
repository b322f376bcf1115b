//! Salesforce record ids. An id has a 15-character case-sensitive form and an 18-character
//! form whose last three characters encode, five characters each, which letters are upper
//! case, so that the id survives case-insensitive systems. APIs answer with the 18-character
//! form; the replica's primary keys and the emulator's records use it.

/// Extends a 15-character id with Salesforce's 3-character case checksum.
pub fn id18(id15: &str) -> String {
    const SUFFIX: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let mut out = id15.to_string();
    for chunk in id15.as_bytes().chunks(5) {
        let mut bits = 0usize;
        for (i, c) in chunk.iter().enumerate() {
            if c.is_ascii_uppercase() {
                bits |= 1 << i;
            }
        }
        out.push(SUFFIX[bits] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksum_of_known_ids() {
        // The suffix of an all-lower-case or digit id is AAA; each upper-case letter sets its
        // bit in its chunk of five.
        assert_eq!(super::id18("001000000000001"), "001000000000001AAA");
        assert_eq!(super::id18("001A00000000001"), "001A00000000001IAA");
    }
}
