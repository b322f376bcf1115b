//! Long text values sent as data differences (`diffFields`): Salesforce's line-based unified
//! diff, headed by `--- ` and `+++ <SHA-256 of the new value>`.
//!
//! [`apply`] rebuilds the new value from the old one and accepts it only if it hashes to the
//! value in the header, so a diff that does not fit the replica's current value (a missed
//! change, a format this reader does not expect) is refused rather than applied wrongly; the
//! caller then re-reads the record. Hunks may carry context lines (` `), removed lines (`-`)
//! and added lines (`+`); `\` lines ("no newline at end of file") are ignored, the hash
//! settles what the value ends with. Shared by the merge and the emulator, which makes diffs.

use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of `value`.
pub fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies `diff` to `old`: the new value, or `None` if the diff is malformed, does not fit
/// `old`, or the result does not hash to the diff's `+++` value.
pub fn apply(old: &str, diff: &str) -> Option<String> {
    let mut lines = diff.split('\n');
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let hash = lines
        .next()?
        .strip_prefix("+++ ")?
        .trim()
        .to_ascii_lowercase();
    let a: Vec<&str> = old.split('\n').collect();
    let mut out: Vec<&str> = Vec::with_capacity(a.len());
    let mut next_old = 0usize;
    // Lines of the open hunk still expected: (old side, new side).
    let mut pending: Option<(usize, usize)> = None;
    let open = |p: Option<(usize, usize)>| p.is_some_and(|(o, n)| o != 0 || n != 0);
    for line in lines {
        if let Some(spec) = line.strip_prefix("@@ ") {
            if open(pending) {
                return None;
            }
            let spec = spec.split(" @@").next()?;
            let (minus, plus) = spec.split_once(' ')?;
            let (o_start, o_len) = range(minus.strip_prefix('-')?)?;
            let (_, n_len) = range(plus.strip_prefix('+')?)?;
            let first = if o_len == 0 {
                o_start
            } else {
                o_start.checked_sub(1)?
            };
            if first < next_old || first > a.len() {
                return None;
            }
            out.extend_from_slice(&a[next_old..first]);
            next_old = first;
            pending = Some((o_len, n_len));
        } else if let Some(context) = line.strip_prefix(' ') {
            let (o, n) = pending.as_mut()?;
            if *o == 0 || *n == 0 || a.get(next_old) != Some(&context) {
                return None;
            }
            *o -= 1;
            *n -= 1;
            out.push(context);
            next_old += 1;
        } else if let Some(removed) = line.strip_prefix('-') {
            let (o, _) = pending.as_mut()?;
            if *o == 0 || a.get(next_old) != Some(&removed) {
                return None;
            }
            *o -= 1;
            next_old += 1;
        } else if let Some(added) = line.strip_prefix('+') {
            let (_, n) = pending.as_mut()?;
            if *n == 0 {
                return None;
            }
            *n -= 1;
            out.push(added);
        } else if !line.is_empty() && !line.starts_with('\\') {
            return None;
        }
    }
    if open(pending) {
        return None;
    }
    out.extend_from_slice(a.get(next_old..)?);
    let value = out.join("\n");
    (sha256_hex(&value) == hash).then_some(value)
}

/// `start,len` (or `start`, meaning one line).
fn range(s: &str) -> Option<(usize, usize)> {
    match s.split_once(',') {
        Some((start, len)) => Some((start.parse().ok()?, len.parse().ok()?)),
        None => Some((s.parse().ok()?, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(new: &str) -> String {
        format!("--- \n+++ {}\n", sha256_hex(new))
    }

    #[test]
    fn hunks_with_context_lines_apply() {
        let old = "a\nb\nc\nd\ne";
        let new = "a\nb\nC\nd\ne\nf";
        let diff = format!(
            "{}@@ -2,3 +2,3 @@\n b\n-c\n+C\n d\n@@ -5,0 +6,1 @@\n+f\n",
            header(new)
        );
        assert_eq!(apply(old, &diff).as_deref(), Some(new));
    }

    #[test]
    fn a_diff_that_does_not_fit_is_refused() {
        let old = "a\nb\nc";
        let new = "a\nB\nc";
        let diff = format!("{}@@ -2,1 +2,1 @@\n-b\n+B\n", header(new));
        assert_eq!(apply(old, &diff).as_deref(), Some(new));
        // Another base line, a wrong hash, a short hunk, garbage.
        assert_eq!(apply("a\nx\nc", &diff), None);
        assert_eq!(apply(old, &diff.replace("+B", "+Q")), None);
        assert_eq!(
            apply(old, &format!("{}@@ -2,2 +2,1 @@\n-b\n+B\n", header(new))),
            None
        );
        assert_eq!(apply(old, "not a diff"), None);
        assert_eq!(
            apply(old, &format!("{}@@ -0,1 +1,1 @@\n-a\n", header(new))),
            None
        );
    }
}
