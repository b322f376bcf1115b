//! Salesforce's text forms of dates and times, as REST JSON, Bulk CSV and SOQL literals carry
//! them, turned into epoch milliseconds. Shared by the sink (snapshot rows, typed values), the
//! orchestration (verify's keys) and the emulator (its store and SOQL), so that every part
//! reads `2024-01-10T13:01:28.000+0000` the same way.

/// `2024-01-10T13:01:28.000+0000` (RFC 3339, or an offset without a colon as REST and CSV
/// write it) -> epoch ms.
pub fn datetime_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.timestamp_millis())
}

/// `2024-04-26` -> epoch ms at 00:00 UTC.
pub fn date_ms(s: &str) -> Option<i64> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp_millis())
}

/// `13:01:28.000Z` -> ms since midnight.
pub fn time_ms(s: &str) -> Option<i64> {
    let t = chrono::NaiveTime::parse_from_str(s.trim_end_matches('Z'), "%H:%M:%S%.f").ok()?;
    use chrono::Timelike;
    Some(i64::from(t.num_seconds_from_midnight()) * 1000 + i64::from(t.nanosecond() / 1_000_000))
}

/// Salesforce's REST datetime form of epoch ms: `2024-01-10T13:01:28.000+0000`.
pub fn format_datetime(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salesforce_forms() {
        let ms = datetime_ms("2022-01-10T13:01:28.000+0000").expect("parses");
        assert_eq!(datetime_ms("2022-01-10T13:01:28.000Z"), Some(ms));
        assert_eq!(datetime_ms("2022-01-10T13:01:28Z"), Some(ms));
        assert_eq!(datetime_ms("yesterday"), None);
        assert_eq!(format_datetime(ms), "2022-01-10T13:01:28.000+0000");
        assert_eq!(date_ms("2024-04-26"), Some(1_714_089_600_000));
        assert_eq!(time_ms("01:02:03.004Z"), Some(3_723_004));
    }
}
