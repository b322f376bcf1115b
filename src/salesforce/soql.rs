//! SOQL text: literals and the few query shapes the orchestration asks the org for. Queries
//! are built here so that quoting and the datetime form are decided once, on the side that
//! speaks Salesforce.

use chrono::{DateTime, SecondsFormat, Utc};

/// A SOQL datetime literal for `t`, floored to the second (SystemModstamp has whole seconds,
/// so a `>=` window still includes every record changed at or after `t`).
pub fn datetime(t: DateTime<Utc>) -> String {
    let floored = DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t);
    floored.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A SOQL datetime literal for epoch ms, floored to the second.
pub fn datetime_ms(ms: i64) -> String {
    datetime(DateTime::from_timestamp_millis(ms).unwrap_or_default())
}

/// Escapes a value for a SOQL string literal.
pub fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// A quoted SOQL string literal.
pub fn quoted(s: &str) -> String {
    format!("'{}'", escape(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_literals_are_floored_to_the_second() {
        let t = DateTime::parse_from_rfc3339("2024-05-01T10:20:30.750+02:00")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(datetime(t), "2024-05-01T08:20:30Z");
        assert_eq!(datetime_ms(t.timestamp_millis()), "2024-05-01T08:20:30Z");
    }

    #[test]
    fn literals_cannot_end_early() {
        assert_eq!(quoted("O'Brien \\ x"), "'O\\'Brien \\\\ x'");
    }
}
