//! Values in Postgres' binary wire format, so that the merge sends typed parameters (and COPY
//! sends typed rows) that Postgres stores without parsing text.
//!
//! [`encode`] accepts exactly what [`PgType::text`] accepts and gives the value Postgres would
//! have parsed from that text; strings in a typed column (a form Postgres would have parsed)
//! are parsed here, and one that does not parse is an error naming the value and the type, at
//! planning time rather than as a failed statement. The module owns no state.

use super::schema::PgType;
use crate::model::Value;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// Days from 1970-01-01 to Postgres' epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// Milliseconds from the Unix epoch to Postgres' epoch.
const PG_EPOCH_MS: i64 = PG_EPOCH_DAYS * 86_400_000;

/// One encoded value, sent as is for a parameter (or array element) of any type: the SQL
/// text declares the type, the bytes are what [`encode`] made for it.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a>(pub &'a [u8]);

impl ToSql for Raw<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// The Postgres type of a parameter carrying `pg_type`'s binary values (without a typmod:
/// the statement casts to the column's `numeric(p,s)`, which rounds as text input would).
pub fn param_type(pg_type: &PgType) -> &'static str {
    match pg_type {
        PgType::Text => "text",
        PgType::Boolean => "boolean",
        PgType::Integer => "integer",
        PgType::Bigint => "bigint",
        PgType::Numeric { .. } => "numeric",
        PgType::Date => "date",
        PgType::Timestamptz => "timestamptz",
        PgType::Time => "time",
        PgType::Bytea => "bytea",
    }
}

/// The OID of [`param_type`]: what a field of a composite value carrying `pg_type`'s binary
/// values declares (the column's typmod is applied on receipt, so a `numeric(p,s)` rounds
/// there).
pub fn type_oid(pg_type: &PgType) -> u32 {
    match pg_type {
        PgType::Text => Type::TEXT,
        PgType::Boolean => Type::BOOL,
        PgType::Integer => Type::INT4,
        PgType::Bigint => Type::INT8,
        PgType::Numeric { .. } => Type::NUMERIC,
        PgType::Date => Type::DATE,
        PgType::Timestamptz => Type::TIMESTAMPTZ,
        PgType::Time => Type::TIME,
        PgType::Bytea => Type::BYTEA,
    }
    .oid()
}

/// The start of a binary COPY stream: signature, flags, no header extension.
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Appends one length-prefixed binary value (`None`: NULL, length -1): the form of a binary
/// COPY field, of a composite value's field and of an array element alike.
pub fn put_field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            out.extend_from_slice(&(v.len() as i32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// `expr` (a value of [`param_type`]) as a column of `pg_type`: only a `numeric(p,s)` needs
/// the cast, which rounds to the scale as text input would.
pub fn column_expr(pg_type: &PgType, expr: &str) -> String {
    match pg_type {
        PgType::Numeric { .. } => format!("{expr}::{}", pg_type.sql()),
        _ => expr.to_string(),
    }
}

/// [`encode`], moving a text value's bytes out of `value` instead of copying them: for a caller
/// that does not read the value again (the merge plan, which owns the batch's events).
pub fn encode_taking(pg_type: &PgType, value: &mut Value) -> Result<Vec<u8>, String> {
    match (pg_type, value) {
        (PgType::Text, Value::String(s)) => Ok(std::mem::take(s).into_bytes()),
        (_, value) => encode(pg_type, value),
    }
}

/// Encodes a decoded event value for a column of `pg_type`.
pub fn encode(pg_type: &PgType, value: &Value) -> Result<Vec<u8>, String> {
    let bad = || format!("{value:?} cannot be stored as {}", pg_type.sql());
    Ok(match (pg_type, value) {
        (PgType::Text, _) => pg_type.text(value)?.into_bytes(),
        (PgType::Boolean, Value::Boolean(b)) => vec![u8::from(*b)],
        (PgType::Boolean, Value::String(s)) => vec![u8::from(parse_bool(s).ok_or_else(bad)?)],
        (PgType::Integer, _) => {
            let i = integer(value).ok_or_else(bad)?;
            i32::try_from(i).map_err(|_| bad())?.to_be_bytes().to_vec()
        }
        (PgType::Bigint, _) => integer(value).ok_or_else(bad)?.to_be_bytes().to_vec(),
        (PgType::Numeric { .. }, Value::String(s)) => numeric(s.trim()).ok_or_else(bad)?,
        (PgType::Numeric { .. }, _) => numeric(&pg_type.text(value)?).ok_or_else(bad)?,
        (PgType::Date, Value::Long(ms)) => date_days(ms.div_euclid(86_400_000)).ok_or_else(bad)?,
        (PgType::Date, Value::Int(days)) => date_days(i64::from(*days)).ok_or_else(bad)?,
        (PgType::Date, Value::String(s)) => {
            let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| bad())?;
            let unix = d.signed_duration_since(chrono::NaiveDate::default());
            date_days(unix.num_days()).ok_or_else(bad)?
        }
        (PgType::Timestamptz, Value::Long(ms)) => timestamp(*ms).ok_or_else(bad)?,
        (PgType::Timestamptz, Value::String(s)) => {
            let s = s.trim();
            let ms = crate::model::time::datetime_ms(s).or_else(|| {
                let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
                Some(
                    d.and_time(chrono::NaiveTime::MIN)
                        .and_utc()
                        .timestamp_millis(),
                )
            });
            timestamp(ms.ok_or_else(bad)?).ok_or_else(bad)?
        }
        (PgType::Time, Value::Long(ms)) => time_of_day(*ms).ok_or_else(bad)?,
        (PgType::Time, Value::Int(ms)) => time_of_day(i64::from(*ms)).ok_or_else(bad)?,
        (PgType::Time, Value::String(s)) => {
            time_of_day(parse_time(s).ok_or_else(bad)?).ok_or_else(bad)?
        }
        (PgType::Bytea, Value::Bytes(b)) => b.clone(),
        (PgType::Bytea, Value::String(s)) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("base64 value is not valid base64: {e}"))?
        }
        _ => return Err(bad()),
    })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(i64::from(*i)),
        Value::Long(i) => Some(*i),
        Value::Double(d) if d.fract() == 0.0 && d.abs() < 9.2e18 => Some(*d as i64),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn date_days(unix_days: i64) -> Option<Vec<u8>> {
    let days = i32::try_from(unix_days - PG_EPOCH_DAYS).ok()?;
    Some(days.to_be_bytes().to_vec())
}

fn timestamp(ms: i64) -> Option<Vec<u8>> {
    let micros = ms.checked_sub(PG_EPOCH_MS)?.checked_mul(1000)?;
    Some(micros.to_be_bytes().to_vec())
}

fn time_of_day(ms: i64) -> Option<Vec<u8>> {
    if !(0..86_400_000).contains(&ms) {
        return None;
    }
    Some((ms * 1000).to_be_bytes().to_vec())
}

/// `HH:MM:SS[.fff][Z]` -> ms since midnight.
fn parse_time(s: &str) -> Option<i64> {
    let t =
        chrono::NaiveTime::parse_from_str(s.trim().trim_end_matches('Z'), "%H:%M:%S%.f").ok()?;
    use chrono::Timelike;
    Some(i64::from(t.num_seconds_from_midnight()) * 1000 + i64::from(t.nanosecond() / 1_000_000))
}

/// A decimal literal (`-12.50`, `1e-7`, `NaN`, `Infinity`) in `numeric`'s binary form: digit
/// count, weight of the first base-10000 digit, sign, display scale, then the digits.
pub fn numeric(s: &str) -> Option<Vec<u8>> {
    let header = |ndigits: i16, weight: i16, sign: u16, dscale: u16| {
        let mut out = Vec::with_capacity(8 + 2 * ndigits.max(0) as usize);
        out.extend_from_slice(&ndigits.to_be_bytes());
        out.extend_from_slice(&weight.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        out
    };
    match s {
        "NaN" => return Some(header(0, 0, 0xC000, 0)),
        "Infinity" | "+Infinity" => return Some(header(0, 0, 0xD000, 0)),
        "-Infinity" => return Some(header(0, 0, 0xF000, 0)),
        _ => {}
    }
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if exponent.abs() > 100_000 {
        return None;
    }
    // All decimal digits, and where the point sits among them (after `point` digits).
    let digits: Vec<u8> = int_part
        .bytes()
        .chain(frac_part.bytes())
        .map(|b| b - b'0')
        .collect();
    let point = int_part.len() as i64 + i64::from(exponent);
    let dscale = (frac_part.len() as i64 - i64::from(exponent)).max(0);
    // Digit k (0-based) has decimal position point - 1 - k (0 = units). Group positions in
    // fours: group g holds positions 4g .. 4g+3.
    let group = |pos: i64| pos.div_euclid(4);
    let mut groups: Vec<(i64, i16)> = Vec::new();
    for (k, d) in digits.iter().enumerate() {
        let pos = point - 1 - k as i64;
        let g = group(pos);
        let weight = [1000i16, 100, 10, 1][3 - pos.rem_euclid(4) as usize];
        match groups.last_mut() {
            Some((lg, v)) if *lg == g => *v += i16::from(*d) * weight,
            _ => groups.push((g, i16::from(*d) * weight)),
        }
    }
    // Drop zero groups at both ends.
    while groups.first().is_some_and(|(_, v)| *v == 0) {
        groups.remove(0);
    }
    while groups.last().is_some_and(|(_, v)| *v == 0) {
        groups.pop();
    }
    let dscale = u16::try_from(dscale).ok()?;
    let Some(&(first, _)) = groups.first() else {
        return Some(header(0, 0, 0, dscale));
    };
    // Groups are contiguous from the first to the last; fill gaps with zeros.
    let last = groups.last().map(|(g, _)| *g).unwrap_or(first);
    let count = usize::try_from(first - last + 1).ok()?;
    let mut values = vec![0i16; count];
    for (g, v) in groups {
        values[usize::try_from(first - g).ok()?] = v;
    }
    let mut out = header(
        i16::try_from(count).ok()?,
        i16::try_from(first).ok()?,
        if negative { 0x4000 } else { 0 },
        dscale,
    );
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taking_a_value_encodes_it_as_copying_does() {
        let cases = [
            (PgType::Text, Value::String("Zürich".into())),
            (PgType::Text, Value::Long(42)),
            (PgType::Bigint, Value::String("42".into())),
            (PgType::Date, Value::String("2026-11-23".into())),
            (PgType::Time, Value::String("08:30:00.000Z".into())),
            (
                PgType::Numeric {
                    precision: 18,
                    scale: 2,
                },
                Value::String("12.50".into()),
            ),
        ];
        for (pg_type, value) in cases {
            let copied = encode(&pg_type, &value);
            let mut taken = value.clone();
            assert_eq!(
                encode_taking(&pg_type, &mut taken),
                copied,
                "{pg_type:?} {value:?}"
            );
            // Only a text column's text is moved out.
            if pg_type != PgType::Text {
                assert_eq!(taken, value);
            }
        }
    }

    #[test]
    fn copy_fields_are_length_prefixed() {
        let mut b = Vec::new();
        put_field(&mut b, Some(b"a\tb"));
        put_field(&mut b, None);
        assert_eq!(&b[..], b"\0\0\0\x03a\tb\xff\xff\xff\xff");
    }

    #[test]
    fn the_copy_header_is_signature_flags_and_extension_length() {
        assert_eq!(COPY_HEADER.len(), 11 + 4 + 4);
        assert!(COPY_HEADER.starts_with(b"PGCOPY\n\xff\r\n\0"));
    }

    fn num(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [ndigits, weight, sign as i16, dscale as i16] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    #[test]
    fn numerics_match_postgres_binary_form() {
        assert_eq!(numeric("1000.5"), Some(num(2, 0, 0, 1, &[1000, 5000])));
        assert_eq!(numeric("-12.50"), Some(num(2, 0, 0x4000, 2, &[12, 5000])));
        assert_eq!(numeric("0"), Some(num(0, 0, 0, 0, &[])));
        assert_eq!(numeric("0.00"), Some(num(0, 0, 0, 2, &[])));
        assert_eq!(
            numeric("123456789"),
            Some(num(3, 2, 0, 0, &[1, 2345, 6789]))
        );
        assert_eq!(numeric("10000"), Some(num(1, 1, 0, 0, &[1])));
        assert_eq!(numeric("0.0001"), Some(num(1, -1, 0, 4, &[1])));
        assert_eq!(numeric("0.00001"), Some(num(1, -2, 0, 5, &[1000])));
        assert_eq!(numeric("1e-7"), Some(num(1, -2, 0, 7, &[10])));
        assert_eq!(numeric("2.5e3"), Some(num(1, 0, 0, 0, &[2500])));
        assert_eq!(numeric("NaN"), Some(num(0, 0, 0xC000, 0, &[])));
        for bad in ["", "-", ".", "1.2.3", "abc", "1e", "--1"] {
            assert_eq!(numeric(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn typed_values_encode_like_their_text_form() {
        let ts = PgType::Timestamptz;
        assert_eq!(
            encode(&ts, &Value::Long(PG_EPOCH_MS + 1)).ok(),
            Some(1000i64.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&ts, &Value::String("2000-01-01T00:00:01.000+0000".into())).ok(),
            Some(1_000_000i64.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&PgType::Date, &Value::String("2000-01-02".into())).ok(),
            Some(1i32.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&PgType::Date, &Value::Int(10_956)).ok(),
            Some((-1i32).to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&PgType::Time, &Value::String("01:00:00.250Z".into())).ok(),
            Some(3_600_250_000i64.to_be_bytes().to_vec())
        );
        assert_eq!(
            encode(&PgType::Boolean, &Value::Boolean(true)).ok(),
            Some(vec![1])
        );
        assert!(encode(&PgType::Integer, &Value::Long(1 << 40)).is_err());
        assert!(encode(&PgType::Integer, &Value::String("x".into())).is_err());
        assert_eq!(
            encode(&PgType::Text, &Value::Int(7)).ok(),
            Some(b"7".to_vec())
        );
    }
}
