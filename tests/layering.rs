//! The layout's rules, checked on the source text (`src/lib.rs` states them):
//!
//! - non-test code of `replica` imports neither `salesforce` nor `sync`;
//! - non-test code of `salesforce` imports neither `replica` nor `sync`;
//! - non-test code of `emulator` imports nothing of the crate but `model` and `proto`
//!   (its tests may decode with the source side);
//! - `sync` holds no SQL text (the control schema's statements live under `replica`);
//! - only `telemetry` calls the `metrics` macros;
//! - no file holds more than 800 lines of non-test code unless its module doc says why
//!   (a line starting `//! Why this file is long:`).
//!
//! Comments and `#[cfg(test)]` items are left out before looking, so a doc link or a test
//! helper does not count as an import.

use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Every `.rs` file under `dir`, but for files that hold only test code (declared as
/// `#[cfg(test)] mod name;`).
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let all = all_rust_files(dir);
    let test_only = test_module_files(&all);
    all.into_iter().filter(|f| !test_only.contains(f)).collect()
}

/// The files that `#[cfg(test)] mod name;` declarations among `files` point at.
fn test_module_files(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let Some(name) = pair[1]
                .strip_prefix("mod ")
                .and_then(|rest| rest.strip_suffix(';'))
            else {
                continue;
            };
            if pair[0] != "#[cfg(test)]" {
                continue;
            }
            let dir = match file.file_name().and_then(|n| n.to_str()) {
                Some("mod.rs" | "lib.rs" | "main.rs") => file.parent().map(Path::to_path_buf),
                _ => file
                    .parent()
                    .zip(file.file_stem())
                    .map(|(parent, stem)| parent.join(stem)),
            };
            if let Some(dir) = dir {
                out.push(dir.join(format!("{name}.rs")));
                out.push(dir.join(name).join("mod.rs"));
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`.
fn all_rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The file's non-test code, comments removed, as (line number, text) pairs.
fn production_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim();
        if trimmed == "#[cfg(test)]" {
            i = end_of_item(&lines, i + 1);
            continue;
        }
        let code = match trimmed.find("//") {
            // Not a `//` inside a string literal (URLs in code): only whole comment lines and
            // trailing comments after code without quotes are dropped.
            Some(0) => "",
            Some(at) if !trimmed[..at].contains('"') => &trimmed[..at],
            _ => trimmed,
        };
        if !code.is_empty() {
            out.push((i + 1, code.to_string()));
        }
        i += 1;
    }
    out
}

/// The index of the line after the item that starts at `start` (ends at its `;` or at the
/// brace that closes its first `{`).
fn end_of_item(lines: &[&str], start: usize) -> usize {
    let mut depth = 0i32;
    let mut opened = false;
    for (i, line) in lines.iter().enumerate().skip(start) {
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                ';' if !opened && depth == 0 => return i + 1,
                _ => {}
            }
        }
        if opened && depth <= 0 {
            return i + 1;
        }
    }
    lines.len()
}

/// The crate modules a file's non-test code names (`crate::x`), with where.
fn crate_uses(path: &Path) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in production_lines(path) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                // `crate::{a, b}`: every name in the group.
                if let Some(group) = after.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    for part in group[..end].split(',') {
                        let name: String = part
                            .trim()
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !name.is_empty() {
                            out.push((n, name));
                        }
                    }
                }
            } else {
                out.push((n, name));
            }
            rest = after;
        }
    }
    out
}

fn violations(dir: &str, allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut bad = Vec::new();
    for file in rust_files(&Path::new(SRC).join(dir)) {
        for (line, module) in crate_uses(&file) {
            if !allowed(&module) {
                bad.push(format!("{}:{line} uses crate::{module}", file.display()));
            }
        }
    }
    bad
}

#[test]
fn the_sink_never_imports_the_source_or_the_orchestration() {
    let bad = violations("replica", |m| m != "salesforce" && m != "sync");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_source_never_imports_the_sink_or_the_orchestration() {
    let bad = violations("salesforce", |m| m != "replica" && m != "sync");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_emulator_shares_only_model_and_proto() {
    let bad = violations("emulator", |m| ["model", "proto", "emulator"].contains(&m));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_orchestration_holds_no_sql() {
    let sql = [
        "SELECT ",
        "INSERT INTO",
        "UPDATE ",
        "DELETE FROM",
        "CREATE ",
        "ALTER TABLE",
        "DROP ",
        "pg_",
        "to_regclass",
    ];
    let mut bad = Vec::new();
    for file in rust_files(&Path::new(SRC).join("sync")) {
        for (line, code) in production_lines(&file) {
            // Only inside string literals: SQL is text.
            let quoted: Vec<&str> = code.split('"').skip(1).step_by(2).collect();
            for q in quoted {
                if let Some(word) = sql.iter().find(|w| q.contains(**w)) {
                    bad.push(format!("{}:{line} has SQL ({word})", file.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn only_telemetry_records_metrics() {
    let mut bad = Vec::new();
    for file in rust_files(Path::new(SRC)) {
        if file.starts_with(Path::new(SRC).join("telemetry")) {
            continue;
        }
        for (line, code) in production_lines(&file) {
            if code.contains("metrics::") {
                bad.push(format!("{}:{line}", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "metrics macros outside telemetry:\n{}",
        bad.join("\n")
    );
}

#[test]
fn long_files_say_why() {
    let mut bad = Vec::new();
    for file in rust_files(Path::new(SRC)) {
        let n = production_lines(&file).len();
        let text = std::fs::read_to_string(&file).expect("read");
        let says_why = text
            .lines()
            .take_while(|l| l.starts_with("//!") || l.is_empty())
            .any(|l| l.starts_with("//! Why this file is long:"));
        if n > 800 && !says_why {
            bad.push(format!("{}: {n} lines of non-test code", file.display()));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    // Guards the guard: a known import is found, a test module is skipped.
    let uses = crate_uses(&Path::new(SRC).join("sync/reader.rs"));
    assert!(uses.iter().any(|(_, m)| m == "salesforce"), "{uses:?}");
    assert!(uses.iter().any(|(_, m)| m == "replica"), "{uses:?}");
    let lines = [
        "fn a() {}",
        "#[cfg(test)]",
        "mod tests {",
        "    use crate::sync;",
        "}",
        "fn b() {}",
    ];
    assert_eq!(end_of_item(&lines, 2), 5);
    let soql = Path::new(SRC).join("emulator/soql");
    let test_only = test_module_files(&all_rust_files(&soql));
    assert!(test_only.contains(&soql.join("tests.rs")), "{test_only:?}");
}
