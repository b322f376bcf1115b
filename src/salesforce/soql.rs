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

/// The few query shapes sfmirror sends: a field list or `COUNT()` from one object, with at
/// most a time window or an id list, optionally in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    select: String,
    object: String,
    filter: Option<String>,
    order_by_id: bool,
}

impl Query {
    /// `SELECT <fields> FROM <object>`.
    pub fn select<S: AsRef<str>>(fields: &[S], object: &str) -> Query {
        let fields: Vec<&str> = fields.iter().map(AsRef::as_ref).collect();
        Query {
            select: fields.join(", "),
            object: object.to_string(),
            filter: None,
            order_by_id: false,
        }
    }

    /// `SELECT COUNT() FROM <object>`, with this query's filter.
    pub fn count(&self) -> Query {
        Query {
            select: "COUNT()".to_string(),
            object: self.object.clone(),
            filter: self.filter.clone(),
            order_by_id: false,
        }
    }

    /// Only records whose `field` (a datetime) is at or after `since_ms`, floored to the
    /// second.
    pub fn since(mut self, field: &str, since_ms: i64) -> Query {
        self.filter = Some(format!("{field} >= {}", datetime_ms(since_ms)));
        self
    }

    /// Only the records `ids` names.
    pub fn ids<S: AsRef<str>>(mut self, ids: &[S]) -> Query {
        let list: Vec<String> = ids.iter().map(|id| quoted(id.as_ref())).collect();
        self.filter = Some(format!("Id IN ({})", list.join(", ")));
        self
    }

    /// In order of `Id`.
    pub fn order_by_id(mut self) -> Query {
        self.order_by_id = true;
        self
    }

    pub fn object(&self) -> &str {
        &self.object
    }
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SELECT {} FROM {}", self.select, self.object)?;
        if let Some(filter) = &self.filter {
            write!(f, " WHERE {filter}")?;
        }
        if self.order_by_id {
            f.write_str(" ORDER BY Id")?;
        }
        Ok(())
    }
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
    fn query_shapes() {
        let q = Query::select(&["Id", "Name"], "Account");
        assert_eq!(q.to_string(), "SELECT Id, Name FROM Account");
        let window = q.clone().since("SystemModstamp", 1_714_557_630_750);
        assert_eq!(
            window.to_string(),
            "SELECT Id, Name FROM Account WHERE SystemModstamp >= 2024-05-01T10:00:30Z"
        );
        assert_eq!(
            window.count().to_string(),
            "SELECT COUNT() FROM Account WHERE SystemModstamp >= 2024-05-01T10:00:30Z"
        );
        assert_eq!(
            q.clone().ids(&["001A", "001'B"]).order_by_id().to_string(),
            "SELECT Id, Name FROM Account WHERE Id IN ('001A', '001\\'B') ORDER BY Id"
        );
    }

    #[test]
    fn literals_cannot_end_early() {
        assert_eq!(quoted("O'Brien \\ x"), "'O\\'Brien \\\\ x'");
    }
}
