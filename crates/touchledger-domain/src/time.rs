//! Instants as integer nanoseconds since the Unix epoch (UTC).
//!
//! Key decision: a plain `i64` of nanoseconds, not a calendar type. It is exact (protobuf
//! `Timestamp` round-trips losslessly), totally ordered, cheap to compare in folds, and its
//! big-endian bytes (sign bit flipped) sort correctly as a sled key. Range: 1677..2262, which
//! covers every valid event (validation rejects instants before 1970).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An instant, in nanoseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

/// Nanoseconds per second.
pub const NANOS_PER_SEC: i64 = 1_000_000_000;

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From nanoseconds since the epoch.
    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Timestamp(nanos)
    }

    /// From whole seconds since the epoch; `None` if out of range.
    pub fn from_unix_secs(secs: i64) -> Option<Self> {
        secs.checked_mul(NANOS_PER_SEC).map(Timestamp)
    }

    /// From protobuf-style (seconds, nanos); `None` if `nanos` is not in `0..1e9` or the
    /// instant does not fit.
    pub fn from_parts(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds
            .checked_mul(NANOS_PER_SEC)
            .and_then(|s| s.checked_add(i64::from(nanos)))
            .map(Timestamp)
    }

    /// Nanoseconds since the epoch.
    pub const fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Protobuf-style (seconds, nanos) with `0 <= nanos < 1e9`.
    pub fn to_parts(self) -> (i64, i32) {
        let secs = self.0.div_euclid(NANOS_PER_SEC);
        // rem_euclid of a positive modulus is in 0..1e9, which fits i32.
        let nanos = self.0.rem_euclid(NANOS_PER_SEC) as i32;
        (secs, nanos)
    }

    /// The current wall-clock time. Only I/O layers call this; folds take `as_of` explicitly.
    pub fn now() -> Self {
        Utc::now()
            .timestamp_nanos_opt()
            .map(Timestamp)
            .unwrap_or(Timestamp(i64::MAX))
    }

    /// `self + d`, saturating at the representable range.
    pub fn saturating_add(self, d: std::time::Duration) -> Self {
        let d = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(d))
    }

    /// Sortable key bytes: big-endian with the sign bit flipped, so byte order = time order.
    pub fn to_key_bytes(self) -> [u8; 8] {
        ((self.0 as u64) ^ (1 << 63)).to_be_bytes()
    }

    /// Inverse of [`Timestamp::to_key_bytes`].
    pub fn from_key_bytes(b: [u8; 8]) -> Self {
        Timestamp((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
    }

    fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.0)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with `Z`, with as many fractional digits as needed (0, 3, 6 or 9).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        )
    }
}

/// Why a text could not be read as an instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseTimestampError {
    /// Not a date or instant at all.
    #[error("not an RFC 3339 instant or YYYY-MM-DD date: {0:?}")]
    Invalid(String),
    /// A valid date or instant outside what 64-bit nanoseconds since 1970 can hold.
    #[error(
        "not an RFC 3339 instant in the supported range 1677-09-21T00:12:44Z..=2262-04-11T23:47:16Z (nanoseconds in 64 bits): {0:?}"
    )]
    OutOfRange(String),
}

impl FromStr for Timestamp {
    type Err = ParseTimestampError;

    /// Accepts RFC 3339 (`2026-03-03T12:00:00Z`, any offset) or a bare date (`2026-03-03`,
    /// meaning midnight UTC).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let range = || ParseTimestampError::OutOfRange(s.to_owned());
        if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
            return dt.timestamp_nanos_opt().map(Timestamp).ok_or_else(range);
        }
        let date = NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| ParseTimestampError::Invalid(s.to_owned()))?;
        date.and_hms_opt(0, 0, 0)
            .and_then(|dt| dt.and_utc().timestamp_nanos_opt())
            .map(Timestamp)
            .ok_or_else(range)
    }
}

/// RFC 3339 in human-readable formats (JSON), integer nanoseconds in binary ones (projection
/// state): compact, exact and cheap to encode.
impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            i64::deserialize(d).map(Timestamp)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_dates_say_so() {
        for s in ["1600-01-01", "2300-01-01T00:00:00Z"] {
            assert!(
                matches!(
                    s.parse::<Timestamp>(),
                    Err(ParseTimestampError::OutOfRange(_))
                ),
                "{s}"
            );
        }
        assert!(matches!(
            "yesterday".parse::<Timestamp>(),
            Err(ParseTimestampError::Invalid(_))
        ));
    }

    #[test]
    fn rfc3339_round_trip_keeps_nanoseconds() {
        for s in [
            "2026-03-03T12:00:00Z",
            "1997-01-01T00:00:00.123Z",
            "2026-11-23T09:16:02.123456789Z",
        ] {
            let t: Timestamp = s.parse().expect("parses");
            assert_eq!(t.to_string(), s);
        }
    }

    #[test]
    fn offsets_and_dates_are_normalised_to_utc() {
        let t: Timestamp = "2026-03-03T14:00:00+02:00".parse().expect("parses");
        assert_eq!(t.to_string(), "2026-03-03T12:00:00Z");
        let d: Timestamp = "1997-09-30".parse().expect("parses");
        assert_eq!(d.to_string(), "1997-09-30T00:00:00Z");
        assert!("yesterday".parse::<Timestamp>().is_err());
    }

    #[test]
    fn key_bytes_sort_like_time_including_negative() {
        let ts = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX].map(Timestamp::from_unix_nanos);
        for w in ts.windows(2) {
            assert!(w[0].to_key_bytes() < w[1].to_key_bytes());
            assert_eq!(Timestamp::from_key_bytes(w[0].to_key_bytes()), w[0]);
        }
    }

    #[test]
    fn parts_round_trip_and_reject_bad_nanos() {
        let t = Timestamp::from_unix_nanos(-1);
        assert_eq!(t.to_parts(), (-1, 999_999_999));
        assert_eq!(Timestamp::from_parts(-1, 999_999_999), Some(t));
        assert_eq!(Timestamp::from_parts(0, -1), None);
        assert_eq!(Timestamp::from_parts(0, 1_000_000_000), None);
        assert_eq!(Timestamp::from_parts(i64::MAX, 0), None);
    }
}
