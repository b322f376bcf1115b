//! Bulk API 2.0 results as CSV, written as Salesforce writes them: a header row of field
//! names, every field quoted, `"` doubled, null as an empty field, datetimes in UTC with `Z`,
//! the job's column delimiter and line ending. It formats values only; which rows and columns
//! a chunk holds is the Bulk job's.

use crate::emulator::store::Record;
use crate::model::time::datetime_ms;
use serde_json::Value as J;
use std::fmt::Write as _;
use std::sync::Arc;

/// How a column's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvKind {
    /// REST's `...+0000` becomes `...Z`.
    Datetime,
    Plain,
}

#[derive(Debug, Clone)]
pub struct CsvColumn {
    pub name: String,
    pub kind: CsvKind,
}

/// A job's `columnDelimiter` and `lineEnding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsvFormat {
    pub delimiter: char,
    pub line_ending: &'static str,
}

/// Bulk API 2.0 `columnDelimiter` names and their characters.
pub const DELIMITERS: &[(&str, char)] = &[
    ("COMMA", ','),
    ("BACKQUOTE", '`'),
    ("CARET", '^'),
    ("PIPE", '|'),
    ("SEMICOLON", ';'),
    ("TAB", '\t'),
];

/// `"text"` with every `"` doubled: Salesforce quotes every field, so delimiters and line
/// breaks inside values need nothing more.
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    if s.contains('"') {
        for c in s.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
    } else {
        out.push_str(s);
    }
    out.push('"');
}

fn push_value(out: &mut String, kind: CsvKind, v: &J) {
    match v {
        J::Null => out.push_str("\"\""),
        J::Bool(b) => out.push_str(if *b { "\"true\"" } else { "\"false\"" }),
        J::Number(n) => {
            let _ = write!(out, "\"{n}\"");
        }
        J::String(s) if kind == CsvKind::Datetime => {
            out.push('"');
            if let Some(base) = s.strip_suffix("+0000") {
                out.push_str(base);
                out.push('Z');
            } else if let Some(ms) = datetime_ms(s) {
                let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
                let _ = write!(out, "{}", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
            } else {
                out.push_str(&s.replace('"', "\"\""));
            }
            out.push('"');
        }
        J::String(s) => push_quoted(out, s),
        other => push_quoted(out, &other.to_string()),
    }
}

/// The header row: the column names.
pub fn csv_header(out: &mut String, format: &CsvFormat, columns: &[CsvColumn]) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(format.delimiter);
        }
        push_quoted(out, &c.name);
    }
    out.push_str(format.line_ending);
}

/// One data row; values in column order.
pub fn csv_row(out: &mut String, format: &CsvFormat, columns: &[CsvColumn], values: &[J]) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(format.delimiter);
        }
        push_value(out, c.kind, values.get(i).unwrap_or(&J::Null));
    }
    out.push_str(format.line_ending);
}

/// A whole chunk: the header row, then `rows`.
pub fn csv_chunk(format: &CsvFormat, columns: &[CsvColumn], rows: &[Vec<J>]) -> String {
    let mut out = String::with_capacity(64 + rows.len() * columns.len() * 16);
    csv_header(&mut out, format, columns);
    for r in rows {
        csv_row(&mut out, format, columns, r);
    }
    out
}

/// A whole chunk read from records: the header row, then each record's columns.
pub(super) fn csv_records(
    format: &CsvFormat,
    columns: &[CsvColumn],
    records: &[Arc<Record>],
) -> String {
    let mut out = String::with_capacity(64 + records.len() * columns.len() * 16);
    csv_header(&mut out, format, columns);
    for r in records {
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                out.push(format.delimiter);
            }
            push_value(&mut out, c.kind, r.get(&c.name).unwrap_or(&J::Null));
        }
        out.push_str(format.line_ending);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(kinds: &[(&str, CsvKind)]) -> Vec<CsvColumn> {
        kinds
            .iter()
            .map(|(n, k)| CsvColumn {
                name: (*n).to_string(),
                kind: *k,
            })
            .collect()
    }

    const COMMA_LF: CsvFormat = CsvFormat {
        delimiter: ',',
        line_ending: "\n",
    };

    #[test]
    fn csv_quotes_every_field_and_doubles_quotes() {
        let c = cols(&[("Id", CsvKind::Plain), ("Name", CsvKind::Plain)]);
        let rows = vec![
            vec![json!("001A"), json!("Acme, \"Inc\"")],
            vec![json!("001B"), json!("two\nlines\r\nhere")],
            vec![json!("001C"), json!("\"")],
        ];
        assert_eq!(
            csv_chunk(&COMMA_LF, &c, &rows),
            "\"Id\",\"Name\"\n\"001A\",\"Acme, \"\"Inc\"\"\"\n\
             \"001B\",\"two\nlines\r\nhere\"\n\"001C\",\"\"\"\"\n"
        );
    }

    #[test]
    fn csv_writes_nulls_booleans_numbers_and_datetimes_like_salesforce() {
        let c = cols(&[
            ("Paid__c", CsvKind::Plain),
            ("Memo__c", CsvKind::Plain),
            ("Line_Count__c", CsvKind::Plain),
            ("Total__c", CsvKind::Plain),
            ("Sent_At__c", CsvKind::Datetime),
            ("Due_Date__c", CsvKind::Plain),
            ("CreatedDate", CsvKind::Datetime),
        ]);
        let mut out = String::new();
        csv_row(
            &mut out,
            &COMMA_LF,
            &c,
            &[
                json!(true),
                J::Null,
                json!(42),
                json!(1000.5),
                json!("2022-01-10T13:01:28.000+0000"),
                json!("2024-04-26"),
                json!("2022-01-10T14:01:28.123+01:00"),
            ],
        );
        assert_eq!(
            out,
            "\"true\",\"\",\"42\",\"1000.5\",\"2022-01-10T13:01:28.000Z\",\"2024-04-26\",\
             \"2022-01-10T13:01:28.123Z\"\n"
        );
        // A short row is padded with nulls rather than misaligned.
        let mut out = String::new();
        csv_row(&mut out, &COMMA_LF, &c[..2], &[json!(false)]);
        assert_eq!(out, "\"false\",\"\"\n");
    }

    #[test]
    fn csv_honours_every_delimiter_and_crlf() {
        let c = cols(&[("A", CsvKind::Plain), ("B", CsvKind::Plain)]);
        for (name, d) in DELIMITERS {
            let f = CsvFormat {
                delimiter: *d,
                line_ending: "\r\n",
            };
            let text = csv_chunk(&f, &c, &[vec![json!(format!("x{d}y")), json!("z")]]);
            assert_eq!(
                text,
                format!("\"A\"{d}\"B\"\r\n\"x{d}y\"{d}\"z\"\r\n"),
                "{name}"
            );
        }
    }
}
