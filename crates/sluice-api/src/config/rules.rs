//! Rules several fields follow, and every bound, named once. The `#[schemars]` attributes
//! (what the API server enforces) and the checks (what the worker enforces on its file and
//! the controller on objects stored before a rule existed) read the same constants, so the
//! two cannot drift.

use std::fmt::Display;

use super::ConfigError;

/// An inclusive range a number must fall in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds<T> {
    /// The smallest value allowed.
    pub min: T,
    /// The largest value allowed.
    pub max: T,
}

impl<T: PartialOrd + Display + Copy> Bounds<T> {
    /// Whether `v` is allowed.
    pub fn contains(&self, v: T) -> bool {
        self.min <= v && v <= self.max
    }

    /// Refuse `v` at `field` unless it is allowed, saying what is.
    pub fn check(&self, field: &str, v: T) -> Result<(), ConfigError> {
        if self.contains(v) {
            Ok(())
        } else {
            Err(ConfigError::invalid(
                field,
                format!("must be between {} and {}, got {v}", self.min, self.max),
            ))
        }
    }
}

/// `workers.perPartition`.
pub const PER_PARTITION: Bounds<u32> = Bounds { min: 1, max: 256 };
/// `workers.queueCapacity` (records).
pub const QUEUE_CAPACITY: Bounds<u32> = Bounds {
    min: 2,
    max: 1_000_000,
};
/// `batching.maxMessages`.
pub const MAX_MESSAGES: Bounds<u32> = Bounds {
    min: 1,
    max: 1_000_000,
};
/// `retry.maxAttempts` (0: no limit but `maxElapsed`).
pub const MAX_ATTEMPTS: Bounds<u32> = Bounds {
    min: 0,
    max: 1_000_000,
};
/// An http sink's `maxInFlight`.
pub const HTTP_IN_FLIGHT: Bounds<u32> = Bounds { min: 1, max: 64 };
/// A postgres sink's `poolSize`.
pub const POOL_SIZE: Bounds<u32> = Bounds { min: 1, max: 64 };

/// Kafka's topic name characters (the length is [`TOPIC_NAME_LEN`]; `.` and `..` are
/// refused by [`topic_name`] too).
pub const TOPIC_NAME_PATTERN: &str = r"^[a-zA-Z0-9._-]+$";
/// Kafka's topic name length.
pub const TOPIC_NAME_LEN: Bounds<usize> = Bounds { min: 1, max: 249 };
/// A plain SQL identifier (a column): what the postgres sink quotes into its statements.
pub const IDENTIFIER_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";
/// PostgreSQL's identifier length.
pub const IDENTIFIER_MAX_LEN: usize = 63;
/// A table, optionally schema-qualified.
pub const TABLE_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$";
/// A table name's length (`schema.table`: two identifiers and the dot).
pub const TABLE_LEN: Bounds<usize> = Bounds {
    min: 1,
    max: 2 * IDENTIFIER_MAX_LEN + 1,
};

/// Refuse a blank value.
pub fn non_empty(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        Err(ConfigError::invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// Kafka's rule: [`TOPIC_NAME_LEN`] characters of [`TOPIC_NAME_PATTERN`], not `.` or `..`.
pub fn topic_name(field: &str, v: &str) -> Result<(), ConfigError> {
    let ok = TOPIC_NAME_LEN.contains(v.len())
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!(
                "`{v}` is not a Kafka topic name ({}-{} characters of a-z A-Z 0-9 . _ -)",
                TOPIC_NAME_LEN.min, TOPIC_NAME_LEN.max
            ),
        ))
    }
}

/// An `http://` or `https://` URL with a host and no credentials (an http sink's endpoint,
/// a schema registry).
pub fn http_url(field: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let authority = rest.map(|r| r.split('/').next().unwrap_or_default());
    if authority.is_none_or(str::is_empty) || url.contains(char::is_whitespace) || url.len() > 2048
    {
        return Err(ConfigError::invalid(
            field,
            format!("{url:?} is not an http(s) URL, e.g. https://ingest.example.com/v1/events"),
        ));
    }
    if authority.is_some_and(|a| a.contains('@')) {
        return Err(ConfigError::invalid(
            field,
            "credentials do not go in the URL (it is stored in the ConfigMap and logged): they come from an environment variable filled from a Secret",
        ));
    }
    Ok(())
}

/// A plain SQL identifier ([`IDENTIFIER_PATTERN`], at most [`IDENTIFIER_MAX_LEN`]).
pub fn identifier(field: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= IDENTIFIER_MAX_LEN
        && v.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!(
                "`{v}` is not a plain SQL identifier (letters, digits and _, at most {IDENTIFIER_MAX_LEN})"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field_and_the_range() {
        assert!(PER_PARTITION.check("workers.perPartition", 256).is_ok());
        let e = PER_PARTITION
            .check("workers.perPartition", 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("workers.perPartition") && e.contains("between 1 and 256, got 0"),
            "{e}"
        );
    }

    #[test]
    fn topic_names_follow_kafka() {
        for ok in ["a", "in.put_1-x", &"t".repeat(249)] {
            assert!(topic_name("t", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "in put", "ü", &"t".repeat(250)] {
            assert!(topic_name("t", bad).is_err(), "{bad}");
        }
    }
}
