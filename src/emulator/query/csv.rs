//! Bulk API 2.0 results as CSV, written as Salesforce writes them: a header row of field
//! names, then one row per record; every field quoted, `"` doubled, delimiters and line
//! breaks inside a value left as they are (the quotes carry them), null as an empty field,
//! datetimes in UTC with `Z`, the job's column delimiter and line ending after every row.
//!
//! The quoting itself is the `csv` crate's; this module decides only how a JSON value reads as
//! text. Which rows and columns a chunk holds is the Bulk job's, not this module's.

use crate::emulator::store::Record;
use crate::model::time::datetime_ms;
use serde_json::Value as J;
use std::fmt::Write as _;
use std::io;
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

/// A job's `columnDelimiter` and `lineEnding`: one of [`DELIMITERS`], and `"\n"` or `"\r\n"`.
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

/// Writes rows of one chunk in a job's format.
struct ChunkWriter<W: io::Write> {
    csv: ::csv::Writer<W>,
    /// Reused for values that must be formatted before they are written (numbers, datetimes).
    text: String,
}

impl<W: io::Write> ChunkWriter<W> {
    /// A writer for `format`; refuses a format the `csv` crate cannot write (a delimiter that
    /// is not one ASCII character, a line ending other than LF or CRLF).
    fn new(format: &CsvFormat, out: W) -> Result<ChunkWriter<W>, ::csv::Error> {
        let invalid =
            |what: String| ::csv::Error::from(io::Error::new(io::ErrorKind::InvalidInput, what));
        let delimiter = u8::try_from(format.delimiter)
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| {
                invalid(format!(
                    "column delimiter {:?} is not ASCII",
                    format.delimiter
                ))
            })?;
        let terminator = match format.line_ending {
            "\n" => ::csv::Terminator::Any(b'\n'),
            "\r\n" => ::csv::Terminator::CRLF,
            other => {
                return Err(invalid(format!(
                    "line ending {other:?} is neither LF nor CRLF"
                )));
            }
        };
        let csv = ::csv::WriterBuilder::new()
            .delimiter(delimiter)
            .terminator(terminator)
            .quote_style(::csv::QuoteStyle::Always)
            .double_quote(true)
            .from_writer(out);
        Ok(ChunkWriter {
            csv,
            text: String::new(),
        })
    }

    /// The header row: the column names.
    fn header(&mut self, columns: &[CsvColumn]) -> Result<(), ::csv::Error> {
        self.csv
            .write_record(columns.iter().map(|c| c.name.as_bytes()))
    }

    /// One row: the value of each column, as `value` gives it.
    fn row<'a>(
        &mut self,
        columns: &[CsvColumn],
        mut value: impl FnMut(usize, &CsvColumn) -> &'a J,
    ) -> Result<(), ::csv::Error> {
        for (i, c) in columns.iter().enumerate() {
            self.field(c.kind, value(i, c))?;
        }
        self.csv.write_record(None::<&[u8]>)
    }

    fn field(&mut self, kind: CsvKind, v: &J) -> Result<(), ::csv::Error> {
        let text = &mut self.text;
        text.clear();
        let field: &str = match v {
            J::Null => "",
            J::Bool(b) => {
                if *b {
                    "true"
                } else {
                    "false"
                }
            }
            J::Number(n) => {
                let _ = write!(text, "{n}");
                text
            }
            J::String(s) if kind == CsvKind::Datetime => {
                if let Some(base) = s.strip_suffix("+0000") {
                    text.push_str(base);
                    text.push('Z');
                    text
                } else if let Some(ms) = datetime_ms(s) {
                    let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
                    let _ = write!(text, "{}", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
                    text
                } else {
                    s
                }
            }
            J::String(s) => s,
            other => {
                let _ = write!(text, "{other}");
                text
            }
        };
        self.csv.write_field(field)
    }

    fn finish(self) -> Result<W, ::csv::Error> {
        self.csv
            .into_inner()
            .map_err(|e| ::csv::Error::from(e.into_error()))
    }
}

/// Text from what a [`ChunkWriter`] wrote: the fields are text and the delimiter ASCII, so
/// the bytes are UTF-8; the check stays rather than an assumption.
fn text_of(bytes: Vec<u8>) -> Result<String, ::csv::Error> {
    String::from_utf8(bytes)
        .map_err(|e| ::csv::Error::from(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// The header row: the column names.
pub fn csv_header(
    out: &mut String,
    format: &CsvFormat,
    columns: &[CsvColumn],
) -> Result<(), ::csv::Error> {
    let mut w = ChunkWriter::new(format, Vec::new())?;
    w.header(columns)?;
    out.push_str(&text_of(w.finish()?)?);
    Ok(())
}

/// One data row; values in column order, missing ones written as null.
pub fn csv_row(
    out: &mut String,
    format: &CsvFormat,
    columns: &[CsvColumn],
    values: &[J],
) -> Result<(), ::csv::Error> {
    let mut w = ChunkWriter::new(format, Vec::new())?;
    w.row(columns, |i, _| values.get(i).unwrap_or(&J::Null))?;
    out.push_str(&text_of(w.finish()?)?);
    Ok(())
}

/// A whole chunk: the header row, then `rows`.
pub fn csv_chunk(
    format: &CsvFormat,
    columns: &[CsvColumn],
    rows: &[Vec<J>],
) -> Result<String, ::csv::Error> {
    let mut w = ChunkWriter::new(
        format,
        Vec::with_capacity(64 + rows.len() * columns.len() * 16),
    )?;
    w.header(columns)?;
    for r in rows {
        w.row(columns, |i, _| r.get(i).unwrap_or(&J::Null))?;
    }
    text_of(w.finish()?)
}

/// A whole chunk read from records, as a results response carries it: the header row, then
/// each record's columns.
pub(super) fn csv_records(
    format: &CsvFormat,
    columns: &[CsvColumn],
    records: &[Arc<Record>],
) -> Result<Vec<u8>, ::csv::Error> {
    let mut w = ChunkWriter::new(
        format,
        Vec::with_capacity(64 + records.len() * columns.len() * 16),
    )?;
    w.header(columns)?;
    for r in records {
        w.row(columns, |_, c| r.get(&c.name).unwrap_or(&J::Null))?;
    }
    w.finish()
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
            csv_chunk(&COMMA_LF, &c, &rows).expect("csv"),
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
        )
        .expect("csv");
        assert_eq!(
            out,
            "\"true\",\"\",\"42\",\"1000.5\",\"2022-01-10T13:01:28.000Z\",\"2024-04-26\",\
             \"2022-01-10T13:01:28.123Z\"\n"
        );
        // A short row is padded with nulls rather than misaligned.
        let mut out = String::new();
        csv_row(&mut out, &COMMA_LF, &c[..2], &[json!(false)]).expect("csv");
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
            let text =
                csv_chunk(&f, &c, &[vec![json!(format!("x{d}y")), json!("z")]]).expect("csv");
            assert_eq!(
                text,
                format!("\"A\"{d}\"B\"\r\n\"x{d}y\"{d}\"z\"\r\n"),
                "{name}"
            );
        }
    }

    /// The bytes a results response carries, pinned: header row, every field quoted, `"`
    /// doubled, delimiters and line breaks kept inside the quotes, null and empty text both
    /// as `""`, the job's line ending after every row and nothing else.
    #[test]
    fn result_chunks_have_the_bytes_salesforce_sends() {
        let c = cols(&[
            ("Id", CsvKind::Plain),
            ("Name", CsvKind::Plain),
            ("Description", CsvKind::Plain),
            ("CreatedDate", CsvKind::Datetime),
        ]);
        let record = |v: J| -> Arc<Record> {
            match v {
                J::Object(m) => Arc::new(m),
                _ => panic!("a record is an object"),
            }
        };
        let records = vec![
            record(json!({
                "Id": "001A", "Name": "Acme, \"the\" Inc", "Description": "line 1\nline 2\r\nend\r",
                "CreatedDate": "2022-01-10T13:01:28.000+0000",
            })),
            // Missing and null are written alike; so is empty text.
            record(json!({"Id": "001B", "Name": null, "Description": ""})),
            record(json!({"Id": "001C", "Name": "\"\"", "Description": "Zoë; tab\there"})),
        ];
        let lf = csv_records(&COMMA_LF, &c, &records).expect("csv");
        assert_eq!(
            lf,
            b"\"Id\",\"Name\",\"Description\",\"CreatedDate\"\n\
              \"001A\",\"Acme, \"\"the\"\" Inc\",\"line 1\nline 2\r\nend\r\",\"2022-01-10T13:01:28.000Z\"\n\
              \"001B\",\"\",\"\",\"\"\n\
              \"001C\",\"\"\"\"\"\",\"Zo\xc3\xab; tab\there\",\"\"\n"
                .as_slice()
        );
        let crlf = CsvFormat {
            delimiter: ';',
            line_ending: "\r\n",
        };
        assert_eq!(
            csv_records(&crlf, &c, &records[1..2]).expect("csv"),
            b"\"Id\";\"Name\";\"Description\";\"CreatedDate\"\r\n\"001B\";\"\";\"\";\"\"\r\n"
                .as_slice()
        );
        // No rows: the header alone.
        assert_eq!(
            csv_records(&COMMA_LF, &c[..1], &[]).expect("csv"),
            b"\"Id\"\n".as_slice()
        );
    }

    #[test]
    fn formats_the_csv_writer_cannot_write_are_refused() {
        let c = cols(&[("A", CsvKind::Plain)]);
        for f in [
            CsvFormat {
                delimiter: 'é',
                line_ending: "\n",
            },
            CsvFormat {
                delimiter: ',',
                line_ending: "\r",
            },
        ] {
            assert!(csv_chunk(&f, &c, &[]).is_err(), "{f:?}");
        }
    }
}
