//! Data differences for large text fields, as Salesforce sends them in UPDATE events
//! ("Sending Data Differences for Fields of Updated Records"): a line-based unified diff with
//! no context lines, headed by `--- ` and `+++ <SHA-256 of the new value>`.
//!
//! Salesforce sends a diff only when it pays off; the rules it documents are applied here:
//! both values at least 1,000 characters, the length changes by at most half, at most a
//! quarter of all lines change, and the diff is shorter than the new value. Otherwise the
//! whole value is sent.
//!
//! Text in, text out: it must not know records or events; the store decides where a diff
//! goes.

use crate::model::textdiff::sha256_hex;

/// Above this many line pairs the emulator sends the whole value instead of a diff.
const MAX_CELLS: usize = 4_000_000;

/// The diff of `old` -> `new`, or `None` when Salesforce would send the whole value.
pub fn text_diff(old: &str, new: &str, min_chars: usize) -> Option<String> {
    let (old_len, new_len) = (old.chars().count(), new.chars().count());
    if old_len < min_chars || new_len < min_chars || old == new {
        return None;
    }
    if old_len.abs_diff(new_len) * 2 > old_len {
        return None;
    }
    let a: Vec<&str> = old.split('\n').collect();
    let b: Vec<&str> = new.split('\n').collect();
    if a.len().saturating_mul(b.len()) > MAX_CELLS {
        return None;
    }
    let hunks = hunks(&a, &b);
    let changed: usize = hunks.iter().map(|h| h.old_len + h.new_len).sum();
    if changed * 4 > a.len() + b.len() {
        return None;
    }
    let mut out = format!("--- \n+++ {}\n", sha256_hex(new));
    for h in &hunks {
        // Unified diff numbering: 1-based start, or the line before when the side is empty.
        let start = |at: usize, len: usize| if len == 0 { at } else { at + 1 };
        out.push_str(&format!(
            "@@ -{},{} +{},{} @@\n",
            start(h.old_at, h.old_len),
            h.old_len,
            start(h.new_at, h.new_len),
            h.new_len
        ));
        for line in &a[h.old_at..h.old_at + h.old_len] {
            out.push('-');
            out.push_str(line);
            out.push('\n');
        }
        for line in &b[h.new_at..h.new_at + h.new_len] {
            out.push('+');
            out.push_str(line);
            out.push('\n');
        }
    }
    (out.chars().count() < new_len).then_some(out)
}

/// A run of removed and added lines (0-based positions).
#[derive(Debug, PartialEq)]
struct Hunk {
    old_at: usize,
    old_len: usize,
    new_at: usize,
    new_len: usize,
}

/// Hunks from a longest-common-subsequence alignment of the lines.
fn hunks(a: &[&str], b: &[&str]) -> Vec<Hunk> {
    let (n, m) = (a.len(), b.len());
    // lcs[i][j] = LCS length of a[i..] and b[j..].
    let mut lcs = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[at(i, j)] = if a[i] == b[j] {
                lcs[at(i + 1, j + 1)] + 1
            } else {
                lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
            };
        }
    }
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let mut open: Option<Hunk> = None;
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.extend(open.take());
            i += 1;
            j += 1;
            continue;
        }
        let h = open.get_or_insert(Hunk {
            old_at: i,
            old_len: 0,
            new_at: j,
            new_len: 0,
        });
        if j < m && (i == n || lcs[at(i, j + 1)] >= lcs[at(i + 1, j)]) {
            h.new_len += 1;
            j += 1;
        } else {
            h.old_len += 1;
            i += 1;
        }
    }
    out.extend(open);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::textdiff::apply as apply_diff;
    use proptest::prelude::*;

    fn paragraphs(n: usize, tag: &str) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "Paragraph {i} {tag}: {}",
                    "lorem ipsum dolor sit amet ".repeat(3)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_small_edit_of_a_long_text_is_sent_as_a_diff() {
        let old = paragraphs(40, "x");
        let new = old.replacen("Paragraph 7 x", "Paragraph 7 edited", 1);
        let d = text_diff(&old, &new, 1000).expect("a diff");
        assert!(d.starts_with("--- \n+++ "));
        assert!(d.contains("@@ -8,1 +8,1 @@\n-Paragraph 7 x"));
        assert_eq!(apply_diff(&old, &d).as_deref(), Some(new.as_str()));
    }

    #[test]
    fn short_or_rewritten_values_are_sent_whole() {
        assert_eq!(text_diff("short", "shorter", 1000), None);
        let old = paragraphs(40, "x");
        assert_eq!(text_diff(&old, &paragraphs(40, "y"), 1000), None);
        assert_eq!(text_diff(&old, &paragraphs(10, "x"), 1000), None);
    }

    #[test]
    fn a_wrong_base_or_hash_is_refused() {
        let old = paragraphs(40, "x");
        let new = old.replacen("Paragraph 3 x", "Paragraph 3 z", 1);
        let d = text_diff(&old, &new, 1000).expect("diff");
        assert_eq!(apply_diff(&paragraphs(40, "q"), &d), None);
        let tampered = d.replacen("+Paragraph 3 z", "+Paragraph 3 w", 1);
        assert_eq!(apply_diff(&old, &tampered), None);
    }

    proptest! {
        #[test]
        fn diffs_reconstruct_the_new_value(
            edits in proptest::collection::vec((0usize..60, 0u8..3, "[a-z ]{0,30}"), 0..6)
        ) {
            let old = paragraphs(60, "base");
            let mut lines: Vec<String> = old.split('\n').map(str::to_string).collect();
            for (at, op, text) in edits {
                let at = at.min(lines.len());
                match op {
                    0 => lines.insert(at, text),
                    1 if at < lines.len() => { lines.remove(at); }
                    _ if at < lines.len() => lines[at] = text,
                    _ => {}
                }
            }
            let new = lines.join("\n");
            if let Some(d) = text_diff(&old, &new, 1000) {
                prop_assert_eq!(apply_diff(&old, &d), Some(new));
            }
        }
    }
}
