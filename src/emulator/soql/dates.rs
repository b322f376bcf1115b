//! Relative date literals (`TODAY`, `LAST_N_DAYS:7`, `THIS_QUARTER`, ...) as the time ranges
//! they stand for at a given moment, in the org's time zone (GMT for the emulator's user) with
//! weeks starting on Sunday (the en_US locale). A literal is a half-open range
//! `[start, end)` of epoch milliseconds; how a comparison reads a range is
//! [`super::value::compare`]'s. It knows nothing of fields or records.

use chrono::{Datelike, Duration, Months, NaiveDate};

/// Literals that take no number.
const PLAIN: &[&str] = &[
    "YESTERDAY",
    "TODAY",
    "TOMORROW",
    "LAST_WEEK",
    "THIS_WEEK",
    "NEXT_WEEK",
    "LAST_MONTH",
    "THIS_MONTH",
    "NEXT_MONTH",
    "LAST_90_DAYS",
    "NEXT_90_DAYS",
    "LAST_QUARTER",
    "THIS_QUARTER",
    "NEXT_QUARTER",
    "LAST_YEAR",
    "THIS_YEAR",
    "NEXT_YEAR",
];

/// Literals that take `:n`.
const WITH_N: &[&str] = &[
    "LAST_N_DAYS",
    "NEXT_N_DAYS",
    "N_DAYS_AGO",
    "LAST_N_WEEKS",
    "NEXT_N_WEEKS",
    "N_WEEKS_AGO",
    "LAST_N_MONTHS",
    "NEXT_N_MONTHS",
    "N_MONTHS_AGO",
    "LAST_N_QUARTERS",
    "NEXT_N_QUARTERS",
    "N_QUARTERS_AGO",
    "LAST_N_YEARS",
    "NEXT_N_YEARS",
    "N_YEARS_AGO",
];

/// Whether `word` is a date literal, and whether it takes `:n`.
pub(super) fn kind(word: &str) -> Option<bool> {
    let upper = word.to_ascii_uppercase();
    if PLAIN.contains(&upper.as_str()) {
        Some(false)
    } else if WITH_N.contains(&upper.as_str()) {
        Some(true)
    } else {
        None
    }
}

fn ms(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis())
}

fn add_months(d: NaiveDate, n: i64) -> Option<NaiveDate> {
    let m = Months::new(u32::try_from(n.unsigned_abs()).ok()?);
    if n >= 0 {
        d.checked_add_months(m)
    } else {
        d.checked_sub_months(m)
    }
}

fn add_days(d: NaiveDate, n: i64) -> Option<NaiveDate> {
    d.checked_add_signed(Duration::try_days(n)?)
}

/// `[start, end)` in epoch ms of the literal `word` (with `n` for the `:n` ones) at `now_ms`.
pub(super) fn range(word: &str, n: i64, now_ms: i64) -> Option<(i64, i64)> {
    let today = chrono::DateTime::from_timestamp_millis(now_ms)?.date_naive();
    let week = add_days(today, -i64::from(today.weekday().num_days_from_sunday()))?;
    let month = today.with_day(1)?;
    let quarter = NaiveDate::from_ymd_opt(today.year(), (today.month0() / 3) * 3 + 1, 1)?;
    let year = NaiveDate::from_ymd_opt(today.year(), 1, 1)?;
    let days = |start: NaiveDate, count: i64| Some((start, add_days(start, count)?));
    let months = |start: NaiveDate, count: i64| Some((start, add_months(start, count)?));
    let (start, end) = match word.to_ascii_uppercase().as_str() {
        "YESTERDAY" => days(add_days(today, -1)?, 1)?,
        "TODAY" => days(today, 1)?,
        "TOMORROW" => days(add_days(today, 1)?, 1)?,
        "LAST_WEEK" => days(add_days(week, -7)?, 7)?,
        "THIS_WEEK" => days(week, 7)?,
        "NEXT_WEEK" => days(add_days(week, 7)?, 7)?,
        "LAST_MONTH" => months(add_months(month, -1)?, 1)?,
        "THIS_MONTH" => months(month, 1)?,
        "NEXT_MONTH" => months(add_months(month, 1)?, 1)?,
        // Today and the days before it; the days after today.
        "LAST_90_DAYS" => (add_days(today, -90)?, add_days(today, 1)?),
        "NEXT_90_DAYS" => days(add_days(today, 1)?, 90)?,
        "LAST_QUARTER" => months(add_months(quarter, -3)?, 3)?,
        "THIS_QUARTER" => months(quarter, 3)?,
        "NEXT_QUARTER" => months(add_months(quarter, 3)?, 3)?,
        "LAST_YEAR" => months(add_months(year, -12)?, 12)?,
        "THIS_YEAR" => months(year, 12)?,
        "NEXT_YEAR" => months(add_months(year, 12)?, 12)?,
        "LAST_N_DAYS" => (add_days(today, -n)?, add_days(today, 1)?),
        "NEXT_N_DAYS" => days(add_days(today, 1)?, n)?,
        "N_DAYS_AGO" => days(add_days(today, -n)?, 1)?,
        "LAST_N_WEEKS" => days(add_days(week, -7 * n)?, 7 * n)?,
        "NEXT_N_WEEKS" => days(add_days(week, 7)?, 7 * n)?,
        "N_WEEKS_AGO" => days(add_days(week, -7 * n)?, 7)?,
        "LAST_N_MONTHS" => months(add_months(month, -n)?, n)?,
        "NEXT_N_MONTHS" => months(add_months(month, 1)?, n)?,
        "N_MONTHS_AGO" => months(add_months(month, -n)?, 1)?,
        "LAST_N_QUARTERS" => months(add_months(quarter, -3 * n)?, 3 * n)?,
        "NEXT_N_QUARTERS" => months(add_months(quarter, 3)?, 3 * n)?,
        "N_QUARTERS_AGO" => months(add_months(quarter, -3 * n)?, 3)?,
        "LAST_N_YEARS" => months(add_months(year, -12 * n)?, 12 * n)?,
        "NEXT_N_YEARS" => months(add_months(year, 12)?, 12 * n)?,
        "N_YEARS_AGO" => months(add_months(year, -12 * n)?, 12)?,
        _ => return None,
    };
    Some((ms(start), ms(end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(15, 30, 0))
            .map_or(0, |t| t.and_utc().timestamp_millis())
    }

    fn day(y: i32, m: u32, d: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d).map_or(0, ms)
    }

    #[test]
    fn ranges_at_a_known_moment() {
        // Wednesday 2026-05-13, 15:30 UTC.
        let now = at(2026, 5, 13);
        let r = |w: &str, n: i64| range(w, n, now);
        assert_eq!(r("TODAY", 0), Some((day(2026, 5, 13), day(2026, 5, 14))));
        assert_eq!(
            r("yesterday", 0),
            Some((day(2026, 5, 12), day(2026, 5, 13)))
        );
        assert_eq!(
            r("THIS_WEEK", 0),
            Some((day(2026, 5, 10), day(2026, 5, 17)))
        );
        assert_eq!(r("LAST_WEEK", 0), Some((day(2026, 5, 3), day(2026, 5, 10))));
        assert_eq!(r("THIS_MONTH", 0), Some((day(2026, 5, 1), day(2026, 6, 1))));
        assert_eq!(r("LAST_MONTH", 0), Some((day(2026, 4, 1), day(2026, 5, 1))));
        assert_eq!(
            r("THIS_QUARTER", 0),
            Some((day(2026, 4, 1), day(2026, 7, 1)))
        );
        assert_eq!(
            r("LAST_QUARTER", 0),
            Some((day(2026, 1, 1), day(2026, 4, 1)))
        );
        assert_eq!(r("THIS_YEAR", 0), Some((day(2026, 1, 1), day(2027, 1, 1))));
        assert_eq!(
            r("LAST_N_DAYS", 7),
            Some((day(2026, 5, 6), day(2026, 5, 14)))
        );
        assert_eq!(
            r("NEXT_N_DAYS", 2),
            Some((day(2026, 5, 14), day(2026, 5, 16)))
        );
        assert_eq!(
            r("N_DAYS_AGO", 3),
            Some((day(2026, 5, 10), day(2026, 5, 11)))
        );
        assert_eq!(
            r("LAST_N_MONTHS", 2),
            Some((day(2026, 3, 1), day(2026, 5, 1)))
        );
        assert_eq!(
            r("NEXT_N_YEARS", 1),
            Some((day(2027, 1, 1), day(2028, 1, 1)))
        );
        assert_eq!(r("SOMEDAY", 0), None);
        assert_eq!(kind("today"), Some(false));
        assert_eq!(kind("LAST_N_DAYS"), Some(true));
        assert_eq!(kind("Name"), None);
    }
}
